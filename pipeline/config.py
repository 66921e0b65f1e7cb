"""Typed parameters: `params.yaml` is parsed here, once, and the resulting `Params` is passed down.

Every tunable lives in one section per stage; every file the pipeline reads or writes is declared once in
`paths` (and templated into `dvc.yaml` from there). Unknown keys and wrong types fail with the dotted key.
"""

from __future__ import annotations

import difflib
import os
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.errors import ParamsError
from pipeline.preprocess import IMAGE_EXTENSIONS

DEFAULT_PARAMS_FILE = Path("params.yaml")
# `paths.csv_manifest` when there is no CSV manifest: ingest depends on it in dvc.yaml, and DVC templating
# can neither skip a dependency nor depend on nothing, so "none" is this real, empty file in the code.
NO_CSV_MANIFEST = Path("pipeline/data/no_csv_manifest.csv")

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
Severity = Literal["error", "warning", "off"]


def _is_number(annotation: Any, kinds: tuple[type, ...] = (int, float)) -> bool:
    """Whether a field's annotation (int, float, `PositiveInt | None` ...) takes a number of `kinds`."""
    return annotation in kinds or any(_is_number(arg, kinds) for arg in get_args(annotation))


class _Section(BaseModel):
    # allow_inf_nan=False: YAML's .inf and .nan are floats, and no tunable means anything at either.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """Pydantic's lax mode reads `epochs: true` as 1; a boolean where a number belongs is a mistake."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and _is_number(annotation):
            raise ValueError("expected an integer" if _is_number(annotation, (int,)) else "expected a number")
        return value


class BaseParams(_Section):
    seed: NonNegInt = 42


class PathsParams(_Section):
    """Every file and folder the stages touch, relative to the project root."""

    data_root: Path = Path("data/sample")
    csv_manifest: Path = NO_CSV_MANIFEST
    manifest: Path = Path("data/interim/manifest.csv")
    validated: Path = Path("data/interim/validated.csv")
    quarantine: Path = Path("data/interim/quarantine.csv")
    splits: Path = Path("data/processed/splits.csv")
    cache_dir: Path = Path("data/cache")
    checkpoint_dir: Path = Path("models/checkpoints")
    model: Path = Path("models/model.pt")
    predictions: Path = Path("models/predictions.csv")
    calibration: Path = Path("models/calibration.json")
    onnx_dir: Path = Path("models/onnx")
    export_dir: Path = Path("models/export")
    champion_dir: Path = Path("models/champion")
    metrics_dir: Path = Path("metrics")
    reports_dir: Path = Path("reports")
    live_dir: Path = Path("dvclive")

    def metrics(self, stage: str) -> Path:
        """A stage's headline figures, the columns of `dvc exp show`: scalars only."""
        return self.metrics_dir / f"{stage}.json"

    @property
    def csv_listing(self) -> Path | None:
        """The CSV manifest to read, or None when `csv_manifest` is the NO_CSV_MANIFEST placeholder."""
        return None if self.csv_manifest == NO_CSV_MANIFEST else self.csv_manifest

    @field_validator("csv_manifest", mode="before")
    @classmethod
    def _csv_manifest_is_a_path(cls, value: Any) -> Any:
        if value is None or value == "":
            raise ValueError(f"expected a path: your CSV, or {NO_CSV_MANIFEST} for none (DVC needs a file)")
        return value

    def details(self, stage: str) -> Path:
        """A stage's other figures (per-class tables, rule outcomes, counts by status): not a DVC metric."""
        return self.reports_dir / stage / "details.json"

    @property
    def curves_dir(self) -> Path:
        """dvclive's per-epoch TSVs that train writes (val/acc.tsv, lr.tsv, ...): the report's curves."""
        return self.live_dir / "plots" / "metrics"

    @property
    def audit_table(self) -> Path:
        """The audit's per-image table (near-duplicate group, label suspicion), which split reads."""
        return self.reports_dir / "audit" / "images.csv"

    @property
    def champion_splits(self) -> Path:
        """The champion's copy of the splits table it was trained on: the audit's drift baseline."""
        return self.champion_dir / "splits.csv"


