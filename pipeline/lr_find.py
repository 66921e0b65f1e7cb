"""Learning-rate range test (Smith 2017, as fastai's `lr_find`): train on the current data and strategy while
the lr grows exponentially from `start_lr` to `end_lr`, one step a batch, and watch the smoothed loss.

The ramp sets `train.lr` (the head at `head_lr_mult` times it, as in training) for the strategy's last phase,
the one `train.lr` matters for (progressive: fine-tuning; linear_probe: the head on cached features). The
run stops once the smoothed loss exceeds 4x its minimum (divergence). Two classic readings are reported:
the lr of the steepest descent of the smoothed loss, and the lr of its minimum / 10; the suggested
`train.lr` is the smaller one (a fine-tuning lr too low costs epochs, one too high costs the pretraining).
Nothing the pipeline uses is written: reports/lr_find/ gets lr_find.png and lr_find.json.
"""

from __future__ import annotations

import logging
import math
from io import BytesIO
from typing import Any

import numpy as np

from pipeline.config import Params
from pipeline.errors import PipelineError
from pipeline.io import write_bytes, write_json
from pipeline.stages.train import Prepared, prepare
from pipeline.training import distributed
from pipeline.training.optim import set_lr

log = logging.getLogger(__name__)

SMOOTHING = 0.98  # fastai's exponential moving average of the loss (bias-corrected)
DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times its minimum
_SKIP_START = 3  # the first readings of the smoothed loss are too noisy to count as its minimum or slope


def run(params: Params, steps: int = 100, start_lr: float = 1e-7, end_lr: float = 10.0) -> dict[str, Any]:
    """The range test on `params`' data and strategy; writes the plot and the figures under
    `paths.reports_dir`/lr_find and returns the figures (`suggested_lr` among them)."""
    if not 0 < start_lr < end_lr or steps < 2 * _SKIP_START + 2:
        raise PipelineError(
            f"lr-find: need 0 < --start-lr < --end-lr and --steps >= {2 * _SKIP_START + 2}, got "
            f"{start_lr:g}, {end_lr:g}, {steps}"
        )
    env, device = distributed.setup(params.train.device)
    try:
        lrs, losses = _range_test(prepare(params, env, device), np.geomspace(start_lr, end_lr, steps))
    finally:
        distributed.teardown(env)
    figures = suggest(lrs, losses)
    folder = params.paths.reports("lr_find")
    write_bytes(folder / "lr_find.png", _plot(lrs, smoothed(losses), figures))
    figures.update(steps_run=len(lrs), steps_planned=steps, start_lr=start_lr, end_lr=end_lr)
    figures.update(strategy=params.train.strategy, backbone=params.model.backbone, lrs=lrs, losses=losses)
    write_json(folder / "lr_find.json", figures)
    log.info("lr-find: suggested train.lr %.2e -> %s", figures["suggested_lr"], folder)
    return figures


def _range_test(prepared: Prepared, ramp: np.ndarray) -> tuple[list[float], list[float]]:
    """Train one batch per lr of `ramp` (cycling through epochs of data) until the loss diverges, in the
    strategy's last phase."""
    data, trainer = prepared.data, prepared.trainer
    plan, lrs, losses = prepared.plans[-1], [], []
    module = trainer.start_epoch(plan)
    for epoch in range(len(ramp)):
        for x, y in data.train(epoch, plan.on_features)[0]:
            set_lr(trainer.optimizer, float(ramp[len(lrs)]))
            lrs.append(float(ramp[len(lrs)]))
            losses.append(trainer.step(module, x, y))
            if len(lrs) == len(ramp) or _diverged(losses):
                return lrs, losses
    return lrs, losses


def smoothed(losses: list[float]) -> np.ndarray:
    """fastai's bias-corrected exponential moving average of the losses."""
    average, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        out.append(average / (1 - SMOOTHING**i))
    return np.asarray(out)


def _diverged(losses: list[float]) -> bool:
    curve = smoothed(losses)
    return not math.isfinite(losses[-1]) or (
        len(curve) > _SKIP_START and curve[-1] > DIVERGED * curve[_SKIP_START:].min()
    )


def suggest(lrs: list[float], losses: list[float]) -> dict[str, float]:
    """The steepest-descent lr, the minimum's lr / 10, and the suggestion (the smaller of the two)."""
    curve = smoothed(losses)
    if len(curve) < 2 * _SKIP_START + 2:
        raise PipelineError(
            f"lr-find: the loss diverged after {len(curve)} steps; lower --start-lr (now {lrs[0]:g})"
        )
    finite = np.where(np.isfinite(curve), curve, np.inf)
    lowest = _SKIP_START + int(np.argmin(finite[_SKIP_START:]))
    slopes = np.gradient(finite[_SKIP_START:], np.log(lrs[_SKIP_START:]))
    steepest = _SKIP_START + int(np.nanargmin(np.where(np.isfinite(slopes), slopes, np.nan)))
    figures = {"steepest_lr": lrs[steepest], "min_loss_lr": lrs[lowest], "min_over_10_lr": lrs[lowest] / 10}
    return {**figures, "suggested_lr": min(figures["steepest_lr"], figures["min_over_10_lr"])}


def _plot(lrs: list[float], curve: np.ndarray, figures: dict[str, float]) -> bytes:
    """Smoothed loss against the lr (log axis), the two readings and the suggestion marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(lrs, curve, color="tab:blue", label="smoothed training loss")
    for key, style in (("steepest_lr", ":"), ("min_over_10_lr", "--")):
        ax.axvline(figures[key], color="grey", linestyle=style, label=f"{key} {figures[key]:.1e}")
    ax.axvline(
        figures["suggested_lr"], color="tab:red", label=f"suggested train.lr {figures['suggested_lr']:.1e}"
    )
    finite = curve[np.isfinite(curve)]
    ax.set_ylim(finite.min() * 0.95, min(finite.max(), DIVERGED * finite.min()) * 1.05)
    ax.set(xscale="log", xlabel="train.lr (the head at head_lr_mult x)", ylabel="loss", title="lr range test")
    ax.legend(fontsize="small")
    buffer = BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
