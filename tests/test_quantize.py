"""quantize stage: FP32 ONNX export, static INT8 QDQ quantization, measured figures, the accuracy gate."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import model_project

from pipeline import onnx_runtime as rt
from pipeline.config import ModelParams, QuantizeParams
from pipeline.errors import PipelineError
from pipeline.io import read_json
from pipeline.models import build_model, resolve_data_config
from pipeline.stages import quantize


def test_metrics_cover_accuracy_sizes_and_three_runtimes(exported_project):
    params = exported_project
    metrics = read_json(params.paths.metrics("quantize"))
    assert metrics["n_test"] == 9 and metrics["calibration_images"] == 8
    for key in ("fp32_accuracy", "int8_accuracy", "top1_agreement"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["accuracy_drop_points"] == pytest.approx(
        100 * (metrics["fp32_accuracy"] - metrics["int8_accuracy"])
    )
    onnx_dir = Path(params.paths.onnx_dir)
    assert metrics["fp32_mb"] == pytest.approx((onnx_dir / rt.FP32_FILE).stat().st_size / 1e6)
    assert metrics["int8_mb"] < metrics["fp32_mb"]
    for runtime in ("torch", "ort_fp32", "ort_int8"):
        assert metrics[f"{runtime}_batch1_ms"] > 0 and metrics[f"{runtime}_batch32_img_per_s"] > 0


def test_fp32_model_has_a_dynamic_batch_axis_and_the_opset(exported_project):
    params = exported_project
    path = Path(params.paths.onnx_dir) / rt.FP32_FILE
    model = onnx.load(str(path))
    assert [(e.domain, e.version) for e in model.opset_import if e.domain in ("", "ai.onnx")] == [("", 18)]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic, not a fixed size
    sess = rt.session(path)
    for batch in (1, 5):
        assert rt.logits(sess, np.zeros((batch, 3, 32, 32), np.float32)).shape == (batch, 3)


def test_int8_model_is_static_qdq_with_per_channel_weights(exported_project):
    params = exported_project
    model = onnx.load(str(Path(params.paths.onnx_dir) / rt.INT8_FILE))
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]  # + weight DQs
    inits = {init.name: init for init in model.graph.initializer}
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    weight_dq = next(node for node in model.graph.node if node.output[0] == conv.input[1])
    assert weight_dq.op_type == "DequantizeLinear"
    assert inits[weight_dq.input[0]].data_type == onnx.TensorProto.INT8
    scale = onnx.numpy_helper.to_array(inits[weight_dq.input[1]])
    assert (
        scale.ndim == 1 and scale.size == onnx.numpy_helper.to_array(inits[weight_dq.input[0]]).shape[0] > 1
    )


def test_stratified_sample_keeps_class_shares_and_is_seeded():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    chosen = rt.stratified_sample(labels, 10, seed=1)
    assert Counter(labels[chosen].tolist()) == {0: 6, 1: 3, 2: 1}
    assert np.array_equal(chosen, rt.stratified_sample(labels, 10, seed=1))
    assert not np.array_equal(chosen, rt.stratified_sample(labels, 10, seed=2))
    assert len(rt.stratified_sample(labels, 500, seed=1)) == 100


def test_gate_passes_within_the_limit_and_names_figure_and_params_beyond_it():
    q = QuantizeParams(max_accuracy_drop=1.0)
    quantize.check_accuracy_drop(1.0, q)
    quantize.check_accuracy_drop(-2.0, q)  # INT8 better than FP32
    with pytest.raises(PipelineError) as failure:
        quantize.check_accuracy_drop(1.25, q)
    for needed in ("1.25 points", "quantize.max_accuracy_drop", "quantize.calibration_images", "entropy"):
        assert needed in str(failure.value)
    assert "quantize.exclude_nodes" in str(failure.value) and "quantize.enabled: false" in str(failure.value)


def test_drop_counts_whole_images_so_a_drop_at_the_limit_passes():
    assert 100.0 * (0.849 - 0.844) > 0.5  # what a float difference gives for 5 of 1,000 images
    assert quantize.drop_points(0.849, 0.844, 1000) == 0.5
    quantize.check_accuracy_drop(
        quantize.drop_points(0.849, 0.844, 1000), QuantizeParams(max_accuracy_drop=0.5)
    )
    assert quantize.drop_points(0.5, 0.75, 4) == -25.0


def test_gate_fails_the_stage_when_int8_really_loses_accuracy(tmp_path):
    """A model whose class margins are far below the INT8 step of its logits: a 4th class that never wins
    stretches the logit range to about [-200, 0], so the INT8 logits of the 3 real classes tie and INT8
    always answers class 0, while FP32 (whose answers are taken as the labels) is right by construction."""
    torch.manual_seed(0)
    model = build_model(ModelParams(backbone="test_efficientnet", weights="none", image_size=32), 4).eval()
    linear = model.head[-1]
    with torch.no_grad():
        linear.weight.mul_(1e-4)
        linear.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -200.0]))
    names = ("class_0", "class_1", "class_2", "never")
    params = model_project(tmp_path, model=model, class_names=names, quantize={"max_accuracy_drop": 1.0})
    _label_test_rows_with_fp32_predictions(params, model, names)

    with pytest.raises(PipelineError, match="quantize.max_accuracy_drop"):
        quantize.run(params)
    metrics = read_json(params.paths.metrics("quantize"))  # written before the gate, for inspection
    assert metrics["fp32_accuracy"] == 1.0
    assert metrics["accuracy_drop_points"] > 1.0


def test_unknown_excluded_node_is_named(exported_project, tmp_path):
    params = exported_project
    fp32 = Path(params.paths.onnx_dir) / rt.FP32_FILE
    q = QuantizeParams(exclude_nodes=["no_such_node"])
    with pytest.raises(PipelineError, match=r"quantize.exclude_nodes: no node named \['no_such_node'\]"):
        quantize.quantize_onnx(fp32, tmp_path / "int8.onnx", np.zeros((2, 3, 32, 32), np.float32), q)


def _label_test_rows_with_fp32_predictions(params, model, names) -> None:
    with open(params.paths.splits, newline="") as handle:
        rows = list(csv.DictReader(handle))
    test = [row for row in rows if row["split"] == "test"]
    inputs = rt.load_inputs(
        [Path(params.paths.data_root) / row["path"] for row in test], resolve_data_config(params.model)
    )
    with torch.inference_mode():
        predicted = model(torch.from_numpy(inputs)).argmax(1).tolist()
    assert len(set(predicted)) > 1, "the construction needs FP32 answers other than class 0"
    for row, index in zip(test, predicted, strict=True):
        row["label"] = names[index]
    with open(params.paths.splits, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
