"""Classify images with an export folder: ONNX Runtime, numpy and PIL only, so it runs where torch is absent.

Preprocessing is the export's `preprocess.json` applied by `pipeline.preprocess`, the same code the evaluate
stage uses, so predictions match evaluate's. Python use: `Predictor(model_dir).predict([image_or_path, ...])`.

Where the export carries them (evaluate calibrated both on val), each prediction also says whether the image
is `unknown` (unlike the training data, `pipeline.serving.unknown`) with its score, and, asked with
`sets=True`, its conformal prediction set (`pipeline.serving.conformal`).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
from PIL import Image
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.io import read_json
from pipeline.preprocess import IMAGE_EXTENSIONS, INTERPOLATIONS, open_rgb, preprocess
from pipeline.serving import onnx_runtime as rt
from pipeline.serving.conformal import Conformal, prediction_sets
from pipeline.serving.unknown import Detector

# What PIL raises for missing, truncated, corrupt or oversized files (some decoders raise SyntaxError), and a
# decode that does not fit in memory: each costs that file an error, never the batch.
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, MemoryError)
# What ONNX Runtime raises for a model file it cannot load (its own classes, not OSError or ValueError).
_ORT_LOAD_ERRORS = (
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.InvalidGraph,
    ort_state.InvalidProtobuf,
    ort_state.NotImplemented,
    ort_state.RuntimeException,
)
_REEXPORT = "re-run the export stage (dvc repro export) or copy the whole export folder again"
_PREPROCESS_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct")
_METADATA_KEYS = ("class_names", *_PREPROCESS_KEYS)  # what the export stage writes into every model file
_SIDE_PX = (8, 4096)  # sane input sides: below, nothing is recognisable; above, one image outgrows memory


class UsageError(PipelineError):
    """The run cannot start (no model, no inputs); the CLI exits 2."""


@dataclass
class Prediction:
    """One input's top-k (label, probability) pairs, best first, or the reason it could not be read; its
    conformal set (most probable first; None when not asked for) and unknown flag and score (None when the
    export has no detector)."""

    source: str
    labels: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    prediction_set: list[str] | None = None
    unknown: bool | None = None
    unknown_score: float | None = None
    scores: np.ndarray | None = None  # every class's probability, in class order (`predict(scores=True)`)

    @property
    def ok(self) -> bool:
        return self.error is None


class Predictor:
    """An export folder loaded once; `predict` takes PIL images and/or image paths.

    Probabilities are softmax(logits / temperature), the calibration temperature from the model's metadata;
    a multilabel export's are each label's sigmoid, and its answer is the set of labels at or above their
    thresholds (`top_k` does not apply).
    `provider` is an ONNX Runtime execution provider (`onnx_runtime.PROVIDERS`); on a GPU one, `auto`
    precision serves the FP16 model when the export has one.
    """

    def __init__(
        self, model_dir: Path | str, precision: str = "auto", batch_size: int = 32, provider: str = "auto"
    ):
        model_dir = Path(model_dir)
        for needed in (model_dir / rt.FP32_FILE, model_dir / rt.LABELS_FILE, model_dir / rt.PREPROCESS_FILE):
            if not needed.is_file():
                raise UsageError(
                    f"{needed}: not found; pass --model with an export folder (`python -m pipeline export`)"
                )
        try:
            self.provider, providers = rt.providers_for(provider)
        except PipelineError as exc:
            raise UsageError(str(exc)) from None
        self.class_names: list[str] = _read_labels(model_dir / rt.LABELS_FILE)
        self.data_config: dict[str, Any] = _read_preprocess(model_dir / rt.PREPROCESS_FILE)
        fp32 = _open_model(model_dir / rt.FP32_FILE, providers)
        gpu = self.provider in rt.GPU_PROVIDERS
        self.served, self.reason = served_model(model_dir, precision, rt.metadata(fp32), rt.cpu_info(), gpu)
        served = model_dir / rt.MODEL_FILES[self.served]
        self._session = fp32 if self.served == "fp32" else _open_model(served, providers)
        _check_fits(self._session, served, self.class_names, self.data_config)
        opened = {model_dir / rt.FP32_FILE: fp32, served: self._session}
        _check_models(model_dir, opened, self.class_names, self.data_config)
        meta = rt.metadata(self._session)
        self.temperature = _temperature(served, meta)
        self.thresholds = _thresholds(served, meta, len(self.class_names))  # label sets; None: one class
        self.separator = meta.get("label_separator", ";")  # how a label set is written as one cell
        self.conformal: Conformal | None = _conformal(served, meta)
        self.detector: Detector | None = _detector(served, meta, self._session)
        self.batch_size = batch_size

    def predict(
        self,
        items: Sequence[Image.Image | Path | str],
        top_k: int = 1,
        sets: bool = False,
        scores: bool = False,
    ) -> list[Prediction]:
        """Top-k predictions per item, in order, with the unknown flag where the export has a detector, the
        conformal set when `sets` and every class's probability when `scores`; an unreadable file gets an
        error and the run goes on."""
        if sets and self.conformal is None:
            raise UsageError(
                f"this export has no conformal threshold in its metadata, so no prediction sets; {_REEXPORT}"
            )
        results: list[Prediction | None] = [None] * len(items)
        with tqdm(
            total=len(items),
            unit="img",
            file=sys.stderr,
            disable=None if len(items) > self.batch_size else True,
        ) as bar:
            for start in range(0, len(items), self.batch_size):
                arrays, positions = [], []
                for position in range(start, min(start + self.batch_size, len(items))):
                    try:
                        arrays.append(self._prepare(items[position]))
                        positions.append(position)
                    except _READ_ERRORS as exc:
                        results[position] = Prediction(_name(items[position], position), error=_describe(exc))
                if arrays:
                    for position, result in zip(
                        positions, self._answers(np.stack(arrays), top_k, sets, scores), strict=True
                    ):
                        result.source = _name(items[position], position)
                        results[position] = result
                bar.update(min(self.batch_size, len(items) - start))
        return [result for result in results if result is not None]

    def probabilities(self, inputs: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) preprocessed inputs -> (N, K) calibrated class probabilities."""
        return self._calibrated(rt.logits(self._session, inputs, self.batch_size))

    def trust(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(N, 3, S, S) preprocessed inputs -> (N, K) calibrated probabilities, (N, K) bool conformal sets and
        (N,) unknown-input scores (each None where the export has no threshold for it)."""
        logits, features = rt.outputs(self._session, inputs, self.batch_size)
        probs = self._calibrated(logits)
        in_set = None if self.conformal is None else prediction_sets(probs, self.conformal)
        scores = None if self.detector is None else self.detector.scores(logits, features, self.temperature)
        return probs, in_set, scores

    def _calibrated(self, logits: np.ndarray) -> np.ndarray:
        if self.thresholds is not None:  # label sets: each label's own probability
            return 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -60, 60)))
        scaled = logits.astype(np.float64) / self.temperature
        scaled -= scaled.max(axis=1, keepdims=True)
        exp = np.exp(scaled)
        return exp / exp.sum(axis=1, keepdims=True)

    def _answers(self, inputs: np.ndarray, top_k: int, sets: bool, every: bool) -> list[Prediction]:
        """One Prediction per input row (its source filled in by the caller); `every`: with every class's
        probability."""
        probs, in_set, scores = self.trust(inputs)
        flagged = None if scores is None or self.detector is None else self.detector.unknown(scores)
        answers = []
        for row, p in enumerate(probs):
            answer = Prediction("", self._top(p, top_k) if self.thresholds is None else self._set(p))
            answer.scores = p if every else None
            if sets and in_set is not None:
                members = np.flatnonzero(in_set[row])
                answer.prediction_set = [
                    self.class_names[i] for i in members[np.argsort(-p[members], kind="stable")]
                ]
            if flagged is not None:
                answer.unknown, answer.unknown_score = bool(flagged[row]), float(scores[row])
            answers.append(answer)
        return answers

    def _prepare(self, item: Image.Image | Path | str) -> np.ndarray:
        image = item if isinstance(item, Image.Image) else open_rgb(item)
        return preprocess(image, self.data_config)

    def _set(self, probs: np.ndarray) -> list[tuple[str, float]]:
        """A multilabel export's answer: every label whose probability reaches its threshold, most probable
        first (none at all is an answer too)."""
        chosen = np.flatnonzero(probs >= self.thresholds)
        return [
            (self.class_names[i], float(probs[i])) for i in chosen[np.argsort(-probs[chosen], kind="stable")]
        ]

    def _top(self, probs: np.ndarray, top_k: int) -> list[tuple[str, float]]:
        order = np.argsort(-probs, kind="stable")[:top_k]
        return [(self.class_names[i], float(probs[i])) for i in order]


def _read_json(path: Path) -> Any:
    try:
        return read_json(path)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); {_REEXPORT}") from None
    except UnicodeDecodeError:
        raise PipelineError(f"{path}: not UTF-8 text; {_REEXPORT}") from None


def _read_labels(path: Path) -> list[str]:
    """The class names in logit order: a JSON list of distinct, non-empty strings."""
    names = _read_json(path)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise PipelineError(f"{path}: expected a JSON list of class names (strings); {_REEXPORT}")
    if len(set(names)) != len(names):
        raise PipelineError(f"{path}: a class name appears twice; {_REEXPORT}")
    return names


def _read_preprocess(path: Path) -> dict[str, Any]:
    """The eval preprocessing, every value within sane bounds (a tampered file would mis-size every image)."""
    config = _read_json(path)
    if not isinstance(config, dict):
        raise PipelineError(f"{path}: expected a JSON object of {', '.join(_PREPROCESS_KEYS)}; {_REEXPORT}")
    missing = [key for key in _PREPROCESS_KEYS if key not in config]
    problem = f"missing keys {missing}" if missing else _preprocess_problem(config)
    if problem:
        raise PipelineError(f"{path}: {problem}; {_REEXPORT}")
    return config


def _preprocess_problem(config: dict[str, Any]) -> str | None:
    """What is wrong with a data config's values, or None."""
    size, crop_pct = config["input_size"], config["crop_pct"]
    low, high = _SIDE_PX
    if not (_numbers(size, 3, int) and size[0] == 3 and all(low <= side <= high for side in size[1:])):
        return f"input_size must be [3, H, W] with sides of {low} to {high} px, got {size!r}"
    if not (_numbers([crop_pct], 1) and 0 < crop_pct <= 2):
        return f"crop_pct must be a number in (0, 2], got {crop_pct!r}"
    if config["interpolation"] not in INTERPOLATIONS:
        return f"interpolation must be one of {list(INTERPOLATIONS)}, got {config['interpolation']!r}"
    if not _numbers(config["mean"], 3):
        return f"mean must be 3 numbers (one per channel), got {config['mean']!r}"
    if not (_numbers(config["std"], 3) and all(value > 0 for value in config["std"])):
        return f"std must be 3 positive numbers (one per channel), got {config['std']!r}"
    return None


def _numbers(values: Any, count: int, kind: type = float) -> bool:
    """Whether `values` is a list of `count` finite numbers (integers if `kind` is int); booleans are not."""
    kinds = (int,) if kind is int else (int, float)
    return (
        isinstance(values, list)
        and len(values) == count
        and all(isinstance(v, kinds) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    )


def _open_model(
    path: Path, providers: Sequence[str] = ("CPUExecutionProvider",), optimize: bool = True
) -> Any:
    """An ONNX Runtime session of `path`; a file ONNX Runtime cannot load is one line naming it."""
    try:
        return rt.session(path, providers, optimize)
    except _ORT_LOAD_ERRORS as exc:
        raise PipelineError(
            f"{path}: not an ONNX model ONNX Runtime can load ({type(exc).__name__}); {_REEXPORT}"
        ) from None


def _check_models(
    model_dir: Path, opened: dict[Path, Any], class_names: list[str], data_config: dict[str, Any]
) -> None:
    """The opened model files, and the INT8 one where the export has it, carry the export's metadata and agree
    with labels.json and preprocess.json. The INT8 file is checked also where this CPU is served FP32, so an
    export folder gets the same verdict on every machine."""
    int8 = model_dir / rt.INT8_FILE
    if int8.is_file() and int8 not in opened:
        opened = {**opened, int8: _open_model(int8, optimize=False)}
    for model, session in opened.items():
        _check_metadata(model, rt.metadata(session), class_names, data_config)


def _check_metadata(
    model: Path, meta: dict[str, str], class_names: list[str], data_config: dict[str, Any]
) -> None:
    """The model file carries the export's metadata, and labels.json and preprocess.json still agree with it:
    an edited or reordered file would mislabel or mis-size every image without an error."""
    missing = [key for key in _METADATA_KEYS if key not in meta]
    if missing:
        raise PipelineError(
            f"{model}: no pipeline metadata ({', '.join(missing)}): not a model the export stage wrote, and "
            f"nothing to check {rt.LABELS_FILE} and {rt.PREPROCESS_FILE} against; {_REEXPORT}"
        )
    exported = {key: _metadata_value(model, meta, key) for key in _METADATA_KEYS}
    if exported["class_names"] != class_names:
        raise PipelineError(
            f"{model.parent / rt.LABELS_FILE}: {_label_difference(class_names, exported['class_names'])} in "
            f"{model.name}'s metadata (class_names), which names its outputs; {_REEXPORT}"
        )
    for key in _PREPROCESS_KEYS:
        if not _same(data_config[key], exported[key]):
            raise PipelineError(
                f"{model.parent / rt.PREPROCESS_FILE}: {key} is {data_config[key]!r} but {model.name} was "
                f"exported with {exported[key]!r} (its metadata); {_REEXPORT}"
            )


def _metadata_value(model: Path, meta: dict[str, str], key: str) -> Any:
    """One metadata value as the export stage wrote it: JSON, except the interpolation's name."""
    if key == "interpolation":
        return meta[key]
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError:
        raise PipelineError(
            f"{model}: metadata {key} is not valid JSON ({meta[key]!r}); {_REEXPORT}"
        ) from None


def _label_difference(ours: list[str], exported: Any) -> str:
    """Where labels.json departs from the model's class names, in a few words."""
    if not isinstance(exported, list) or len(exported) != len(ours):
        return f"{len(ours)} class names, but {len(exported) if isinstance(exported, list) else 'no list'}"
    index = next(i for i, (a, b) in enumerate(zip(ours, exported, strict=True)) if a != b)
    order = " (the same names in another order)" if sorted(ours) == sorted(exported) else ""
    return f"class {index} is {ours[index]!r}{order}, but {exported[index]!r}"


def _same(value: Any, exported: Any) -> bool:
    """Equal, numbers to within float rounding (JSON writers may print 0.875 as 0.8750000000000001)."""
    if isinstance(value, list) and isinstance(exported, list):
        return len(value) == len(exported) and all(_same(a, b) for a, b in zip(value, exported, strict=True))
    if _numbers([value], 1) and _numbers([exported], 1):
        return math.isclose(value, exported, rel_tol=1e-9, abs_tol=1e-12)
    return value == exported


def _temperature(model: Path, meta: dict[str, str]) -> float:
    """The calibration temperature in the model's metadata (1.0, plain softmax, when absent)."""
    try:
        temperature = float(meta.get("temperature", 1.0))
    except ValueError:
        temperature = math.nan
    if not (math.isfinite(temperature) and temperature > 0):
        raise PipelineError(
            f"{model}: metadata temperature must be a positive number, got {meta['temperature']!r}; "
            f"{_REEXPORT}"
        )
    return temperature


def _thresholds(model: Path, meta: dict[str, str], classes: int) -> np.ndarray | None:
    """A multilabel export's per-label probability thresholds (None for one class per image)."""
    if meta.get("task") != "multilabel":
        return None
    values = _metadata_value(model, meta, "thresholds") if "thresholds" in meta else None
    if not _numbers(values, classes):
        raise UsageError(f"{model}: its metadata key 'thresholds' is not {classes} numbers; {_REEXPORT}")
    return np.asarray(values, dtype=np.float64)


def _conformal(model: Path, meta: dict[str, str]) -> Conformal | None:
    """The conformal threshold evaluate calibrated on val, from the model's metadata (None: an export from
    before prediction sets)."""
    if "conformal" not in meta:
        return None
    return Conformal.from_json(_metadata_value(model, meta, "conformal"), f"{model} metadata conformal")


def _detector(model: Path, meta: dict[str, str], session: Any) -> Detector | None:
    """The unknown-input detector evaluate fitted, from the model's metadata, with the export's feature bank
    for knn (None: an export from before the detector)."""
    if "unknown" not in meta:
        return None
    settings = _metadata_value(model, meta, "unknown")
    bank = None
    if isinstance(settings, dict) and settings.get("detector") == "knn":
        bank = _feature_bank(model.parent / rt.FEATURE_BANK_FILE, session, model)
    return Detector.from_settings(settings, bank, f"{model} metadata unknown")


def _feature_bank(path: Path, session: Any, model: Path) -> np.ndarray:
    """The knn detector's (M, C) train features as stored (float16), checked against the model's features
    output; the detector derives its float32 search index from them once."""
    if not rt.has_features(session):
        raise PipelineError(f"{model}: outputs no features for the knn unknown-input detector; {_REEXPORT}")
    try:
        bank = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: cannot read the knn feature bank ({exc}); {_REEXPORT}") from None
    width = session.get_outputs()[1].shape[-1]
    if (
        bank.ndim != 2
        or len(bank) == 0
        or bank.dtype.kind != "f"
        or (isinstance(width, int) and bank.shape[1] != width)
    ):
        raise PipelineError(
            f"{path}: expected a non-empty (images, {width}) float array of features, got {bank.dtype} "
            f"{bank.shape}; {_REEXPORT}"
        )
    return bank


def _check_fits(session: Any, model: Path, class_names: list[str], data_config: dict[str, Any]) -> None:
    """The labels and the preprocessed size agree with the model's output and input (where they are fixed)."""
    classes = session.get_outputs()[0].shape[-1]
    if isinstance(classes, int) and classes != len(class_names):
        raise PipelineError(
            f"{model.parent / rt.LABELS_FILE}: {len(class_names)} class names but {model.name} outputs "
            f"{classes} scores; {_REEXPORT}"
        )
    inputs = session.get_inputs()[0].shape[1:]  # (channels, height, width); a dynamic one is a name
    wanted = data_config["input_size"]
    if any(isinstance(have, int) and have != want for have, want in zip(inputs, wanted, strict=False)):
        raise PipelineError(
            f"{model.parent / rt.PREPROCESS_FILE}: input_size {wanted} but {model.name} takes {inputs}; "
            f"{_REEXPORT}"
        )


def served_model(
    model_dir: Path, precision: str, meta: dict[str, str], cpu: dict, gpu: bool = False
) -> tuple[str, str]:
    """Which file to run ("fp32", "int8" or "fp16") and why: what was asked for; else FP16 on a GPU provider
    when the export has it; else what the export serves, unless its INT8 format is not portable (its
    agreement was measured with VNNI) and this x86 CPU has none (its kernels can saturate there)."""
    has_int8, has_fp16 = (model_dir / rt.INT8_FILE).is_file(), (model_dir / rt.FP16_FILE).is_file()
    if precision == "fp32":
        return "fp32", "asked for FP32"
    if precision == "fp16":
        if not has_fp16:
            raise UsageError(
                f"{model_dir / rt.FP16_FILE}: this export has no FP16 model; set export.fp16: true and "
                "re-run the export stage, or run with --precision fp32"
            )
        return "fp16", "asked for FP16"
    if precision == "auto" and gpu and has_fp16:
        return "fp16", "a GPU provider, and the export has an FP16 model"
    if precision == "int8":
        if not has_int8:
            raise UsageError(
                f"{model_dir / rt.INT8_FILE}: this export has no INT8 model "
                f"({meta.get('served_reason', 'the quantize stage shipped none')}); run with --precision fp32"
            )
        return "int8", "asked for INT8"
    if not has_int8 or meta.get("served") == "fp32":
        return "fp32", meta.get("served_reason", "this export has no INT8 model")
    fmt = meta.get("int8_format", "unknown")
    if fmt not in rt.PORTABLE_INT8 and cpu.get("vnni") is False:
        return "fp32", (
            f"the INT8 model ({fmt}) was checked on {meta.get('int8_checked_on', 'another CPU')}; this CPU "
            "has no VNNI, where its kernels can saturate (use --precision int8 to run it anyway)"
        )
    return "int8", meta.get("served_reason", "the export serves INT8")


def expand_inputs(args: Sequence[str]) -> tuple[list[str], list[Prediction]]:
    """Files named by `args` (files, folders searched recursively for images, globs), and an error per arg
    that names nothing."""
    files: list[str] = []
    errors: list[Prediction] = []
    for arg in args:
        found = _expand(arg)
        if found:
            files.extend(found)
        else:
            reason = (
                "no image files in this folder" if Path(arg).is_dir() else "no such file, folder or match"
            )
            errors.append(Prediction(arg, error=reason))
    return list(dict.fromkeys(files)), errors


def predict_paths(
    args: Sequence[str], predictor: Predictor, top_k: int = 1, sets: bool = False
) -> list[Prediction]:
    """What `python -m pipeline predict` does: expand the inputs, then predict every file."""
    files, errors = expand_inputs(args)
    if not files:
        raise UsageError(f"no image files found in {', '.join(args) or 'the inputs'}")
    return predictor.predict(files, top_k, sets) + errors


def format_predictions(results: Sequence[Prediction], fmt: str) -> str:
    """Results as an aligned `table`, `json` (a list of objects) or `csv` (one row per path and rank)."""
    return _FORMATTERS[fmt](results)


def _table(results: Sequence[Prediction]) -> str:
    width = max([len("path"), *(len(r.source) for r in results)])
    rows = [f"{'path':<{width}}  prediction (probability)"]
    for r in results:
        shown = (
            ("   ".join(f"{label} ({prob:.3f})" for label, prob in r.labels) or "(no label)") + _trust_note(r)
            if r.ok
            else f"ERROR {r.error}"
        )
        rows.append(f"{r.source:<{width}}  {shown}")
    return "\n".join(rows)


def _trust_note(r: Prediction) -> str:
    """The set and the unknown mark after a table row's labels."""
    note = "" if r.prediction_set is None else f"   set {{{', '.join(r.prediction_set)}}}"
    if r.unknown:
        note += f"   UNKNOWN (score {r.unknown_score:.3f})"
    return note


def _json(results: Sequence[Prediction]) -> str:
    payload = [
        {
            "path": r.source,
            "predictions": [{"label": label, "probability": prob} for label, prob in r.labels],
            "error": r.error,
            **({} if r.prediction_set is None else {"set": r.prediction_set}),
            **({} if r.unknown is None else {"unknown": r.unknown, "unknown_score": r.unknown_score}),
        }
        for r in results
    ]
    return json.dumps(payload, indent=2)


def _csv(results: Sequence[Prediction]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "rank", "label", "probability", "error", "set", "unknown", "unknown_score"])
    for r in results:
        if not r.ok:
            writer.writerow([r.source, "", "", "", r.error, "", "", ""])
        trust = [
            "" if r.prediction_set is None else "|".join(r.prediction_set),
            "" if r.unknown is None else str(r.unknown).lower(),
            "" if r.unknown_score is None else f"{r.unknown_score:.6f}",
        ]
        for rank, (label, prob) in enumerate(r.labels, start=1):
            writer.writerow([r.source, rank, label, f"{prob:.6f}", "", *trust])
    return buffer.getvalue().rstrip("\n")


_FORMATTERS = {"table": _table, "json": _json, "csv": _csv}


def _expand(arg: str) -> list[str]:
    path = Path(arg)
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if path.is_file():
        return [arg]
    if any(char in arg for char in "*?["):
        matches = sorted(glob.glob(arg, recursive=True))
        return [file for match in matches if _is_image_or_dir(match) for file in _expand(match)]
    return []


def _is_image_or_dir(path: str) -> bool:
    return Path(path).is_dir() or Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _name(item: Image.Image | Path | str, position: int) -> str:
    return f"<image {position}>" if isinstance(item, Image.Image) else str(item)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):  # PIL's says nothing more
        return f"MemoryError: the image does not fit in memory{f' ({exc})' if str(exc) else ''}"
    return f"{type(exc).__name__}: {exc}"