class IngestParams(_Section):
    source: Literal["auto", "folder", "presplit", "csv"] = "auto"
    label_depth: PositiveInt = 1
    extensions: list[str] = Field(default_factory=lambda: list(IMAGE_EXTENSIONS))
    follow_symlinks_inside_root: bool = True
    max_decode_pixels: PositiveInt = 178_956_970
    max_decode_mib: PositiveInt = 640
    num_workers: NonNegInt = 2
    chunksize: PositiveInt = 1024


class SeverityParams(_Section):
    """What a failed validate rule does: `error` stops the stage, `warning` logs it (and quarantines the
    offending files where the rule is about files), `off` skips the rule."""

    min_images_per_class: Severity = "error"
    max_imbalance_ratio: Severity = "warning"
    min_classes: Severity = "error"
    max_bad_fraction: Severity = "error"
    min_side: Severity = "warning"
    max_pixels: Severity = "warning"
    label_conflict: Severity = "warning"
    split_leakage: Severity = "error"


class ValidateParams(_Section):
    min_images_per_class: PositiveInt = 10
    max_imbalance_ratio: PositiveFloat = 10.0
    min_classes: Annotated[int, Field(ge=2)] = 2
    max_bad_fraction: Fraction = 0.05
    min_side: PositiveInt = 16
    max_pixels: PositiveInt = 50_000_000
    severity: SeverityParams = SeverityParams()


class SplitParams(_Section):
    train: Fraction = 0.7
    val: Fraction = 0.15
    test: Fraction = 0.15
    method: Literal["stable", "stratified"] = "stable"
    keep_given_splits: bool = True
    carve_test_from: Literal["none", "val", "train"] = "none"
    small_class: Literal["error", "warning"] = "error"

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitParams:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {total:g}")
        return self


class AuditSeverityParams(_Section):
    """What a near-duplicate group found by the audit does: `error` stops the stage, `warning` logs it."""

    near_duplicate_conflict: Severity = "warning"  # one group under two labels
    near_duplicate_leakage: Severity = "warning"  # one group in two given splits


class AuditParams(_Section):
    near_duplicates: bool = True
    similarity: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.97
    neighbours: PositiveInt = 5
    pixel_correlation: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.995
    label_issues: Literal["off", "report", "quarantine"] = "report"
    folds: Annotated[int, Field(ge=2)] = 5
    drift: bool = True
    drift_min_images: PositiveInt = 20
    drift_max_auc: Annotated[float, Field(ge=0.5, le=1.0)] = 0.75
    drift_max_prior_shift: Fraction = 0.1
    shown: PositiveInt = 24
    severity: AuditSeverityParams = AuditSeverityParams()


class ModelParams(_Section):
    backbone: str = "tf_efficientnet_lite0"
    weights: str = "bundled"  # bundled | hub | none | file:<path>
    head: Literal["linear", "mlp", "se_mlp"] = "linear"
    head_hidden: PositiveInt = 512
    se_reduction: PositiveInt = 16  # se_mlp: the SE gate's bottleneck is features / se_reduction
    drop_rate: Fraction = 0.2
    image_size: PositiveInt | None = None  # None: the backbone's pretrained input size
    crop_pct: Annotated[float, Field(gt=0.0, le=1.0)] | None = None  # None: the backbone's (timm's crop_pct)

    @field_validator("weights")
    @classmethod
    def _weights_source(cls, weights: str) -> str:
        if weights not in {"bundled", "hub", "none"} and not weights.startswith("file:"):
            raise ValueError("expected bundled | hub | none | file:<path>")
        return weights


class AugmentParams(_Section):
    scale_min: Fraction = 0.6
    hflip: Fraction = 0.5
    color_jitter: Annotated[float, Field(ge=0.0)] = 0.0
    auto_augment: Literal["none", "trivial", "randaugment"] = "none"
    random_erasing: Fraction = 0.0
    mixup_alpha: Annotated[float, Field(ge=0.0)] = 0.0
    cutmix_alpha: Annotated[float, Field(ge=0.0)] = 0.0


