"""lr-find: fastai's range test on the split data with the current strategy; plot, figures, suggestion."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import train_params
from typer.testing import CliRunner

from pipeline import lr_find
from pipeline.__main__ import app
from pipeline.errors import PipelineError

pytestmark = pytest.mark.usefixtures("single_thread")


def test_suggestions_read_the_steepest_descent_and_the_minimum_of_the_smoothed_loss():
    lrs = list(np.geomspace(1e-6, 1.0, 200))
    x = np.log10(lrs)
    # Flat, a steep fall centred at 1e-3, the minimum near 1e-2, then a blow-up.
    losses = list(2.0 - np.tanh(2 * (x + 3)) + np.where(x > -2, 30 * (x + 2) ** 2, 0.0))
    figures = lr_find.suggest(lrs, losses)
    # The smoothing (beta 0.98) lags the raw curve by about 1/(1 - beta) = 50 steps of 0.03 decades.
    assert 1e-3 < figures["steepest_lr"] < 1e-2 and 1e-2 < figures["min_loss_lr"] < 1e-1
    assert figures["min_over_10_lr"] == pytest.approx(figures["min_loss_lr"] / 10)
    assert figures["suggested_lr"] == min(figures["steepest_lr"], figures["min_over_10_lr"])
    smooth = lr_find.smoothed([1.0] * 5)
    np.testing.assert_allclose(smooth, 1.0)  # bias-corrected: a constant stays itself from the first step


def test_range_test_ramps_exponentially_stops_at_divergence_and_writes_the_plot(tmp_path):
    params = train_params(tmp_path, paths={"reports_dir": str(tmp_path / "reports")})
    figures = lr_find.run(params, steps=60, start_lr=1e-5, end_lr=1e5)
    lrs = figures["lrs"]
    assert lrs[0] == pytest.approx(1e-5) and np.allclose(np.diff(np.log(lrs)), np.log(1e10) / 59)
    assert figures["steps_run"] < 60, "a lr of 1e5 must have diverged before the end of the ramp"
    curve = lr_find.smoothed(figures["losses"])
    assert curve[-1] > lr_find.DIVERGED * curve[3:].min() or not np.isfinite(figures["losses"][-1])
    assert lrs[0] <= figures["suggested_lr"] <= lrs[-1]
    folder = tmp_path / "reports" / "lr_find"
    assert (folder / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((folder / "lr_find.json").read_text())["suggested_lr"] == figures["suggested_lr"]
    assert not params.paths.model.exists()  # nothing the pipeline uses is written


def test_cli_prints_the_suggestion_and_refuses_a_bad_ramp_in_one_line(tmp_path):
    import yaml

    params = train_params(tmp_path, paths={"reports_dir": str(tmp_path / "reports")})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.to_dict()))
    args = ["lr-find", "--params", str(params_file), "--steps", "12", "--start-lr", "1e-4", "--end-lr", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "lr-find: suggested train.lr: " in result.output
    bad = CliRunner().invoke(app, [*args[:-2], "--start-lr", "1", "--end-lr", "1e-3"])
    assert bad.exit_code == 1 and "need 0 < --start-lr < --end-lr" in bad.output
    with pytest.raises(PipelineError, match="diverged after"):
        lr_find.suggest([1e-3, 1e-2, 1e-1], [1.0, 2.0, 50.0])
