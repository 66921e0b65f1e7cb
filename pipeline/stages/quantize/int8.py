"""INT8 formats and ONNX Runtime's quantizer, as the quantize stage uses them.

U8S8 (uint8 activations, int8 weights) is ORT's fast x86 path, but on CPUs without VNNI its GEMM kernels add
pairs of u8 x s8 products in int16 and can saturate, so a u8s8 model agrees with FP32 less there than where it
was measured. `u8s8_portable` gives 7-bit weights to exactly the nodes those kernels run (convolutions other
than depthwise, Gemm, MatMul), so each pair fits, and keeps 8 bits in depthwise convolutions, whose kernel
adds in int32: the same integers on every x86 CPU, for less loss than `u8s8_reduce_range` (7 bits
everywhere). U8U8 and S8S8 have no fast kernel here (measured about 0.1x and 0.7-1x the speed of FP32).
Which formats are portable: `pipeline.serving.onnx_runtime.PORTABLE_INT8` (predict reads it too).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from pipeline.config import QuantizeParams
from pipeline.errors import PipelineError
from pipeline.serving import onnx_runtime as rt


@dataclass(frozen=True)
class Format:
    """An INT8 format: activation and weight types, and which weights are quantized to 7 bits (ORT's
    reduce_range): none, all, or `gemm`, those of the nodes ORT runs through its u8 x s8 GEMM kernels."""

    activations: QuantType
    weights: QuantType
    seven_bit: Literal["none", "all", "gemm"]


FORMATS = {
    "u8s8_portable": Format(QuantType.QUInt8, QuantType.QInt8, "gemm"),
    "u8s8": Format(QuantType.QUInt8, QuantType.QInt8, "none"),
    "u8s8_reduce_range": Format(QuantType.QUInt8, QuantType.QInt8, "all"),
    "u8u8": Format(QuantType.QUInt8, QuantType.QUInt8, "none"),
    "s8s8": Format(QuantType.QInt8, QuantType.QInt8, "none"),
}

# The nodes whose weights are quantized, and the sensitivity search's candidates.
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")

_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}

_CALIBRATION_BATCH = 16


def prepare(fp32: Path, prepared: Path, excluded: list[str]) -> Path:
    """Shape inference + ORT graph optimisations first, as ORT's quantization guide recommends: the quantizer
    then sees every tensor's shape and fewer, fused nodes."""
    quant_pre_process(str(fp32), str(prepared))
    _check_excluded(prepared, excluded)
    return prepared


def quantize_onnx(
    prepared: Path,
    int8: Path,
    calibration: np.ndarray | None,
    fmt: str,
    q: QuantizeParams,
    fp32_nodes: Sequence[str] = (),
    cache: Path | None = None,
) -> Path:
    """INT8 quantization of a prepared model: static QDQ with activation ranges calibrated on `calibration`
    (or read from `cache`, which the first call writes), or dynamic (`q.method`), where ORT picks the
    activation type (uint8) and `fmt` sets the weights' (7 bits wherever the format has any: dynamic
    convolutions all run through the GEMM kernels). `q.exclude_nodes` and `fp32_nodes` stay FP32."""
    spec = FORMATS[fmt]
    excluded = [*q.exclude_nodes, *fp32_nodes]
    with rt.quiet_logs(""):  # the quantizer logs a line per rescaled weight channel on the root logger
        if q.method == "dynamic":
            quantize_dynamic(
                str(prepared),
                str(int8),
                per_channel=q.per_channel,
                reduce_range=spec.seven_bit != "none",
                weight_type=spec.weights,
                nodes_to_exclude=excluded,
            )
            return int8
        overrides = _seven_bit_gemm_weights(prepared, q.per_channel) if spec.seven_bit == "gemm" else {}
        quantize_static(
            str(prepared),
            str(int8),
            _Calibration(calibration) if calibration is not None else None,
            quant_format=QuantFormat.QDQ,
            per_channel=q.per_channel,
            reduce_range=spec.seven_bit == "all",
            activation_type=spec.activations,
            weight_type=spec.weights,
            calibrate_method=_METHODS[q.calibration_method],
            nodes_to_exclude=excluded,
            extra_options={"TensorQuantOverrides": overrides},
            calibration_cache_path=cache,
        )
    return int8


def _seven_bit_gemm_weights(prepared: Path, per_channel: bool) -> dict[str, list[dict]]:
    """ORT's per-tensor overrides giving 7-bit weights to every node its u8 x s8 GEMM kernels run: each
    Conv but the depthwise ones (one input channel per group, one group per channel: ORT's depthwise
    kernel adds in int32), each Gemm and MatMul; per channel along the output axis, as the rest."""
    overrides = {}
    for node, weight in _weighted(onnx.load(str(prepared), load_external_data=False)):
        if not _depthwise(node, list(weight.dims)):
            axis = _output_axis(node)
            overrides[weight.name] = [{"reduce_range": True, **({"axis": axis} if per_channel else {})}]
    return overrides


def _weighted(model: onnx.ModelProto) -> Iterator[tuple[onnx.NodeProto, onnx.TensorProto]]:
    """Each node whose weights the quantizer makes INT8 (a `WEIGHTED_OPS` node whose second input is an
    initializer), with that initializer."""
    initializers = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in initializers:
            yield node, initializers[node.input[1]]


def _depthwise(node: onnx.NodeProto, weight_shape: list[int]) -> bool:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    groups = int(attrs.get("group", 1))
    return node.op_type == "Conv" and groups > 1 and weight_shape[0] == groups and weight_shape[1] == 1


def _output_axis(node: onnx.NodeProto) -> int:
    """The weight's output-channel axis: 0 for Conv and Gemm with transB, else 1 (MatMul's (K, N))."""
    if node.op_type == "Conv":
        return 0
    trans_b = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
    return 0 if node.op_type == "Gemm" and trans_b else 1


def weighted_nodes(prepared: Path, excluded: Sequence[str]) -> list[str]:
    """The search's candidates: the nodes with a weight initializer the quantizer makes INT8."""
    model = onnx.load(str(prepared), load_external_data=False)
    return [node.name for node, _ in _weighted(model) if node.name not in excluded]


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
