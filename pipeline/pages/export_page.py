"""The export stage's page (where its contract says: `reports/export/index.html` by default): which model is
served and why, INT8 vs FP32, the quantization candidates, and the ONNX parity check, from the quantize and
export stages' JSON files.

The run report is written by evaluate, before these stages run, so it links here. Any of the files may be
missing or lack keys (an older quantize stage, quantization disabled): the page shows what is there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.config import PathsParams
from pipeline.io import read_optional_json, write_text
from pipeline.pages import page
from pipeline.serving import onnx_runtime as rt

_FILES = {"int8": rt.INT8_FILE, "fp32": rt.FP32_FILE}
# (label, key, format): accuracy from metrics/quantize.json, the rest from the report's "fp32"/"int8" runs.
_ACCURACY = ("accuracy on the compared images (val + test)", "accuracy", "{:.2%}")
_RUNTIME = (
    ("size (MB)", "mb", "{:.1f}"),
    ("ONNX Runtime, batch 1 (ms)", "batch1_ms", "{:.2f}"),
    ("ONNX Runtime, batch 32 (img/s)", "batch32_img_per_s", "{:.0f}"),
)
_AGREEMENT = (
    ("INT8 / FP32 top-1 agreement", "top1_agreement", "{:.2%}"),
    ("INT8 speed-up at batch 1 (timed right after FP32)", "int8_speedup_batch1", "{:.2f}x"),
    ("INT8 format", "int8_format", "{}"),
)
# One row per INT8 candidate (the quantize report's keys), then its verdict.
_CANDIDATE_COLUMNS = (
    ("format", "format", "{}"),
    ("images", "n", "{:d}"),
    ("agreement with FP32", "agreement", "{:.1%}"),
    ("upper bound", "agreement_upper", "{:.1%}"),
    ("INT8 accuracy", "candidate_accuracy", "{:.1%}"),
    ("only FP32 right", "worse", "{:d}"),
    ("only INT8 right", "better", "{:d}"),
    ("McNemar p", "p_worse", "{:.3g}"),
    ("speed-up, batch 1", "speedup_batch1", "{:.2f}x"),
    ("same integers on every x86 CPU", "portable", "{}"),
    ("nodes left in FP32 (sensitivity search)", "fp32_nodes", "{}"),
)
_PARITY = (
    ("test images", "n", "{:d}"),
    ("ONNX Runtime / PyTorch top-1 agreement", "top1_agreement", "{:.2%}"),
    ("max |logit difference|", "max_abs_logit_diff", "{:.2g}"),
    ("opset", "opset", "{}"),
)
_PARITY_NOTE = "ONNX Runtime (FP32 export) against PyTorch on the test split, checked by every export."


def write_export_page(paths: PathsParams, target: Path, model_card: Path) -> Path:
    """Build the page from metrics/export.json, metrics/quantize.json and the quantize report; write it to
    `target` (the export stage's contract says where). `model_card`: the export folder's model card, linked
    from the page by its path relative to `target`."""
    sources = {
        "export": _read(paths.metrics("export")),
        "quantize": _read(paths.metrics("quantize")),
        "report": _read(Path(paths.onnx_dir) / rt.QUANTIZE_REPORT),
    }
    card = os.path.relpath(model_card, target.parent)
    return write_text(target, render_export_page(sources, Path(card).as_posix()))


def _read(path: Path) -> dict[str, Any] | None:
    data = read_optional_json(path)
    return data if isinstance(data, dict) else None


def served_model(export: dict, quantize: dict, report: dict) -> tuple[str | None, str]:
    """("int8" | "fp32" | None when unknown, why): the export stage's word first, then quantize's decision."""
    decision = report.get("decision") if isinstance(report.get("decision"), dict) else {}
    served = export.get("served")
    if served not in _FILES:
        shipped = decision.get("shipped", quantize.get("int8_shipped"))
        served = None if shipped is None else "int8" if shipped else "fp32"
    reason = decision.get("reason") or "no reason recorded (the quantize report has no decision.reason)"
    return served, str(reason)


def render_export_page(sources: dict[str, dict | None], model_card: str) -> str:
    """sources: {"export": metrics/export.json, "quantize": metrics/quantize.json, "report": the quantize
    report}, each None when missing. model_card: the link to the export folder's model card."""
    export, quantize, report = (sources.get(k) or {} for k in ("export", "quantize", "report"))
    sections = [
        ("served", "Served model", _served(export, quantize, report, model_card)),
        ("comparison", "INT8 vs FP32", _comparison(quantize, report, sources.get("quantize") is None)),
        ("candidates", "Quantization candidates", _candidates(report)),
        ("parity", "ONNX parity check", _parity(export)),
        ("raw", "Raw figures", _raw(sources)),
    ]
    return page.document("Quantize and export", sections)


def _served(export: dict, quantize: dict, report: dict, model_card: str) -> str:
    served, reason = served_model(export, quantize, report)
    if served is None:
        return page.note("Not known: metrics/export.json and metrics/quantize.json say nothing of it.")
    return (
        page.cards([("served model", served.upper(), "good"), ("file", _FILES[served], "")])
        + f"<p><strong>Why:</strong> {page.esc(reason)}</p>"
        + (f"<p><strong>CPUs:</strong> {page.esc(checked)}</p>" if (checked := _checked_for(report)) else "")
        + f"<p>Model card: {page.link(model_card, model_card)}</p>"
    )


def _checked_for(report: dict) -> str:
    """Which CPUs the shipped INT8 model's agreement holds on (the quantize report's word), or ""."""
    decision = report.get("decision") if isinstance(report.get("decision"), dict) else {}
    return str(decision.get("checked_for") or "")


def _comparison(quantize: dict, report: dict, missing: bool) -> str:
    if missing:
        return page.note("No metrics/quantize.json: the quantize stage did not complete.")
    runtimes = [report.get(key) if isinstance(report.get(key), dict) else {} for key in ("fp32", "int8")]
    label, key, spec = _ACCURACY
    rows = [(label, _shown(quantize.get(f"fp32_{key}"), spec), _shown(quantize.get(f"int8_{key}"), spec))]
    rows += [
        (label, *(_shown(figures.get(key), spec) for figures in runtimes))
        for label, key, spec in _RUNTIME
        if any(key in figures for figures in runtimes)
    ]
    agreement = [(label, _shown(quantize[key], spec)) for label, key, spec in _AGREEMENT if key in quantize]
    compared = report.get("compared", {}).get("n") if isinstance(report.get("compared"), dict) else None
    if compared is not None:
        agreement.insert(0, ("images compared (val + test)", str(compared)))
    return page.table(["", "FP32", "INT8"], rows) + page.table(["", "value"], agreement)


def _shown(value: Any, spec: str) -> str:
    """`value` formatted by `spec`; "-" when missing; plainly when it is not of the kind `spec` expects."""
    if value is None:
        return "-"
    try:
        return spec.format(value)
    except (TypeError, ValueError):
        return page.fmt(value)


def _candidates(report: dict) -> str:
    listed = report.get("candidates")
    candidates = [c for c in listed if isinstance(c, dict)] if isinstance(listed, list) else []
    cpu = report.get("cpu") if isinstance(report.get("cpu"), dict) else {}
    parts = [page.table(["CPU", "value"], sorted(cpu.items()))] if cpu else []
    if not candidates:
        parts.append(page.note("No candidates recorded (no quantize report, or quantization disabled)."))
        return "".join(parts)
    rows = (
        [_shown(c.get(key), spec) for _, key, spec in _CANDIDATE_COLUMNS] + [_verdict(c)] for c in candidates
    )
    parts.append(page.table([label for label, _, _ in _CANDIDATE_COLUMNS] + ["verdict"], rows))
    return "".join(parts)


def _verdict(candidate: dict) -> str:
    reasons = candidate.get("rejected_because")
    if candidate.get("passed") or reasons == []:
        return "passed"
    return "rejected: " + "; ".join(map(str, reasons)) if isinstance(reasons, list) else page.fmt(reasons)


def _parity(export: dict) -> str:
    rows = [(label, _shown(export[key], spec)) for label, key, spec in _PARITY if key in export]
    if not rows:
        return page.note("No parity figures: metrics/export.json is missing or has none.")
    return page.note(_PARITY_NOTE) + page.table(["", "value"], rows)


def _raw(sources: dict[str, dict | None]) -> str:
    names = {
        "export": "metrics/export.json",
        "quantize": "metrics/quantize.json",
        "report": rt.QUANTIZE_REPORT,
    }
    return "".join(
        page.details(names[key], page.note("missing") if data is None else page.key_values(data))
        for key, data in sources.items()
    )
