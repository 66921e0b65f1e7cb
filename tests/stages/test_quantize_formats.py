"""quantize stage, INT8 formats: each entry of `int8.FORMATS`, quantized on a tiny Conv + depthwise Conv +
Gemm model, has the integer types and weight ranges its name promises, read from the quantized ONNX graph."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.config import QuantizeParams
from pipeline.serving import onnx_runtime as rt
from pipeline.stages.quantize import int8

# What each format's name says, written out here and not read from int8.FORMATS, so that a wrong entry
# there fails: (activation type, weight type, the weights quantized to 7 bits). u8s8_portable: those of the
# nodes ORT runs through its int16-pair GEMM kernels (the plain Conv and the Gemm), not the depthwise Conv's.
EXPECTED = {
    "u8s8_portable": (TensorProto.UINT8, TensorProto.INT8, {"conv_w_quantized", "fc_w_quantized"}),
    "u8s8": (TensorProto.UINT8, TensorProto.INT8, set()),
    "u8s8_reduce_range": (
        TensorProto.UINT8,
        TensorProto.INT8,
        {"conv_w_quantized", "dw_w_quantized", "fc_w_quantized"},
    ),
    "u8u8": (TensorProto.UINT8, TensorProto.UINT8, set()),
    "s8s8": (TensorProto.INT8, TensorProto.INT8, set()),
}
WEIGHTS = {"conv_w_quantized", "dw_w_quantized", "fc_w_quantized"}
# ORT's reduced range: int8 weights in [-64, 64] (so that two u8 x s8 products sum within int16), uint8 in
# [0, 127]. Without it, the largest weight of each channel takes the type's end: |127| or 255.
SEVEN_BITS = {TensorProto.INT8: (-64, 64), TensorProto.UINT8: (0, 127)}
# The quantized weight's input of each op that takes one (static: QDQ; dynamic: the integer ops).
WEIGHT_INPUT = {"DequantizeLinear": 0, "ConvInteger": 1, "MatMulInteger": 1}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """input (N, 3, 8, 8) -> Conv 8x3x3x3 -> Relu -> depthwise Conv 8x1x3x3 -> GlobalAveragePool -> Flatten ->
    Gemm -> (N, 3) logits, random weights; prepared for quantization as the stage does."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", [rt.INPUT_NAME, "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("Conv", ["relu", "dw_w", "dw_b"], ["dw"], pads=[1, 1, 1, 1], group=8),
        helper.make_node("GlobalAveragePool", ["dw"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], [rt.OUTPUT_NAME], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(rt.INPUT_NAME, TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info(rt.OUTPUT_NAME, TensorProto.FLOAT, ["batch", 3])],
        [
            *(
                weight("conv_w", 8, 3, 3, 3),
                weight("conv_b", 8),
                weight("dw_w", 8, 1, 3, 3),
                weight("dw_b", 8),
            ),
            *(weight("fc_w", 3, 8), weight("fc_b", 3)),
        ],
    )
    folder = tmp_path_factory.mktemp("formats")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(folder / "fp32.onnx"))
    return int8.prepare(folder / "fp32.onnx", folder / "prepared.onnx", [])


def _quantized(prepared: Path, fmt: str, method: str) -> onnx.ModelProto:
    calibration = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)
    target = prepared.parent / f"{method}_{fmt}.onnx"
    path = int8.quantize_onnx(prepared, target, calibration, fmt, QuantizeParams(method=method))
    assert rt.logits(rt.session(path), calibration[:2]).shape == (2, 3)  # ONNX Runtime runs it
    return onnx.load(str(path))


def _weights(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The quantized weights: integer initializers a weight input takes (int32 biases aside)."""
    inits = {init.name: init for init in model.graph.initializer}
    taken = [
        inits.get(node.input[WEIGHT_INPUT[node.op_type]])
        for node in model.graph.node
        if node.op_type in WEIGHT_INPUT
    ]
    return [init for init in taken if init is not None and init.data_type != TensorProto.INT32]


def _seven_bit(weights: list[onnx.TensorProto]) -> set[str]:
    """The names of the weights whose integers all lie in the 7-bit range."""
    return {
        w.name
        for w in weights
        if SEVEN_BITS[w.data_type][0] <= _range(w)[0] and _range(w)[1] <= SEVEN_BITS[w.data_type][1]
    }


def _range_of(weights: list[onnx.TensorProto]) -> dict[str, tuple[int, int]]:
    return {w.name: _range(w) for w in weights}


def _range(weight: onnx.TensorProto) -> tuple[int, int]:
    array = numpy_helper.to_array(weight).astype(int)
    return int(array.min()), int(array.max())


def test_the_formats_here_are_those_of_the_stage_and_of_the_params():
    allowed = get_args(get_args(QuantizeParams.model_fields["formats"].annotation)[0])
    assert set(EXPECTED) == set(int8.FORMATS) == set(allowed)


@pytest.mark.parametrize("fmt", EXPECTED)
def test_static_format_sets_activation_and_weight_types_and_the_weight_range(prepared, fmt):
    activations, weights, reduced = EXPECTED[fmt]
    model = _quantized(prepared, fmt, "static")
    inits = {init.name: init for init in model.graph.initializer}
    quantize_nodes = [node for node in model.graph.node if node.op_type == "QuantizeLinear"]
    assert len(quantize_nodes) >= 5  # input, the two Convs', pool's and Gemm's outputs
    assert {inits[node.input[2]].data_type for node in quantize_nodes} == {activations}  # zero points
    quantized = _weights(model)
    assert {w.name for w in quantized} == WEIGHTS
    assert {w.data_type for w in quantized} == {weights}
    assert _seven_bit(quantized) == reduced, _range_of(quantized)


@pytest.mark.parametrize("fmt", EXPECTED)
def test_dynamic_format_sets_the_weight_type_and_range(prepared, fmt):
    """Dynamic quantization takes the weights' type and range from the format; its activations are uint8
    whatever the format (DynamicQuantizeLinear), and a format with any 7-bit weights has all of them so
    (ConvInteger runs every convolution through the GEMM kernels), as quantize_onnx's docstring says."""
    _, weights, reduced = EXPECTED[fmt]
    model = _quantized(prepared, fmt, "dynamic")
    quantized = _weights(model)
    assert len(quantized) == 3 and {w.data_type for w in quantized} == {weights}
    assert _seven_bit(quantized) == ({w.name for w in quantized} if reduced else set()), _range_of(quantized)