class DistillParams(_Section):
    """Knowledge distillation from a trained teacher (Hinton et al. 2015); teacher "none" = off."""

    teacher: str = "none"  # none | champion | <path to a model.pt of this pipeline>
    alpha: Fraction = 0.5  # weight of the teacher's soft targets; 1 - alpha on the labels
    temperature: PositiveFloat = 4.0


class TrainParams(_Section):
    strategy: Literal["linear_probe", "partial", "full", "progressive"] = "progressive"
    epochs: PositiveInt = 11
    time_limit_min: PositiveFloat | None = None  # the epochs' time budget: fewer epochs when they won't fit
    batch_size: PositiveInt = 32
    eval_batch_size: PositiveInt | None = None  # None: 2 x batch_size on GPU, 16 on CPU
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: PositiveFloat = 1e-4
    head_lr_mult: PositiveFloat = 10.0
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.05
    momentum: Fraction = 0.9
    warmup_epochs: Annotated[float, Field(ge=0.0)] = 1.0
    schedule: Literal["cosine", "cosine_restarts", "step"] = "cosine"  # after each phase's warm-up
    restart_epochs: PositiveFloat = 2.0  # cosine_restarts: length of the first cycle (SGDR's T_0)
    restart_mult: Annotated[float, Field(ge=1.0)] = 1.0  # cosine_restarts: each cycle this much longer
    step_milestones: list[Annotated[float, Field(gt=0.0)]] = Field(default_factory=lambda: [3.0, 6.0])
    step_gamma: PositiveFloat = 0.1  # step: the lr is multiplied by this at each milestone
    label_smoothing: Fraction = 0.1
    class_weighting: Literal["none", "inverse", "effective"] = "none"
    balanced_sampler: bool = False
    grad_accum_steps: PositiveInt = 1
    grad_clip_norm: Annotated[float, Field(ge=0.0)] = 1.0
    early_stopping_metric: Literal["val_acc", "val_loss", "val_f1"] = "val_acc"
    early_stopping_patience: NonNegInt = 3
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    trainable_blocks: NonNegInt | None = 5  # block groups trained, from the top; None = all
    progressive_head_epochs: NonNegInt = 5
    progressive_unfreeze_every: NonNegInt = 0  # epochs between unfreezing one more block group; 0 = never
    freeze_bn: bool = True
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"
    nproc_per_node: Literal["auto"] | PositiveInt = 1  # >1: the stage starts itself under torchrun
    dist_timeout_min: PositiveFloat = 60.0  # collectives' timeout, cache builds included
    channels_last: bool = True
    compile: bool = False
    num_workers: NonNegInt | None = None  # None: 0 on CPU (cores go to the model), up to 8 per GPU
    pin_memory: bool = True
    persistent_workers: bool = True
    overfit_gap_warning: Fraction = 0.15
    checkpoint_every_s: Annotated[float, Field(ge=0.0)] = 60.0
    augment: AugmentParams = AugmentParams()
    distill: DistillParams = DistillParams()


class EvaluateParams(_Section):
    top_k: PositiveInt = 3
    tta: bool = False
    calibration_bins: PositiveInt = 15
    mistakes_shown: PositiveInt = 16
    batch_size: PositiveInt = 64


class QuantizeParams(_Section):
    enabled: bool = True
    method: Literal["static", "dynamic"] = "static"  # dynamic: weights only, no calibration images
    calibration_images: PositiveInt = 64
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True
    exclude_nodes: list[str] = Field(default_factory=list)
    formats: Annotated[list[Literal["u8s8", "u8s8_reduce_range", "u8u8", "s8s8"]], Field(min_length=1)] = (
        Field(default_factory=lambda: ["u8s8", "u8s8_reduce_range"])
    )
    min_agreement: Fraction = 0.95
    alpha: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.05
    min_speedup: Annotated[float, Field(ge=0.0)] = 1.2
    on_reject: Literal["fp32_only", "error"] = "fp32_only"
    benchmark_repeats: PositiveInt = 20


