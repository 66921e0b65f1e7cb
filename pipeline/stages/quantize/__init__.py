"""Stage: quantize. FP32 ONNX export, then post-training static INT8 quantization with ONNX Runtime in each
candidate format; every candidate is compared with FP32 on the same val+test images and timed on this CPU, and
the best one that passes the gate is shipped. None passing is not a failure by default: FP32 is served alone.

Static quantization (`quantize.method: static`: activation ranges calibrated on train images, QDQ format,
per-channel weights) makes the convolutions INT8. Dynamic quantization (`method: dynamic`) stores the weights
in INT8 and quantizes activations on the fly from each batch's own range: no calibration images are needed,
which suits transformers (MatMul) where calibration data is scarce; ORT runs convolutions quantized this way
as ConvInteger, usually slower than FP32, so the speed gate tends to keep FP32 for CNNs.

The gate is paired (both models on the same images), so one or two images flipping on a small test set cannot
fail it, while a real loss still does: INT8 is rejected when an exact one-sided McNemar test says it is less
accurate (p < `alpha`), when even the upper confidence bound of its top-1 agreement with FP32 is below
`min_agreement`, or when it is not `min_speedup` times faster than FP32 at batch 1 on this CPU.

Formats (`int8`): a portable one (the same integers on every x86 CPU) ships before the others when it passes.
The quantization-aware fine-tune (`qat`) first trains a copy of the model for each format's weight grid; the
sensitivity search (`search`) leaves the few nodes whose quantization costs most in FP32.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import stats, timing
from pipeline.calibration import label_thresholds
from pipeline.config import Params, PathsParams, QuantizeParams
from pipeline.data.labels import SINGLE, LabelSets
from pipeline.data.sampling import stratified_sample
from pipeline.data.splits import read_split
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, read_json, write_json
from pipeline.models import TrainedModel, load_trained
from pipeline.serving import onnx_runtime as rt
from pipeline.stages import Stage
from pipeline.stages.quantize.int8 import prepare
from pipeline.stages.quantize.qat import Tuner
from pipeline.stages.quantize.search import quantize_searched, search_probe

STAGE = Stage(
    summary="ONNX export and INT8 candidates judged against FP32; the best passing one ships.",
    params=("base.seed", "base.task", "base.label_separator", "quantize", "export.opset"),
    deps=("model", "splits", "calibration"),  # calibration: a multilabel task's per-label thresholds
    outs=("onnx_dir",),
)

log = logging.getLogger(__name__)

COMPARED_SPLITS = ("val", "test")

_CANDIDATES = "candidates"  # a scratch folder inside the stage's output while it runs


@dataclass
class Candidate:
    """One INT8 format quantized, compared with FP32 on the val+test images and timed at batch 1."""

    format: str
    comparison: stats.PairedComparison
    batch1_ms: float
    speedup: float
    rejected_because: list[str]
    fp32_nodes: list[str] = field(default_factory=list)  # left in FP32 by the sensitivity search
    search: dict = field(default_factory=dict)  # what the search measured, empty where it did not run
    qat: dict = field(default_factory=dict)  # what the quantization-aware fine-tune measured (empty: none)
    label_agreement: float | None = None  # label sets: share of (image, label) answers equal to FP32's

    @property
    def passed(self) -> bool:
        return not self.rejected_because

    @property
    def portable(self) -> bool:
        """Its integers, and so its agreement with FP32, are the same on every x86 CPU."""
        return self.format in rt.PORTABLE_INT8


def run(params: Params) -> dict:
    q, paths = params.quantize, params.paths
    trained = load_trained(paths.model)
    sets = LabelSets.of(params.base.task, params.base.label_separator)
    decide = Decisions.of(sets, paths.calibration, trained.class_names)
    inputs, truth, n_val = compared_images(paths, trained.class_names, trained.data_config, sets)
    labels = decide.of_truth(truth)
    with atomic_dir(paths.onnx_dir) as out:
        fp32 = rt.export_onnx(
            trained.model, out / rt.FP32_FILE, trained.data_config["input_size"], params.export.opset
        )
        fp32_logits = rt.logits(rt.session(fp32), inputs)
        fp32_pred = decide(fp32_logits)
        report = {
            "cpu": rt.cpu_info(),
            "compared": {"splits": list(COMPARED_SPLITS), "n": len(labels)},
            "method": q.method,
            "torch": timing.speed(_torch_runner(trained.model), inputs, q.benchmark_repeats),
            "fp32": _runtime_figures(fp32, inputs, q.benchmark_repeats),
        }
        candidates: list[Candidate] = []
        if q.enabled:
            calibration = (
                calibration_images(
                    paths, trained.class_names, trained.data_config, q, params.base.seed, decide
                )
                if q.method == "static"
                else None
            )
            val = slice(0, n_val)
            probe = search_probe(inputs[val], labels[val], fp32_logits[val], q, params.base.seed)
            tuner = qat_tuner(params, trained, decide)
            candidates = _try_formats(out, calibration, (inputs, labels, fp32_pred), probe, q, decide, tuner)
        chosen = choose(candidates)
        report["decision"] = _decision(chosen, candidates, report["cpu"])
        report["candidates"] = [_candidate_row(c) for c in candidates]
        if chosen is not None:
            shutil.move(out / _CANDIDATES / f"{chosen.format}.onnx", out / rt.INT8_FILE)
            report["int8"] = _runtime_figures(out / rt.INT8_FILE, inputs, q.benchmark_repeats)
        shutil.rmtree(out / _CANDIDATES, ignore_errors=True)
        write_json(out / rt.QUANTIZE_REPORT, report)

    metrics = headline(report, float(np.mean(fp32_pred == labels)), chosen or _most_agreeing(candidates))
    write_json(paths.metrics("quantize"), metrics)
    log.info("INT8: %s", report["decision"]["reason"])
    if candidates and chosen is None and q.on_reject == "error":
        raise PipelineError(
            f"INT8 rejected: {report['decision']['reason']} "
            f"(see {Path(paths.onnx_dir) / rt.QUANTIZE_REPORT}). "
            "Set quantize.on_reject: fp32_only to export FP32 alone, or try other quantize.formats, "
            "quantize.calibration_images, quantize.calibration_method, quantize.sensitivity_max_nodes or "
            "quantize.exclude_nodes"
        )
    return metrics


class Decisions:
    """How logits read as the predictions the gate compares: the top class, or (label sets) the set of labels
    whose probability reaches its threshold (evaluate's, in `paths.calibration`). A set is coded as an
    integer, the same for equal sets, so agreement, accuracy (the whole set right) and McNemar's test count
    whole sets as they count classes."""

    def __init__(self, sets: LabelSets, logit_thresholds: np.ndarray | None = None):
        self.sets, self.logit_thresholds = sets, logit_thresholds
        self._codes: dict[bytes, int] = {}

    @classmethod
    def of(cls, sets: LabelSets, calibration: Path, names: list[str]) -> Decisions:
        """For the task of `sets`; label sets read each label's threshold from `calibration`.

        Raises:
            PipelineError: label sets without evaluate's thresholds for every label of the model.
        """
        if not sets.multilabel:
            return cls(sets)
        record = read_json(calibration) if Path(calibration).is_file() else {}
        probability = np.clip(label_thresholds(record, names, calibration), 1e-7, 1 - 1e-7)
        return cls(sets, np.log(probability / (1 - probability)))  # p >= t exactly when logit >= logit(t)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if self.logit_thresholds is None:
            return logits.argmax(1)
        return self.of_truth(logits >= self.logit_thresholds)

    def of_truth(self, truth: np.ndarray) -> np.ndarray:
        """(N,) codes of (N, K) bool rows; class indices pass through."""
        if truth.ndim == 1:
            return truth
        packed = np.packbits(truth.astype(bool), axis=1)
        return np.array([self._codes.setdefault(row.tobytes(), len(self._codes)) for row in packed])

    def label_agreement(self, first: np.ndarray, second: np.ndarray) -> float | None:
        """The share of (image, label) answers two models' coded sets agree on; None for one class per
        image (its agreement is the images')."""
        if self.logit_thresholds is None:
            return None
        rows = {code: np.frombuffer(key, dtype=np.uint8) for key, code in self._codes.items()}
        differ = [
            np.unpackbits(rows[a] ^ rows[b])[: len(self.logit_thresholds)].sum()
            for a, b in zip(first, second, strict=True)
        ]
        return 1.0 - float(np.sum(differ)) / max(len(first) * len(self.logit_thresholds), 1)


def _try_formats(
    out: Path,
    calibration: np.ndarray | None,
    compared: tuple,
    probe: tuple,
    q: QuantizeParams,
    decide: Decisions,
    tuner: Tuner | None = None,
) -> list[Candidate]:
    """Quantize in each of `q.formats`, portable ones first, into out/candidates/<format>.onnx and judge each
    against FP32 on the `compared` (inputs, labels, FP32's predictions; `decide` reads logits as
    predictions); speed is timed right after FP32's.
    For each format that could still ship (every portable one, and the others while no portable one has
    passed), the `tuner` (if any) first fine-tunes a copy of the model for that format (quantization-aware;
    that copy is quantized, with its own activation ranges), and the sensitivity search runs on the `probe`
    (val inputs, FP32's logits)."""
    inputs, labels, fp32_pred = compared
    fp32 = _ort_runner(rt.session(out / rt.FP32_FILE))
    scratch = out / _CANDIDATES
    scratch.mkdir()
    prepared = prepare(out / rt.FP32_FILE, scratch / "prepared.onnx", q.exclude_nodes)
    cache = scratch / "calibration.json"  # activation ranges: the first quantization writes, the others read
    candidates: list[Candidate] = []
    for name in sorted(q.formats, key=lambda f: f not in rt.PORTABLE_INT8):
        how = f"{len(calibration)} calibration images, {q.calibration_method}" if q.method == "static" else ""
        log.info("quantizing as %s (%s)", name, how or "dynamic: weights only")
        could_ship = name in rt.PORTABLE_INT8 or not any(c.passed and c.portable for c in candidates)
        source, ranges, qat = prepared, cache, {}
        if tuner is not None and could_ship:  # a tuned copy has activation ranges of its own
            (source, qat), ranges = tuner.prepared(name, scratch), scratch / f"{name}.calibration.json"
        target = scratch / f"{name}.onnx"
        nodes, search = quantize_searched(source, target, calibration, name, q, probe, ranges, could_ship)
        sess = rt.session(target)
        int8_pred = decide(rt.logits(sess, inputs))
        comparison = stats.compare(fp32_pred, int8_pred, labels, 1.0 - q.alpha)
        fp32_ms, batch1_ms = timing.adjacent_batch1_ms(fp32, _ort_runner(sess), inputs, q.benchmark_repeats)
        speedup = fp32_ms / batch1_ms
        reasons = gate(comparison, speedup, q)
        per_label = decide.label_agreement(fp32_pred, int8_pred)
        candidates.append(
            Candidate(name, comparison, batch1_ms, speedup, reasons, nodes, search, qat, per_label)
        )
    return candidates


def gate(comparison: stats.PairedComparison, speedup: float, q: QuantizeParams) -> list[str]:
    """Why an INT8 candidate must not ship (empty: it may)."""
    c, reasons = comparison, []
    if c.p_worse < q.alpha:
        reasons.append(
            f"less accurate than FP32 (wrong on {c.worse} images FP32 gets right, right on {c.better} it "
            f"gets wrong: McNemar p = {c.p_worse:.3g} < quantize.alpha = {q.alpha:g})"
        )
    if c.agreement_upper < q.min_agreement:
        reasons.append(
            f"agrees with FP32 on {c.agreement:.1%} of {c.n} images (upper bound {c.agreement_upper:.1%} < "
            f"quantize.min_agreement = {q.min_agreement:g})"
        )
    if speedup < q.min_speedup:
        reasons.append(
            f"{speedup:.2f}x the speed of FP32 at batch 1 (< quantize.min_speedup = {q.min_speedup:g})"
        )
    return reasons


def choose(candidates: list[Candidate]) -> Candidate | None:
    """The passing candidate to ship: a portable one if any passed (its agreement holds on every x86 CPU),
    then the one that agrees with FP32 most often, then the faster; None if none passed."""
    passed = [c for c in candidates if c.passed]
    return max(passed, key=lambda c: (c.portable, c.comparison.agreement, c.speedup), default=None)


def _most_agreeing(candidates: list[Candidate]) -> Candidate | None:
    return max(candidates, key=lambda c: c.comparison.agreement, default=None)


def _decision(chosen: Candidate | None, candidates: list[Candidate], cpu: dict) -> dict:
    if not candidates:
        return {"shipped": False, "format": "none", "reason": "quantization is off (quantize.enabled: false)"}
    if chosen is None:
        why = "; ".join(f"{c.format}: {' and '.join(c.rejected_because)}" for c in candidates)
        return {"shipped": False, "format": "none", "reason": f"no INT8 format passed the gate ({why})"}
    c = chosen.comparison
    count = len(chosen.fp32_nodes)
    kept = f", {count} node{'s' if count > 1 else ''} left in FP32" if count else ""
    return {
        "shipped": True,
        "format": chosen.format,
        "reason": f"{chosen.format}{kept} agrees with FP32 on {c.agreement:.1%} of {c.n} val+test images "
        f"({c.candidate_accuracy:.1%} vs {c.reference_accuracy:.1%} accuracy) and runs {chosen.speedup:.2f}x "
        "as fast at batch 1 on this CPU",
        "checked_for": checked_for(chosen.format, cpu),
    }


def checked_for(fmt: str, cpu: dict) -> str:
    """Which CPUs the shipped format's agreement holds on, in words for the report, the card and predict."""
    here = f"{cpu.get('model', 'this CPU')} (VNNI: {cpu.get('vnni')})"
    if fmt in rt.PORTABLE_INT8:
        return f"measured on {here}; {fmt} computes the same integers on every x86 CPU, with or without VNNI"
    return f"measured on {here} only; its kernels can saturate on x86 CPUs without VNNI (predict serves FP32)"


def headline(report: dict, fp32_accuracy: float, int8: Candidate | None) -> dict:
    """The few figures `dvc exp show` compares: the shipped candidate's, else the one agreeing most."""
    metrics = {
        "fp32_accuracy": fp32_accuracy,
        "int8_shipped": report["decision"]["shipped"],
        "int8_format": report["decision"]["format"],
        "int8_portable": report["decision"]["format"] in rt.PORTABLE_INT8,
    }
    if int8 is not None:
        metrics.update(
            int8_accuracy=int8.comparison.candidate_accuracy,
            top1_agreement=int8.comparison.agreement,
            int8_speedup_batch1=int8.speedup,
        )
    if "int8" in report:
        metrics["int8_mb"] = report["int8"]["mb"]
    return metrics


def _runtime_figures(model: Path, inputs: np.ndarray, repeats: int) -> dict[str, float]:
    sess = rt.session(model)
    return {**timing.speed(_ort_runner(sess), inputs, repeats), "mb": rt.file_mb(model)}


def compared_images(
    paths: PathsParams, names: list[str], cfg: dict, sets: LabelSets = SINGLE
) -> tuple[np.ndarray, np.ndarray, int]:
    """The val and test images (val first), preprocessed as predict does, their class indices (a multilabel
    task's: (N, K) bool rows), and how many are val."""
    parts = [read_split(paths.splits, paths.data_root, split, names, sets) for split in COMPARED_SPLITS]
    inputs = np.concatenate([rt.load_inputs(paths, cfg) for paths, _ in parts])
    return inputs, np.concatenate([labels for _, labels in parts]), len(parts[0][1])


def calibration_images(
    paths: PathsParams,
    names: list[str],
    cfg: dict,
    q: QuantizeParams,
    seed: int,
    decide: Decisions | None = None,
) -> np.ndarray:
    """`q.calibration_images` train images, as `train_images` draws them."""
    return train_images(paths, names, cfg, q.calibration_images, seed, decide)


def qat_tuner(params: Params, trained: TrainedModel, decide: Decisions) -> Tuner | None:
    """The quantization-aware fine-tune's tuner, on `quantize.qat_images` train images, where
    `quantize.qat_epochs` asks for one (static quantization only: dynamic calibrates nothing to tune for)."""
    q = params.quantize
    if not q.qat_epochs or q.method != "static":
        return None
    cfg, seed = trained.data_config, params.base.seed
    images = train_images(params.paths, trained.class_names, cfg, q.qat_images, seed, decide)
    return Tuner(trained, images, decide.sets.multilabel, q, seed, params.export.opset)


def train_images(
    paths: PathsParams, names: list[str], cfg: dict, count: int, seed: int, decide: Decisions | None = None
) -> np.ndarray:
    """`count` train images, a sample stratified by class (by label set, with a multilabel task's
    `decide`) drawn with `seed`, preprocessed as predict does."""
    decide = decide or Decisions(SINGLE)
    train_paths, truth = read_split(paths.splits, paths.data_root, "train", names, decide.sets)
    chosen = stratified_sample(decide.of_truth(truth), count, seed)
    return rt.load_inputs([train_paths[i] for i in chosen], cfg)


def _candidate_row(candidate: Candidate) -> dict:
    return {
        "format": candidate.format,
        "portable": candidate.portable,
        "fp32_nodes": candidate.fp32_nodes,
        "search": candidate.search,
        "qat": candidate.qat,
        **({} if candidate.label_agreement is None else {"label_agreement": candidate.label_agreement}),
        **asdict(candidate.comparison),
        "batch1_ms": candidate.batch1_ms,
        "speedup_batch1": candidate.speedup,
        "passed": candidate.passed,
        "rejected_because": candidate.rejected_because,
    }


def _torch_runner(model: torch.nn.Module):
    model.eval()

    def run(batch: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.from_numpy(batch))

    return run


def _ort_runner(sess):
    name = sess.get_inputs()[0].name
    return lambda batch: sess.run(None, {name: batch})
