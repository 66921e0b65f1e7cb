"""ONNX export, ONNX Runtime sessions and model metadata, model inputs and the CPU's INT8 features, shared by
quantize, export and predict (timing: pipeline.timing; splits.csv: pipeline.data.splits).

Only `export_onnx` needs torch and imports it inside, so `pipeline.serving.predict` can use this module in an
environment where torch is not installed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from pipeline.errors import PipelineError
from pipeline.preprocess import preprocess_file

FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
FP16_FILE = "model.fp16.onnx"  # half-precision weights, float32 inputs and outputs: for GPU providers
MODEL_FILES = {"fp32": FP32_FILE, "int8": INT8_FILE, "fp16": FP16_FILE}
LABELS_FILE = "labels.json"  # the export folder: class names in logit order
PREPROCESS_FILE = "preprocess.json"  # the export folder: the eval preprocessing (timm data config)
QUANTIZE_REPORT = "quantize_report.json"  # the quantize stage's candidates and decision, next to the models
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# The second output: the pooled penultimate features, for the unknown-input detector.
FEATURES_NAME = "features"
FEATURE_BANK_FILE = "feature_bank.npy"  # the export folder: the knn detector's unit-length train features


def export_onnx(model: Any, path: Path, input_size: Sequence[int], opset: int) -> Path:
    """Write `model` as FP32 ONNX with a dynamic batch axis, via the dynamo exporter: outputs `logits` (N, K)
    and, for a model with `forward_features` and `head` (ImageClassifier), `features` (N, C), the pooled
    backbone features the head reads, which the unknown-input detector scores.

    On torch 2.14 the dynamo exporter gives a graph with BatchNorm folded (94 nodes for lite0 against 595 from
    the TorchScript exporter) that runs faster in ONNX Runtime and quantizes better. What the exporter records
    about the build machine is stripped (`strip_provenance`).
    """
    import torch

    # Batch 2, not 1: torch.export specialises a size-1 dimension to a constant.
    example = torch.zeros((2, *[int(n) for n in input_size]), dtype=torch.float32)
    with_features = hasattr(model, "forward_features") and hasattr(model, "head")
    with quiet_logs("onnxscript", "onnx_ir"):  # hundreds of INFO lines per export otherwise
        torch.onnx.export(
            _with_features(model).eval() if with_features else model.eval(),
            (example,),
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME, FEATURES_NAME] if with_features else [OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            external_data=False,  # one self-contained file; lite0 is far below protobuf's 2 GB limit
            verbose=False,
        )
    return strip_provenance(path)


def _with_features(model: Any) -> Any:
    """`model` as a module returning (logits, pooled features), so one ONNX graph serves both."""
    from torch import nn

    class LogitsAndFeatures(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, images):
            features = self.inner.forward_features(images)  # (B, C)
            return self.inner.head(features), features

    return LogitsAndFeatures(model)


def strip_provenance(path: Path) -> Path:
    """Remove, in place, what the exporter records about the build from every node, value and graph: the
    metadata_props (torch's per-node stack traces hold this machine's absolute paths: the project folder, the
    virtual environment, so a user name) and doc strings. ONNX Runtime reads none of them. The model's own
    metadata_props are kept; every later ONNX file (INT8 candidates, the export's) is made from the export."""
    model = onnx.load(str(path))
    for field, value in model.ListFields():
        if field.name != "metadata_props":
            _strip(model, field, value)
    onnx.save(model, str(path))
    return path


def _strip(message: Message, field: FieldDescriptor, value) -> None:
    if field.name in ("metadata_props", "doc_string"):
        message.ClearField(field.name)
    elif field.message_type is not None:  # a message or a repeated one: nodes, subgraphs, functions, ...
        for item in [value] if isinstance(value, Message) else value:
            for inner, inner_value in item.ListFields():
                _strip(item, inner, inner_value)


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


def session(
    path: Path | str, providers: Sequence[str] = ("CPUExecutionProvider",), optimize: bool = True
) -> ort.InferenceSession:
    """A session using every core (ORT's default thread count can be lower in containers), on `providers`
    in order of preference (see `providers_for`); `optimize=False` loads it faster, to read its metadata."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 2
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
    return ort.InferenceSession(str(path), options, providers=list(providers))


# --provider name -> ONNX Runtime execution provider; `auto` takes the first one this ONNX Runtime offers.
PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
GPU_PROVIDERS = {"tensorrt", "cuda"}
_PROVIDER_PACKAGES = {
    "tensorrt": "onnxruntime-gpu",
    "cuda": "onnxruntime-gpu",
    "openvino": "onnxruntime-openvino",
}


def providers_for(choice: str, available: Sequence[str] | None = None) -> tuple[str, list[str]]:
    """(the provider chosen, the providers list for a session: it, then the CPU for nodes it cannot run).

    Raises:
        PipelineError: `choice` is unknown, or this ONNX Runtime does not offer it.
    """
    available = list(ort.get_available_providers() if available is None else available)
    if choice == "auto":
        choice = next(name for name, provider in PROVIDERS.items() if provider in available or name == "cpu")
    if choice not in PROVIDERS:
        raise PipelineError(f"--provider {choice}: unknown; use one of auto, {', '.join(PROVIDERS)}")
    if PROVIDERS[choice] not in available:
        raise PipelineError(
            f"--provider {choice}: this ONNX Runtime ({ort.__version__}) offers only {', '.join(available)}; "
            f"install {_PROVIDER_PACKAGES[choice]} in place of onnxruntime, or use --provider auto"
        )
    return choice, list(dict.fromkeys([PROVIDERS[choice], PROVIDERS["cpu"]]))


def to_float16(source: Path, target: Path) -> Path:
    """An FP16 copy of an FP32 ONNX model for GPUs: weights and activations in half precision, inputs and
    outputs still float32 (so callers feed the same arrays). onnxruntime.transformers' converter, which
    ships with ONNX Runtime, keeps the ops that have no float16 kernel in float32 behind casts."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with quiet_logs("onnxruntime.transformers"):
        half = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(half, str(target))
    return target


def logits(sess: ort.InferenceSession, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """(N, 3, S, S) float32 -> (N, K) logits, run in batches."""
    return _run(sess, inputs, batch_size, [sess.get_outputs()[0].name])[0]


def outputs(
    sess: ort.InferenceSession, inputs: np.ndarray, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, 3, S, S) float32 -> ((N, K) logits, (N, C) features or None for a model exported without them),
    from one run of each batch."""
    if not has_features(sess) or len(inputs) == 0:
        return logits(sess, inputs, batch_size), None
    found, features = _run(sess, inputs, batch_size, [OUTPUT_NAME, FEATURES_NAME])
    return found, features


def _run(
    sess: ort.InferenceSession, inputs: np.ndarray, batch_size: int, names: list[str]
) -> list[np.ndarray]:
    """The outputs `names` of `inputs` run `batch_size` at a time, each concatenated over the batches."""
    name = sess.get_inputs()[0].name
    runs = [sess.run(names, {name: inputs[i : i + batch_size]}) for i in range(0, len(inputs), batch_size)]
    if not runs:
        return [np.zeros((0, 0), dtype=np.float32) for _ in names]
    return [np.concatenate(parts) for parts in zip(*runs, strict=True)]


def has_features(sess: ort.InferenceSession) -> bool:
    """Whether the model outputs the penultimate features next to the logits."""
    return [o.name for o in sess.get_outputs()] == [OUTPUT_NAME, FEATURES_NAME]


def metadata(sess: ort.InferenceSession) -> dict[str, str]:
    return dict(sess.get_modelmeta().custom_metadata_map)


def load_inputs(paths: Sequence[Path], data_config: dict[str, Any]) -> np.ndarray:
    """Preprocess image files exactly as evaluate and predict do -> (N, 3, S, S) float32."""
    try:
        return np.stack([preprocess_file(path, data_config) for path in paths])
    except OSError as exc:
        raise PipelineError(
            f"{exc}: an image in the splits file is unreadable; re-run ingest and validate"
        ) from None


# INT8 formats (quantize.formats) whose integer arithmetic is the same on every x86 CPU, with or without VNNI:
# none of their weights reaches ORT's u8 x s8 kernels that add product pairs in int16 at full 8 bits (7-bit
# weights keep each pair within int16), and u8u8 never uses those kernels. Plain u8s8 (and s8s8, which ORT
# shifts to u8s8) saturates on a CPU without VNNI, so its agreement holds only where it was measured.
PORTABLE_INT8 = frozenset({"u8s8_portable", "u8s8_reduce_range", "u8u8"})


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
