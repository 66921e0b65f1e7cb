"""quantize stage, sensitivity search: on a tiny model whose stem convolution INT8 ruins, the search leaves
the stem in FP32, and ONNX Runtime does run it in FP32 (its fully optimised graph says so); nodes ORT would
quantize itself at load time are not tried, and `ort_runs_in_fp32` tells them apart."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.config import QuantizeParams
from pipeline.serving import onnx_runtime as rt
from pipeline.stages.quantize import int8, search


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    """(prepared model, a quantizer taking the nodes to leave in FP32, the probe: inputs and FP32 logits)."""
    folder = tmp_path_factory.mktemp("search")
    rng = np.random.default_rng(0)
    fp32 = _model(folder / "fp32.onnx", rng)
    inputs = rng.uniform(0.0, 1.0, (32, 3, 8, 8)).astype(np.float32)
    inputs[:, 0] = 0.0  # the channel the stem's outlier weights read is dark: they matter for the range only
    prepared = int8.prepare(fp32, folder / "prepared.onnx", [])

    def quantized(nodes, target=folder / "trial.onnx"):
        return int8.quantize_onnx(
            prepared, target, inputs, "u8s8_portable", QuantizeParams(), nodes, folder / "calibration.json"
        )

    return prepared, quantized, (inputs, rt.logits(rt.session(fp32), inputs))


def _model(path: Path, rng: np.random.Generator) -> Path:
    """input (N, 3, 8, 8) -> Conv `stem` 3x3 to 8 -> Relu -> 1x1 Conv `pw` -> GlobalAveragePool -> Gemm
    `fc` -> 4 logits: ORT runs the stem (on the float input) and fc (whose output leaves the model) in FP32
    when they are left out of quantization, but quantizes pw itself (between two quantized tensors). Each
    stem channel has one large weight (50) on input channel 0 and small ones
    (about 0.1) elsewhere: per-channel INT8 steps of 50/64 round the small ones to 0."""
    stem = rng.normal(0.0, 0.1, (8, 3, 3, 3))
    stem[:, 0, 1, 1] = 50.0

    def init(name: str, array: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(array.astype(np.float32), name)

    nodes = [
        helper.make_node(
            "Conv", [rt.INPUT_NAME, "stem_w", "stem_b"], ["stem"], name="stem", pads=[1, 1, 1, 1]
        ),
        helper.make_node("Relu", ["stem"], ["stem_relu"]),
        helper.make_node("Conv", ["stem_relu", "pw_w", "pw_b"], ["pw"], name="pw"),
        helper.make_node("GlobalAveragePool", ["pw"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], [rt.OUTPUT_NAME], name="fc", transB=1),
    ]
    inits = [
        init("stem_w", stem),
        init("stem_b", rng.normal(0.1, 0.02, 8)),  # distinct biases: equal ones are merged
        init("pw_w", rng.normal(0.0, 0.5, (8, 8, 1, 1))),
        init("pw_b", rng.normal(0.1, 0.02, 8)),
        init("fc_w", rng.normal(0.0, 2.0, (4, 8))),
        init("fc_b", rng.normal(0.0, 0.02, 4)),
    ]
    graph = helper.make_graph(
        nodes,
        "stem_outliers",
        [helper.make_tensor_value_info(rt.INPUT_NAME, TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info(rt.OUTPUT_NAME, TensorProto.FLOAT, ["batch", 4])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _ops_ort_runs(model: Path, folder: Path) -> Counter:
    """The op types of the graph ONNX Runtime runs, after its optimisations."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(folder / f"{model.stem}.optimized.onnx")
    ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def test_search_leaves_the_ruined_stem_in_fp32_and_tries_only_what_ort_keeps_fp32(setup, tmp_path):
    prepared, quantized, probe = setup
    nodes, measured = search.search_fp32_nodes(quantized, ["stem", "pw", "fc"], probe, most=3)
    assert nodes[0] == "stem" and "pw" not in nodes
    assert measured["nodes_tried"] == 2 and measured["nodes_ort_requantizes"] == 1  # pw
    assert measured["divergence"] < 0.1 * measured["divergence_all_int8"]
    assert search.search_fp32_nodes(quantized, ["stem", "pw", "fc"], probe, most=1)[0] == ["stem"]
    ops = _ops_ort_runs(quantized(["stem"], tmp_path / "stem.onnx"), tmp_path)
    assert ops["QLinearConv"] == 1 and ops["Conv"] + ops["FusedConv"] == 1, ops  # the stem in FP32, pw INT8
    assert _ops_ort_runs(quantized([], tmp_path / "all.onnx"), tmp_path)["QLinearConv"] == 2


def test_search_takes_at_most_the_nodes_asked_and_none_when_int8_already_agrees(setup):
    _, quantized, (inputs, reference) = setup
    assert search.search_fp32_nodes(quantized, ["stem", "pw", "fc"], (inputs, reference), most=0)[0] == []
    int8_logits = rt.logits(rt.session(quantized([])), inputs)  # INT8 itself as the reference
    nodes, measured = search.search_fp32_nodes(quantized, ["stem", "pw", "fc"], (inputs, int8_logits), most=3)
    assert nodes == [] and measured["nodes_tried"] == 0 and measured["divergence_all_int8"] < 1e-4


def test_search_adds_a_node_only_while_it_brings_the_model_closer(setup):
    """Against the stem-in-FP32 model as the reference, leaving the stem in FP32 matches it exactly and also
    leaving fc in FP32 moves away from it: the search stops at the stem."""
    _, quantized, (inputs, _) = setup
    reference = rt.logits(rt.session(quantized(["stem"])), inputs)
    nodes, measured = search.search_fp32_nodes(quantized, ["stem", "pw", "fc"], (inputs, reference), most=3)
    assert nodes == ["stem"] and measured["nodes_tried"] == 2 and measured["divergence"] < 1e-9


@pytest.mark.parametrize("excluded", ["stem", "pw", "fc"])
def test_ort_runs_in_fp32_agrees_with_the_graph_ort_runs(setup, tmp_path, excluded):
    """Whatever ORT does with a node left out of quantization, the answer matches its fully optimised graph:
    a float op more than the all-INT8 model has, or the same integer ops."""
    _, quantized, _ = setup
    model = quantized([excluded], tmp_path / f"without_{excluded}.onnx")
    ops, all_int8 = (
        _ops_ort_runs(model, tmp_path),
        _ops_ort_runs(quantized([], tmp_path / "all.onnx"), tmp_path),
    )
    integer_ops = ops["QLinearConv"] + ops["QGemm"]
    assert (integer_ops == all_int8["QLinearConv"] + all_int8["QGemm"]) is not search.ort_runs_in_fp32(
        model, excluded
    ), ops


def test_the_stem_runs_in_fp32_and_a_node_between_quantized_ones_does_not(setup, tmp_path):
    _, quantized, _ = setup
    assert search.ort_runs_in_fp32(quantized(["stem"], tmp_path / "a.onnx"), "stem")
    assert not search.ort_runs_in_fp32(quantized(["pw"], tmp_path / "b.onnx"), "pw")