class ExportParams(_Section):
    opset: Annotated[int, Field(ge=13)] = 18
    min_top1_agreement: Fraction = 0.999
    fp16: bool = False  # also write model.fp16.onnx (half weights, float32 inputs/outputs) for GPU providers


class OrchestrateParams(_Section):
    """The Prefect flow around the DVC stages; no stage reads this, so changing it re-runs nothing."""

    retries: NonNegInt = 2  # per stage, only for transient errors (DVC lock contention, I/O hiccups)
    retry_delay_seconds: Annotated[float, Field(ge=0.0)] = 10.0
    # The gate compares the new model and the champion on the same test images (pipeline.champion).
    promote_margin: Annotated[float, Field(ge=0.0, le=1.0)] = 0.005  # largest accepted accuracy loss
    promote_alpha: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.05  # McNemar: reject a loss below this p
    push: bool = False  # dvc pull before the run, dvc push (outputs, run cache) after; needs a default remote
    on_drift: Literal["ignore", "warn", "stop"] = "warn"  # when the audit finds the new data drifted


# The `validate` section shadows pydantic's deprecated BaseModel.validate; the name is the stage's, so the
# warning pydantic raises at class creation is silenced here and nowhere else.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "validate"', category=UserWarning)

    class Params(_Section):
        """The whole of `params.yaml`."""

        base: BaseParams = BaseParams()
        paths: PathsParams = PathsParams()
        ingest: IngestParams = IngestParams()
        validate: ValidateParams = ValidateParams()
        audit: AuditParams = AuditParams()
        split: SplitParams = SplitParams()
        model: ModelParams = ModelParams()
        train: TrainParams = TrainParams()
        evaluate: EvaluateParams = EvaluateParams()
        quantize: QuantizeParams = QuantizeParams()
        export: ExportParams = ExportParams()
        orchestrate: OrchestrateParams = OrchestrateParams()

        @classmethod
        def load(
            cls, path: Path | str = DEFAULT_PARAMS_FILE, overrides: dict[str, Any] | None = None
        ) -> Params:
            """Parse a params file (plus optional dotted overrides such as {"train.lr": 1e-3})."""
            path = Path(path)
            raw = _read_mapping(path)
            for dotted, value in (overrides or {}).items():
                set_dotted(raw, dotted, value)
            params = cls.from_dict(raw, source=str(path))
            _check_outputs_inside(params.paths, path.parent, source=str(path))
            return params

        @classmethod
        def from_dict(cls, raw: dict[str, Any], source: str = "params") -> Params:
            try:
                return cls.model_validate(raw)
            except ValidationError as exc:
                raise _invalid(source, _describe(exc)) from None

        def to_dict(self) -> dict[str, Any]:
            """JSON-safe dict (paths as strings) that travels inside checkpoints and exports."""
            return self.model_dump(mode="json")


def _read_mapping(path: Path) -> dict[str, Any]:
    """The params file's top-level mapping; a missing, empty, unparsable or non-mapping file is refused."""
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found; run from the project root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        raise ParamsError(
            f"{path}: empty; copy the shipped params.yaml (git checkout -- params.yaml) and edit it"
        )
    if not isinstance(raw, dict):
        raise ParamsError(
            f"{path}: expected a mapping of sections at the top level; copy the shipped params.yaml, edit it"
        )
    return raw


# Inputs may live anywhere; every other path is written (some folders are replaced whole by a stage).
_INPUT_PATHS = {"data_root", "csv_manifest"}


def _check_outputs_inside(paths: PathsParams, project: Path, source: str) -> None:
    """Refuse output paths outside the project folder (the params file's): relative ones that climb out
    with `..`, absolute ones elsewhere, and the folder itself. A stage replacing `paths.export_dir: /home/me`
    as a whole would delete it, and DVC refuses outputs outside the repository anyway."""
    root = os.path.abspath(project)
    problems = []
    for key, value in paths:
        if key in _INPUT_PATHS:
            continue
        target = os.path.normpath(os.path.join(root, value))  # an absolute `value` stays as it is
        if os.path.commonpath([root, target]) != root or target == root:
            problems.append(
                f"paths.{key}: {value} is not inside the project folder {root}; use a path inside it, "
                "relative to it and without `..` (e.g. the shipped params.yaml's)"
            )
    if problems:
        raise _invalid(source, problems)


