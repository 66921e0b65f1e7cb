"""ONNX export, ONNX Runtime sessions, split inputs and timing, shared by quantize, export and predict.

Only `export_onnx` needs torch and imports it inside, so `pipeline.predict` can use this module in an
environment where torch is not installed.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from pipeline.errors import PipelineError
from pipeline.preprocess import preprocess_file

FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
LABELS_FILE = "labels.json"  # the export folder: class names in logit order
PREPROCESS_FILE = "preprocess.json"  # the export folder: the eval preprocessing (timm data config)
QUANTIZE_REPORT = "quantize_report.json"  # the quantize stage's candidates and decision, next to the models
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_SPLIT_COLUMNS = {"path", "label", "split"}


def export_onnx(model: Any, path: Path, input_size: Sequence[int], opset: int) -> Path:
    """Write `model` as FP32 ONNX with a dynamic batch axis, via the dynamo exporter.

    On torch 2.14 the dynamo exporter gives a graph with BatchNorm folded (94 nodes for lite0 against 595 from
    the TorchScript exporter) that runs faster in ONNX Runtime and quantizes better.
    """
    import torch

    # Batch 2, not 1: torch.export specialises a size-1 dimension to a constant.
    example = torch.zeros((2, *[int(n) for n in input_size]), dtype=torch.float32)
    with quiet_logs("onnxscript", "onnx_ir"):  # hundreds of INFO lines per export otherwise
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            external_data=False,  # one self-contained file; lite0 is far below protobuf's 2 GB limit
            verbose=False,
        )
    return path


@contextlib.contextmanager
def quiet_logs(*names: str) -> Iterator[None]:
    """Raise the named loggers ("" = root) to WARNING for the block: the ONNX tools log at INFO per node."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.level, logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def session(path: Path | str) -> ort.InferenceSession:
    """A CPU session using every core (ORT's default thread count can be lower in containers)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 2
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def logits(sess: ort.InferenceSession, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """(N, 3, S, S) float32 -> (N, K) logits, run in batches."""
    name = sess.get_inputs()[0].name
    outputs = [
        sess.run(None, {name: inputs[i : i + batch_size]})[0] for i in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)


def metadata(sess: ort.InferenceSession) -> dict[str, str]:
    return dict(sess.get_modelmeta().custom_metadata_map)


def read_split(
    splits_csv: Path, data_root: Path, split: str, class_names: Sequence[str]
) -> tuple[list[Path], np.ndarray]:
    """Image paths (sorted) and class indices of one split of the splits CSV."""
    if not Path(splits_csv).is_file():
        raise PipelineError(f"{splits_csv}: not found; run the split stage first (dvc repro split)")
    with open(splits_csv, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = _SPLIT_COLUMNS - set(reader.fieldnames or [])
        if missing:
            raise PipelineError(f"{splits_csv}: missing columns {sorted(missing)}; re-run the split stage")
        rows = sorted((row["path"], row["label"]) for row in reader if row["split"] == split)
    if not rows:
        raise PipelineError(
            f"{splits_csv}: no '{split}' rows; check split.{split} in params.yaml, re-run split"
        )
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({label for _, label in rows if label not in index})
    if unknown:
        raise PipelineError(
            f"{splits_csv}: labels {unknown} are not classes of the trained model; re-run train on this split"
        )
    labels = np.array([index[label] for _, label in rows], dtype=np.int64)
    return [Path(data_root) / path for path, _ in rows], labels


def load_inputs(paths: Sequence[Path], data_config: dict[str, Any]) -> np.ndarray:
    """Preprocess image files exactly as evaluate and predict do -> (N, 3, S, S) float32."""
    try:
        return np.stack([preprocess_file(path, data_config) for path in paths])
    except OSError as exc:
        raise PipelineError(
            f"{exc}: an image in the splits file is unreadable; re-run ingest and validate"
        ) from None


def stratified_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of `n` items drawn at random with each class in its share of `labels` (all if n >= len)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    # Each item's position within its (shuffled) class as a fraction of the class size; taking the smallest
    # fractions first walks through all classes at the same pace, so every prefix is stratified.
    position = np.empty(len(labels))
    for label in np.unique(labels):
        members = order[labels[order] == label]
        position[members] = (np.arange(len(members)) + 0.5) / len(members)
    chosen = order[np.argsort(position[order], kind="stable")][:n]
    return np.sort(chosen)


def median_seconds(call: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median wall time of `call` over `repeats` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_batch1_ms(
    first: Callable[[np.ndarray], object],
    second: Callable[[np.ndarray], object],
    inputs: np.ndarray,
    repeats: int,
) -> tuple[float, float]:
    """Median batch-1 latency (ms) of two runners timed in turns, so that a busy machine slows both alike."""
    single = np.ascontiguousarray(inputs[:1])
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(3):
        first(single), second(single)
    for _ in range(repeats):
        for run, spent in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            run(single)
            spent.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times[0]), 1000.0 * statistics.median(times[1])


def speed(run: Callable[[np.ndarray], object], inputs: np.ndarray, repeats: int) -> dict[str, float]:
    """Latency at batch 1 (ms) and throughput at batch 32 (images/s) of `run` on real inputs."""
    batch32 = np.ascontiguousarray(np.resize(inputs, (32, *inputs.shape[1:])))  # cycles through the inputs
    single = np.ascontiguousarray(inputs[:1])
    return {
        "batch1_ms": 1000.0 * median_seconds(lambda: run(single), repeats),
        "batch32_img_per_s": 32.0 / median_seconds(lambda: run(batch32), repeats),
    }


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU's model name and the x86 features that change ONNX Runtime's INT8 kernels (Linux only).

    Without VNNI, ORT's U8S8 kernels add pairs of u8 x s8 products in int16 and can saturate.
    """
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {"model": platform.processor() or platform.machine(), "vnni": None, "avx512": None}
    fields = dict(
        line.split(":", 1) for line in text.splitlines()[:64] if ":" in line and line.split(":", 1)[0].strip()
    )
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    model = fields.get("model name", platform.machine())
    if "flags" not in fields:  # not x86: the int16 saturation question does not arise
        return {"model": model, "vnni": None, "avx512": None}
    flags = set(fields["flags"].split())
    return {
        "model": model,
        "vnni": bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}),
        "avx512": "avx512f" in flags,
    }


def file_mb(path: Path) -> float:
    return Path(path).stat().st_size / 1e6
