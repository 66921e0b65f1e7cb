"""Promotion gate: the decision rule, and what promote() copies (or leaves alone) in champion_dir."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.champion import CHAMPION_METRICS, decide, promote
from pipeline.config import Params
from pipeline.errors import PipelineError


@pytest.mark.parametrize(
    ("new", "champion", "promoted"),
    [
        (0.80, None, True),  # first model ever
        (0.90, 0.80, True),  # better
        (0.796, 0.80, True),  # worse, but within the tolerance
        (0.794, 0.80, False),  # worse by more than the tolerance
        (math.nan, 0.80, False),
        (math.nan, None, False),
    ],
)
def test_decide(new, champion, promoted):
    decision = decide("accuracy", new, champion, tolerance=0.005)
    assert decision.promoted is promoted
    assert (decision.new, decision.champion, decision.tolerance) == (
        pytest.approx(new, nan_ok=True),
        champion,
        0.005,
    )
    assert decision.reason


def _candidate(root: Path, params: Params, accuracy: float, weights: bytes) -> None:
    """What the pipeline leaves behind: a model, an export folder and the stages' metrics."""
    paths = params.paths
    (root / paths.model).parent.mkdir(parents=True, exist_ok=True)
    (root / paths.model).write_bytes(weights)
    (root / paths.export_dir).mkdir(parents=True, exist_ok=True)
    (root / paths.export_dir / "model.onnx").write_bytes(weights[::-1])
    (root / paths.metrics_dir).mkdir(parents=True, exist_ok=True)
    metrics = {"evaluate": {"accuracy": accuracy, "macro_f1": accuracy - 0.1}, "quantize": {}, "export": {}}
    for stage, values in metrics.items():
        (root / paths.metrics(stage)).write_text(json.dumps(values))


def _champion(root: Path, params: Params) -> tuple[dict, bytes]:
    folder = root / params.paths.champion_dir
    record = json.loads((folder / CHAMPION_METRICS).read_text())
    return record, (folder / params.paths.model.name).read_bytes()


def test_promote_copies_first_model_then_gates_the_next(tmp_path):
    params = Params.from_dict({"orchestrate": {"promote_tolerance": 0.01}})
    _candidate(tmp_path, params, accuracy=0.80, weights=b"first")

    first = promote(params, tmp_path)
    assert first["promoted"] and first["champion"] is None
    record, weights = _champion(tmp_path, params)
    assert weights == b"first"
    assert record["stages"]["evaluate"]["accuracy"] == 0.80
    assert (tmp_path / params.paths.champion_dir / "export" / "model.onnx").read_bytes() == b"tsrif"

    again = promote(params, tmp_path)
    assert again == {**first, "promoted": False, "champion": 0.80, "reason": "already champion"}

    _candidate(tmp_path, params, accuracy=0.78, weights=b"worse")
    worse = promote(params, tmp_path)
    assert not worse["promoted"] and worse["new"] == 0.78 and worse["champion"] == 0.80
    assert _champion(tmp_path, params)[1] == b"first", "a rejected model must not touch the champion"

    _candidate(tmp_path, params, accuracy=0.795, weights=b"close")
    close = promote(params, tmp_path)
    assert close["promoted"], close
    record, weights = _champion(tmp_path, params)
    assert weights == b"close" and record["value"] == 0.795


def test_gate_compares_on_the_configured_metric(tmp_path):
    params = Params.from_dict({"orchestrate": {"promote_metric": "macro_f1", "promote_tolerance": 0.0}})
    _candidate(tmp_path, params, accuracy=0.80, weights=b"first")
    promote(params, tmp_path)
    _candidate(tmp_path, params, accuracy=0.79, weights=b"second")
    decision = promote(params, tmp_path)
    assert decision["metric"] == "macro_f1"
    assert decision["champion"] == pytest.approx(0.70) and decision["new"] == pytest.approx(0.69)
    assert not decision["promoted"]


def test_unknown_metric_names_the_file_and_the_key(tmp_path):
    params = Params.from_dict({"orchestrate": {"promote_metric": "acc"}})
    _candidate(tmp_path, params, accuracy=0.8, weights=b"m")
    with pytest.raises(PipelineError, match=r"evaluate\.json: no metric 'acc'.*orchestrate\.promote_metric"):
        promote(params, tmp_path)


def test_missing_metrics_say_to_run_the_pipeline(tmp_path):
    with pytest.raises(PipelineError, match=r"evaluate\.json: metrics missing; run the pipeline"):
        promote(Params(), tmp_path)
