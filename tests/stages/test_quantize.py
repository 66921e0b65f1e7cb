"""quantize stage: FP32 ONNX export, static INT8 QDQ quantization, measured figures, the accuracy gate."""

from __future__ import annotations

import csv
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import PROJECT_ROOT, model_project

from pipeline import stats
from pipeline.config import ModelParams, QuantizeParams
from pipeline.data.sampling import stratified_sample
from pipeline.errors import PipelineError
from pipeline.io import read_json
from pipeline.models import build_model, resolve_data_config
from pipeline.serving import onnx_runtime as rt
from pipeline.serving.predict import Predictor
from pipeline.stages import export, quantize
from pipeline.stages.quantize import int8


def test_metrics_are_the_headline_and_the_report_holds_every_candidate(exported_project):
    params = exported_project
    metrics = read_json(params.paths.metrics("quantize"))
    report = read_json(Path(params.paths.onnx_dir) / rt.QUANTIZE_REPORT)
    assert report["compared"] == {"splits": ["val", "test"], "n": 12}  # 3 val + 9 test images
    assert [c["format"] for c in report["candidates"]] == params.quantize.formats == ["u8s8_portable", "u8s8"]
    assert all(c["n"] == 12 and c["passed"] for c in report["candidates"])
    assert [c["portable"] for c in report["candidates"]] == [True, False]
    assert metrics["int8_shipped"] is True and metrics["int8_format"] == report["decision"]["format"]
    assert metrics["int8_format"] == "u8s8_portable" and metrics["int8_portable"] is True  # portable first
    assert "the same integers on every x86 CPU" in report["decision"]["checked_for"]
    shipped = next(c for c in report["candidates"] if c["format"] == metrics["int8_format"])
    assert metrics["top1_agreement"] == shipped["agreement"]
    # The search ran for the portable format (it could ship) and not for u8s8 once that one passed.
    assert shipped["search"]["val_images"] == 3 and report["candidates"][1]["search"] == {}
    # So did the quantization-aware fine-tune, on the train images the project has (fewer than qat_images).
    assert shipped["qat"]["epochs"] == params.quantize.qat_epochs > 0 and report["candidates"][1]["qat"] == {}
    assert 0 < shipped["qat"]["images"] <= params.quantize.qat_images
    assert metrics["int8_accuracy"] == shipped["candidate_accuracy"]
    assert metrics["fp32_accuracy"] == shipped["reference_accuracy"]
    assert set(report["cpu"]) == {"model", "vnni", "avx512"}
    onnx_dir = Path(params.paths.onnx_dir)
    assert sorted(p.name for p in onnx_dir.iterdir()) == [rt.INT8_FILE, rt.FP32_FILE, rt.QUANTIZE_REPORT]
    assert report["fp32"]["mb"] == pytest.approx((onnx_dir / rt.FP32_FILE).stat().st_size / 1e6)
    assert metrics["int8_mb"] == report["int8"]["mb"] < report["fp32"]["mb"]
    for runtime in ("torch", "fp32", "int8"):
        assert report[runtime]["batch1_ms"] > 0 and report[runtime]["batch32_img_per_s"] > 0
    assert len(metrics) <= 8 and all(not isinstance(v, (dict, list)) for v in metrics.values())


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


