"""The export page: which model is served and why, INT8 vs FP32, candidates, parity; whatever files exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.io import read_json, write_json
from pipeline.pages import export_page
from pipeline.serving import onnx_runtime as rt

QUANTIZE = {
    "fp32_accuracy": 0.85,
    "int8_accuracy": 0.8417,
    "top1_agreement": 0.975,
    "int8_speedup_batch1": 2.31,
    "int8_mb": 3.9,
    "int8_format": "u8s8_reduce_range",
    "int8_shipped": True,
}
REPORT = {
    "compared": {"splits": ["val", "test"], "n": 120},
    "fp32": {"mb": 13.7, "batch1_ms": 3.0, "batch32_img_per_s": 400.0},
    "int8": {"mb": 3.9, "batch1_ms": 1.3, "batch32_img_per_s": 900.0},
    "decision": {"shipped": True, "format": "u8s8_reduce_range", "reason": "agreement 97.5% >= 97%, 2.3x"},
    "candidates": [
        {"format": "u8s8_reduce_range", "agreement": 0.975, "candidate_accuracy": 0.8417, "p_worse": 0.62,
         "speedup_batch1": 2.31, "passed": True, "rejected_because": []},
        {"format": "s8s8", "agreement": 0.91, "candidate_accuracy": 0.80, "p_worse": 0.01,
         "speedup_batch1": 2.5, "passed": False, "rejected_because": ["agreement 91.0% < 97%"]},
    ],
    "cpu": {"model": "AMD EPYC 9R14", "vnni": True, "avx512": True},
}  # fmt: skip
EXPORT = {"n": 60, "top1_agreement": 1.0, "max_abs_logit_diff": 1.2e-5, "opset": 18, "served": "int8"}
FP32_REASON = "no candidate kept 97% top-1 agreement with FP32: serving FP32"


def _sections(page: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', page, re.S))


def _render(export=EXPORT, quantize=QUANTIZE, report=REPORT) -> dict[str, str]:
    page = export_page.render_export_page(
        {"export": export, "quantize": quantize, "report": report}, "../../models/export/model_card.md"
    )
    for forbidden in ("http://", "https://", "<script", "<link", "url("):
        assert forbidden not in page, forbidden
    return _sections(page)


def test_int8_served_says_so_and_why_and_compares_with_fp32():
    sections = _render()
    assert list(sections) == ["served", "comparison", "candidates", "parity", "raw"]
    served = sections["served"]
    assert ">INT8<" in served and "model.int8.onnx" in served and "FP32" not in served
    assert "agreement 97.5% &gt;= 97%, 2.3x" in served
    assert '<a href="../../models/export/model_card.md">' in served
    comparison = sections["comparison"]
    for shown in (
        "85.00%",
        "84.17%",
        "13.7",
        "3.9",
        "3.00",
        "1.30",
        "u8s8_reduce_range",
        "120",
        "2.31x",
    ):
        assert shown in comparison, shown
    candidates = sections["candidates"]
    assert "<th>verdict</th>" in candidates and "rejected: agreement 91.0% &lt; 97%" in candidates
    assert "s8s8" in candidates and "0.62" in candidates
    assert "AMD EPYC 9R14" in candidates
    assert "1.2e-05" in sections["parity"] and "100.00%" in sections["parity"]
    assert sections["raw"].count("<details>") == 3


def test_fp32_served_names_the_fp32_file_and_the_reason():
    report = {**REPORT, "decision": {"shipped": False, "format": "none", "reason": FP32_REASON}}
    sections = _render(
        export={**EXPORT, "served": "fp32"}, quantize={**QUANTIZE, "int8_shipped": False}, report=report
    )
    served = sections["served"]
    assert ">FP32<" in served and "model.onnx" in served and "model.int8.onnx" not in served
    assert FP32_REASON in served


@pytest.mark.parametrize(
    ("export", "quantize", "report", "expected"),
    [
        (
            {"served": "fp32"},
            {"int8_shipped": True},
            {"decision": {"shipped": True}},
            "fp32",
        ),  # export's word
        ({"n": 3}, {"int8_shipped": False}, {}, "fp32"),  # no `served` yet: quantize's decision
        ({"int8": True}, {}, {"decision": {"shipped": True}}, "int8"),
        ({}, {}, {}, None),
    ],
)
def test_served_model_is_exports_word_else_the_quantize_decision(export, quantize, report, expected):
    assert export_page.served_model(export, quantize, report)[0] == expected


def test_missing_files_and_keys_are_shown_as_missing_not_a_crash():
    sections = _render(export=None, quantize=None, report=None)
    assert "Not known" in sections["served"]
    assert "No metrics/quantize.json" in sections["comparison"]
    assert "No candidates recorded" in sections["candidates"]
    assert "No parity figures" in sections["parity"]
    assert sections["raw"].count("missing") == 3
    partial = _render(
        export={"served": "int8"},
        quantize={"fp32_accuracy": 0.9},
        report={"candidates": 5, "fp32": {"mb": 13.7}},
    )
    assert "no reason recorded" in partial["served"]
    assert "13.7" in partial["comparison"] and "<td>-</td>" in partial["comparison"]  # INT8 size unknown


def test_page_is_written_under_reports_with_a_relative_model_card_link(tmp_path):
    from pipeline.config import Params

    params = Params.from_dict(
        {"paths": {k: str(tmp_path / k) for k in ("metrics_dir", "reports_dir", "onnx_dir", "export_dir")}}
    )
    write_json(params.paths.metrics("export"), EXPORT)
    write_json(Path(params.paths.onnx_dir) / rt.QUANTIZE_REPORT, REPORT)
    page = params.paths.reports("export") / "index.html"
    target = export_page.write_export_page(params.paths, page, params.paths.export_dir / "model_card.md")
    assert target == page == params.paths.reports_dir / "export" / "index.html"
    sections = _sections(target.read_text(encoding="utf-8"))
    assert '<a href="../../export_dir/model_card.md">' in sections["served"]
    assert "No metrics/quantize.json" in sections["comparison"] and "s8s8" in sections["candidates"]


def test_export_stage_writes_the_page(exported_project):
    params = exported_project
    sections = _sections((params.paths.reports_dir / "export" / "index.html").read_text(encoding="utf-8"))
    metrics = read_json(params.paths.metrics("export"))
    assert metrics["served"] == "int8" and ">INT8<" in sections["served"]
    assert f"<td>{metrics['n']}</td>" in sections["parity"]