def _invalid(source: str, problems: list[str]) -> ParamsError:
    """One problem: one line; several: a line each under the file's name."""
    joined = f": {problems[0]}" if len(problems) == 1 else "\n  " + "\n  ".join(problems)
    return ParamsError(f"{source}: invalid params{joined}")


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `dotted` (e.g. "train.augment.hflip") in nested mappings, creating missing sections; raises a
    ParamsError when a parent is a value, not a section."""
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ParamsError(f"{dotted}: {key} is not a section")
    node[leaf] = value


_EXPECTATIONS = {
    "greater_than": "expected a positive number",
    "greater_than_equal": "expected a number >= {ge}",
    "less_than_equal": "expected a number <= {le}",
    "less_than": "expected a number < {lt}",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "finite_number": "expected a finite number",
    "extra_forbidden": "unknown key{suggestion} (see README 'Params reference')",
    "model_type": "expected a section (a mapping of keys)",
}


_PARSING = {"float_parsing", "float_type", "int_parsing", "int_type"}
_BOUNDED = _PARSING | {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
_SYMBOLS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _section(loc: tuple) -> type[BaseModel] | None:
    """The section model at `loc`: Params for (), TrainParams for ('train',); None if `loc` is no section."""
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _accepted(loc: tuple) -> str | None:
    """What the field at `loc` accepts: 'a positive integer', 'a number >= 0.0 and <= 1.0'."""
    section = _section(loc[:-1])
    field = section.model_fields.get(str(loc[-1])) if section else None
    if field is None:
        return None
    found = ((op, getattr(meta, op, None)) for meta in field.metadata for op in _SYMBOLS)
    bounds = {op: value for op, value in found if value is not None}
    if not bounds:
        return None
    noun = "integer" if field.annotation is int else "number"
    if bounds == {"gt": 0}:
        return f"a positive {noun}"
    article = "an" if noun == "integer" else "a"
    return f"{article} {noun} " + " and ".join(f"{_SYMBOLS[op]} {value}" for op, value in bounds.items())


def _describe(exc: ValidationError) -> list[str]:
    """One 'dotted.key: what is expected, got what' line per error."""
    lines = []
    for err in exc.errors():
        # 'function-after[...]' names a validator, '[key]' marks a bad mapping key: neither is a params key.
        parts = [str(part) for part in err["loc"]]
        key = ".".join(part for part in parts if not part.startswith("function-") and part != "[key]")
        kind = err["type"]
        if kind == "literal_error":
            expected = f"expected one of {err['ctx']['expected']}"
        elif kind in _BOUNDED and (accepted := _accepted(err["loc"])):
            expected = f"expected {accepted}"
        elif kind == "extra_forbidden":
            expected = _EXPECTATIONS[kind].format(suggestion=_suggestion(err["loc"]))
        elif kind in _EXPECTATIONS:
            template = _EXPECTATIONS[kind]
            expected = template.format(**err.get("ctx", {})) if "{" in template else template
            if kind == "greater_than" and err.get("ctx", {}).get("gt") not in (0, 0.0):
                expected = f"expected a number > {err['ctx']['gt']}"
        else:
            expected = err["msg"].removeprefix("Value error, ")
        # A section validator's message shows the offending values itself; its input is the whole section.
        section_wide = kind == "value_error" and isinstance(err.get("input"), dict)
        got = "" if kind == "extra_forbidden" or section_wide else f", got {err.get('input')!r}"
        lines.append(f"{key or '<root>'}: {expected}{got}")
    return lines


def _suggestion(loc: tuple) -> str:
    """'; did you mean train.lr?' for the unknown key train.lrr: the closest key of the same section."""
    section = _section(loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1) if section else []
    return f"; did you mean {'.'.join(map(str, (*loc[:-1], close[0])))}?" if close else ""
