"""Stage: quantize. FP32 ONNX export, then post-training static INT8 quantization with ONNX Runtime; accuracy,
size and speed of PyTorch eager, ORT FP32 and ORT INT8 are measured on this machine and gated.

Static quantization (activation ranges calibrated on train images, QDQ format, per-channel weights) makes the
convolutions INT8; dynamic quantization would only touch the Linear head of a CNN.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from pipeline import onnx_runtime as rt
from pipeline.config import Params, QuantizeParams
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, write_json
from pipeline.models import load_trained

log = logging.getLogger(__name__)

_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
_CALIBRATION_BATCH = 16


def run(params: Params) -> dict:
    q, paths = params.quantize, params.paths
    trained = load_trained(paths.model)
    names, cfg = trained.class_names, trained.data_config
    test_paths, test_labels = rt.read_split(paths.splits, paths.data_root, "test", names)
    test_inputs = rt.load_inputs(test_paths, cfg)

    with atomic_dir(paths.onnx_dir) as out:
        rt.export_onnx(trained.model, out / rt.FP32_FILE, cfg["input_size"], params.export.opset)
        if q.enabled:
            train_paths, train_labels = rt.read_split(paths.splits, paths.data_root, "train", names)
            chosen = rt.stratified_sample(train_labels, q.calibration_images, params.base.seed)
            calibration = rt.load_inputs([train_paths[i] for i in chosen], cfg)
            log.info("quantizing with %d calibration images (%s)", len(chosen), q.calibration_method)
            quantize_onnx(out / rt.FP32_FILE, out / rt.INT8_FILE, calibration, q)

    log.info("measuring %d test images and speed (%d repeats)", len(test_labels), q.benchmark_repeats)
    metrics = measure(trained.model, Path(paths.onnx_dir), test_inputs, test_labels, q.benchmark_repeats)
    metrics.update(enabled=q.enabled, calibration_method=q.calibration_method, per_channel=q.per_channel)
    if q.enabled:
        metrics["calibration_images"] = len(chosen)
    write_json(paths.metrics("quantize"), metrics)
    if q.enabled:
        check_accuracy_drop(metrics["accuracy_drop_points"], q)
    return metrics


def quantize_onnx(fp32: Path, int8: Path, calibration: np.ndarray, q: QuantizeParams) -> Path:
    """Static INT8 QDQ quantization of `fp32`, activation ranges calibrated on `calibration` (N, 3, S, S)."""
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference + ORT graph optimisations first, as ORT's quantization guide recommends: the
        # quantizer then sees every tensor's shape and fewer, fused nodes.
        quant_pre_process(str(fp32), str(prepared))
        _check_excluded(prepared, q.exclude_nodes)
        with rt.quiet_logs(""):  # the quantizer logs a line per rescaled weight channel on the root logger
            quantize_static(
                str(prepared),
                str(int8),
                _Calibration(calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=q.per_channel,
                activation_type=QuantType.QUInt8,  # U8S8: about 2x faster than S8S8 on x86 here
                weight_type=QuantType.QInt8,
                calibrate_method=_METHODS[q.calibration_method],
                nodes_to_exclude=list(q.exclude_nodes),
            )
    return int8


def measure(
    model: torch.nn.Module, onnx_dir: Path, inputs: np.ndarray, labels: np.ndarray, repeats: int
) -> dict:
    """Test accuracy, agreement, file sizes and speed of PyTorch eager, ORT FP32 and (if present) ORT INT8."""
    fp32_path, int8_path = onnx_dir / rt.FP32_FILE, onnx_dir / rt.INT8_FILE
    fp32 = rt.session(fp32_path)
    fp32_pred = rt.logits(fp32, inputs).argmax(1)
    metrics = {
        "n_test": len(labels),
        "fp32_accuracy": float(np.mean(fp32_pred == labels)),
        "fp32_mb": rt.file_mb(fp32_path),
    }
    metrics.update(_prefixed("torch", rt.speed(_torch_runner(model), inputs, repeats)))
    metrics.update(_prefixed("ort_fp32", rt.speed(_ort_runner(fp32), inputs, repeats)))
    if int8_path.is_file():
        int8 = rt.session(int8_path)
        int8_pred = rt.logits(int8, inputs).argmax(1)
        metrics.update(
            int8_accuracy=float(np.mean(int8_pred == labels)),
            int8_mb=rt.file_mb(int8_path),
            top1_agreement=float(np.mean(int8_pred == fp32_pred)),
        )
        metrics.update(_prefixed("ort_int8", rt.speed(_ort_runner(int8), inputs, repeats)))
        metrics.update(
            accuracy_drop_points=drop_points(metrics["fp32_accuracy"], metrics["int8_accuracy"], len(labels)),
            int8_size_ratio=metrics["int8_mb"] / metrics["fp32_mb"],
            int8_speedup_batch1=metrics["ort_fp32_batch1_ms"] / metrics["ort_int8_batch1_ms"],
            int8_speedup_batch32=metrics["ort_int8_batch32_img_per_s"]
            / metrics["ort_fp32_batch32_img_per_s"],
        )
    return metrics


def drop_points(fp32_accuracy: float, int8_accuracy: float, images: int) -> float:
    """Accuracy drop in points from whole image counts: 5 of 1,000 images is exactly 0.5, where the difference
    of the two float accuracies can land just above a threshold of 0.5."""
    return 100.0 * (round(fp32_accuracy * images) - round(int8_accuracy * images)) / images


def check_accuracy_drop(drop_points: float, q: QuantizeParams) -> None:
    """The INT8 quality gate: fail, naming the figure and the params to try, if INT8 lost too much."""
    if drop_points <= q.max_accuracy_drop:
        return
    raise PipelineError(
        f"INT8 test accuracy is {drop_points:.2f} points below FP32, more than quantize.max_accuracy_drop = "
        f"{q.max_accuracy_drop:g} (see metrics/quantize.json). Try more calibration images "
        f"(quantize.calibration_images, now {q.calibration_images}), another calibration method "
        f"(quantize.calibration_method: minmax | entropy | percentile, now {q.calibration_method}), "
        f"excluding sensitive layers such as the first conv or the classifier (quantize.exclude_nodes), "
        f"or keep FP32 only (quantize.enabled: false)"
    )


class _Calibration(CalibrationDataReader):
    """Feeds the calibration images to ORT's calibrator in small batches."""

    def __init__(self, inputs: np.ndarray):
        self._batches = iter(
            [
                {rt.INPUT_NAME: inputs[i : i + _CALIBRATION_BATCH]}
                for i in range(0, len(inputs), _CALIBRATION_BATCH)
            ]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _check_excluded(model_path: Path, excluded: list[str]) -> None:
    if not excluded:
        return
    nodes = [node.name for node in onnx.load(str(model_path)).graph.node]
    unknown = sorted(set(excluded) - set(nodes))
    if unknown:
        raise PipelineError(
            f"quantize.exclude_nodes: no node named {unknown} in the model; node names are, in order: "
            + ", ".join(nodes[:12])
            + (f", ... ({len(nodes)} in all)" if len(nodes) > 12 else "")
        )


def _torch_runner(model: torch.nn.Module):
    model.eval()

    def run(batch: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.from_numpy(batch))

    return run


def _ort_runner(sess):
    name = sess.get_inputs()[0].name
    return lambda batch: sess.run(None, {name: batch})


def _prefixed(prefix: str, figures: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{key}": value for key, value in figures.items()}
