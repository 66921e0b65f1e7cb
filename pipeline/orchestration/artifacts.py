"""The markdown the flow publishes as a Prefect artifact: each stage's status, seconds and headline metrics,
and the champion gate's decision with both models' figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import PathsParams
from pipeline.io import read_optional_json


def metrics_markdown(paths: PathsParams, project: Path, stages: list[dict], decision: dict) -> str:
    lines = ["| stage | status | seconds | metrics |", "| --- | --- | ---: | --- |"]
    for run in stages:
        path = project / paths.metrics(run["stage"])
        figures = read_optional_json(path) or {}
        shown = ", ".join(f"{key} {value:.4g}" for key, value in figures.items() if _is_number(value))
        lines.append(f"| {run['stage']} | {run['status']} | {run['seconds']:.1f} | {shown} |")
    verdict = "promoted" if decision["promoted"] else "not promoted"
    lines += ["", f"**Champion gate**: {verdict} ({decision['reason']})", "", _gate_figures(decision)]
    return "\n".join(lines)


def _gate_figures(decision: dict) -> str:
    """Both models' accuracy on the same test images, and the McNemar p-value, as one markdown line."""
    figures = {"new": decision["new"], "champion": decision["champion"], "McNemar p": decision["p_value"]}
    shown = ", ".join(f"{name} {'-' if value is None else f'{value:.4g}'}" for name, value in figures.items())
    return (
        f"On the same {decision['images']} test images (sha256 {decision['test_sha256'][:12]}): accuracy "
        f"{shown}; margin {decision['margin']}, alpha {decision['alpha']}"
    )


def _is_number(value: Any) -> bool:
    """Top-level numbers of a metrics file are shown; text and nested groups (split's images) are not."""
    return isinstance(value, int | float) and not isinstance(value, bool)