def test_strip_provenance_removes_the_exporters_stack_traces_and_changes_no_output(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    folders = [str(f).encode() for f in (PROJECT_ROOT, Path(sys.prefix), Path(torch.__file__).parent)]
    exported = rt.export_onnx(model, tmp_path / "exported.onnx", (3, 8, 8), opset=18)
    assert not [folder for folder in folders if folder in exported.read_bytes()]  # export_onnx strips
    monkeypatch.setattr(rt, "strip_provenance", lambda path: path)  # what torch itself writes
    path = rt.export_onnx(model, tmp_path / "model.onnx", (3, 8, 8), opset=18)
    monkeypatch.undo()
    inputs = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    before = rt.logits(rt.session(path), inputs)
    onnx_model = onnx.load(str(path))
    onnx_model.metadata_props.add(key="class_names", value='["a"]')
    onnx.save(onnx_model, str(path))
    assert any(folder in path.read_bytes() for folder in folders)  # what torch writes: else nothing to test

    rt.strip_provenance(path)
    assert not [folder for folder in folders if folder in path.read_bytes()]
    stripped = onnx.load(str(path))
    assert not any(node.metadata_props or node.doc_string for node in stripped.graph.node)
    assert {p.key: p.value for p in stripped.metadata_props} == {"class_names": '["a"]'}  # the model's own
    assert np.array_equal(rt.logits(rt.session(path), inputs), before)


def test_stratified_sample_keeps_class_shares_and_is_seeded():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    chosen = stratified_sample(labels, 10, seed=1)
    assert Counter(labels[chosen].tolist()) == {0: 6, 1: 3, 2: 1}
    assert np.array_equal(chosen, stratified_sample(labels, 10, seed=1))
    assert not np.array_equal(chosen, stratified_sample(labels, 10, seed=2))
    assert len(stratified_sample(labels, 500, seed=1)) == 100


def _comparison(worse: int, better: int, n: int) -> stats.PairedComparison:
    """FP32 right on every image; the candidate wrong on `worse` of them, and `better` more wrong for FP32."""
    labels = np.zeros(n, dtype=int)
    reference = labels.copy()
    reference[:better] = 1
    candidate = labels.copy()
    candidate[better : better + worse] = 1
    candidate[:better] = 0
    return stats.compare(reference, candidate, labels)


def test_gate_lets_one_or_two_flips_on_a_small_set_pass_and_fails_a_real_loss():
    q = QuantizeParams()
    assert quantize.gate(_comparison(worse=2, better=0, n=56), speedup=2.0, q=q) == []
    assert quantize.gate(_comparison(worse=3, better=0, n=20), speedup=2.0, q=q) == []
    lost = quantize.gate(_comparison(worse=40, better=5, n=566), speedup=2.0, q=q)
    assert any("McNemar p" in reason and "quantize.alpha" in reason for reason in lost)
    assert any("quantize.min_agreement" in reason for reason in lost)
    slow = quantize.gate(_comparison(worse=0, better=0, n=56), speedup=0.9, q=q)
    assert len(slow) == 1 and "quantize.min_speedup = 1.2" in slow[0]


def test_gate_rejects_much_disagreement_even_when_accuracy_is_equal():
    c = _comparison(worse=30, better=30, n=360)  # 83% agreement, no accuracy change
    assert c.p_worse > 0.5
    reasons = quantize.gate(c, speedup=2.0, q=QuantizeParams())
    assert len(reasons) == 1 and "quantize.min_agreement" in reasons[0]


def test_choose_prefers_portable_then_agreement_then_speed_and_never_a_rejected_format():
    def candidate(fmt, worse, speedup, passed=True):
        reasons = [] if passed else ["rejected"]
        return quantize.Candidate(fmt, _comparison(worse, 0, 100), 1.0, speedup, reasons)

    a, b, c = (
        candidate("u8s8", 1, 2.0),
        candidate("u8s8_reduce_range", 3, 1.5),
        candidate("u8u8", 0, 9, False),
    )
    assert quantize.choose([a, b, c]) is b  # portable, though u8s8 agrees more on this CPU
    assert quantize.choose([b, candidate("u8s8_portable", 2, 1.4)]).format == "u8s8_portable"
    assert quantize.choose([a, candidate("s8s8", 1, 2.5)]).format == "s8s8"
    assert quantize.choose([a, candidate("u8s8_portable", 2, 2.0, False)]) is a
    assert quantize.choose([c]) is None and quantize.choose([]) is None


def _losing_model(tmp_path, **quantize_section):
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
    params = model_project(tmp_path, model=model, class_names=names, quantize=quantize_section)
    _label_rows_with_fp32_predictions(params, model, names)
    return params


def test_a_losing_int8_model_is_not_shipped_and_fp32_is_exported_with_the_reason(tmp_path):
    params = _losing_model(tmp_path, min_speedup=0.0)
    metrics = quantize.run(params)
    assert metrics["fp32_accuracy"] == 1.0 and metrics["int8_accuracy"] < 0.7
    assert metrics["int8_shipped"] is False and metrics["int8_format"] == "none"
    assert not (Path(params.paths.onnx_dir) / rt.INT8_FILE).exists()
    reason = read_json(Path(params.paths.onnx_dir) / rt.QUANTIZE_REPORT)["decision"]["reason"]
    assert (
        reason.startswith("no INT8 format passed the gate")
        and "u8s8_portable:" in reason
        and "u8s8:" in reason
    )
    assert export.run(params)["served"] == "fp32"
    card = (Path(params.paths.export_dir) / "model_card.md").read_text()
    assert f"served by default (`predict`): **FP32**, because {reason}" in card
    assert Predictor(params.paths.export_dir).served == "fp32"


def test_on_reject_error_fails_the_stage_after_writing_its_figures(tmp_path):
    params = _losing_model(tmp_path, min_speedup=0.0, on_reject="error")
    with pytest.raises(PipelineError, match="quantize.on_reject: fp32_only"):
        quantize.run(params)
    assert read_json(params.paths.metrics("quantize"))["int8_shipped"] is False


def test_unknown_excluded_node_is_named(exported_project, tmp_path):
    fp32 = Path(exported_project.paths.onnx_dir) / rt.FP32_FILE
    with pytest.raises(PipelineError, match=r"quantize.exclude_nodes: no node named \['no_such_node'\]"):
        int8.prepare(fp32, tmp_path / "prepared.onnx", ["no_such_node"])


def _label_rows_with_fp32_predictions(params, model, names) -> None:
    with open(params.paths.splits, newline="") as handle:
        rows = list(csv.DictReader(handle))
    test = [row for row in rows if row["split"] in ("val", "test")]
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


def test_dynamic_method_needs_no_calibration_images_and_quantizes_weights_only(tmp_path):
    from helpers import SHIP_ANY_INT8

    params = model_project(tmp_path, quantize={"method": "dynamic", "formats": ["u8s8"], **SHIP_ANY_INT8})
    with open(params.paths.splits, newline="") as handle:  # calibration would read these: gone
        for row in csv.DictReader(handle):
            if row["split"] == "train":
                (Path(params.paths.data_root) / row["path"]).unlink()
    metrics = quantize.run(params)
    onnx_dir = Path(params.paths.onnx_dir)
    assert metrics["int8_shipped"] is True
    assert read_json(onnx_dir / rt.QUANTIZE_REPORT)["method"] == "dynamic"
    ops = Counter(node.op_type for node in onnx.load(str(onnx_dir / rt.INT8_FILE)).graph.node)
    # Activations are quantized at run time from each batch; no calibrated QuantizeLinear anywhere.
    assert ops["DynamicQuantizeLinear"] > 0 and ops["QuantizeLinear"] == 0
    assert ops["ConvInteger"] + ops["MatMulInteger"] > 0
    static = QuantizeParams(method="static")
    with pytest.raises(PipelineError, match="unreadable"):  # the static method does need them
        quantize.run(params.model_copy(update={"quantize": static}))


def test_dynamic_method_still_goes_through_the_gate(tmp_path):
    gate = {"min_agreement": 0.0, "alpha": 1e-12, "min_speedup": 1000.0}
    params = model_project(tmp_path, quantize={"method": "dynamic", "formats": ["u8s8"], **gate})
    metrics = quantize.run(params)
    assert metrics["int8_shipped"] is False and not (Path(params.paths.onnx_dir) / rt.INT8_FILE).exists()
    reason = read_json(Path(params.paths.onnx_dir) / rt.QUANTIZE_REPORT)["decision"]["reason"]
    assert "quantize.min_speedup = 1000" in reason
