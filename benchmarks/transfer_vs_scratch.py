"""transfer_vs_scratch: the same backbone fine-tuned from the bundled ImageNet weights vs trained from random
weights, on 1%, 10% and 100% of the Fashion-MNIST train split, with the same budget, through the real train
and evaluate stages: test accuracy per (arm, fraction), a table, and a PNG plot of accuracy vs fraction.

The budget is a number of training images seen: each fraction trains for ceil(budget / its train images)
epochs (at most `max_epochs`), the same for both arms. Val and test are the same for every run; each
fraction's train set is a stratified, seeded subset of the full train split. Each arm's recipe is
params.yaml plus the shared `params` overrides plus the arm's own (random weights need trainable BatchNorm and
a larger lr).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks._common import (
    SMOKE_PARAMS,
    Options,
    listed_params,
    machine,
    prepare_splits,
    result,
    timed,
    with_overrides,
    workdir,
)
from pipeline.config import Params
from pipeline.io import atomic_path, read_json
from pipeline.stages import evaluate, train

NAME = "transfer_vs_scratch"
_FIXED_BUDGET = {"train.strategy": "full", "train.early_stopping_patience": 0}
_ARMS = {
    "pretrained": {"model.weights": "bundled"},
    "scratch": {
        "model.weights": "none",
        "train.freeze_bn": False,
        "train.lr": 1e-3,
        "train.head_lr_mult": 1.0,
    },
}
SETTINGS = {
    "full": {
        "fractions": [0.01, 0.1, 1.0],
        "budget_images": 30_000,
        "max_epochs": 30,
        "listing": {"val_per_class": 100, "test_per_class": 200},
        # 64 px fp32 (channels_last): lite0's fastest training on a 2-core CPU, as in fashion_mnist.
        "params": {**_FIXED_BUDGET, "model.image_size": 64, "train.precision": "fp32"},
        "arms": _ARMS,
    },
    "smoke": {
        "fractions": [0.1, 1.0],
        "budget_images": 18,
        "max_epochs": 1,
        "listing": {"val_per_class": 2, "train_per_class": 6, "test_per_class": 4},
        "params": {**_FIXED_BUDGET, **SMOKE_PARAMS},
        # timm's tiny test backbone has no ImageNet weights: both arms start from random weights here.
        "arms": {"pretrained": {}, "scratch": {"train.freeze_bn": False}},
    },
}
_OUTPUTS = ("model", "checkpoint_dir", "predictions", "calibration", "metrics_dir", "reports_dir", "live_dir")


def run(opts: Options) -> dict[str, Any]:
    started, settings = machine(), opts.settings(SETTINGS)
    rows = []
    with workdir(opts, NAME) as root:
        base = listed_params(opts, root, settings["listing"], settings["params"])
        prepare_splits(base)
        full = pd.read_csv(base.paths.splits, dtype=str, keep_default_na=False)
        for fraction in settings["fractions"]:
            splits = _subset(full, fraction, base.base.seed, root / f"fraction_{fraction:g}" / "splits.csv")
            n_train = int((splits["split"] == "train").sum())
            epochs = min(settings["max_epochs"], math.ceil(settings["budget_images"] / n_train))
            row: dict[str, Any] = {"fraction": fraction, "train_images": n_train, "epochs": epochs,
                                   "images_seen": epochs * n_train}  # fmt: skip
            for arm, overrides in settings["arms"].items():
                run_dir = root / f"fraction_{fraction:g}" / arm
                outputs = {f"paths.{k}": str(run_dir / k) for k in _OUTPUTS}
                splits_csv = str(run_dir.parent / "splits.csv")
                params = with_overrides(
                    base, {**overrides, **outputs, "train.epochs": epochs, "paths.splits": splits_csv}
                )
                seconds, accuracy = _train_and_test(params)
                row[arm] = accuracy
                row[f"{arm}_seconds"] = seconds
            rows.append(row)
        test_images = int((full["split"] == "test").sum())

    arms = list(settings["arms"])
    plot = _plot(rows, arms, Path(opts.out_dir) / f"{NAME}.png")
    results = {"table": rows, "test_images": test_images}
    ratios = {
        f"pretrained_minus_scratch_points_at_{r['fraction']:g}": 100 * (r[arms[0]] - r[arms[1]]) for r in rows
    }
    targets: dict[str, Any] = {}  # issue 6 sets none: the benchmark measures the claim
    resolved = {arm: with_overrides(base, o).to_dict() for arm, o in settings["arms"].items()}
    recipe = {arm: {"model": r["model"], "train": r["train"]} for arm, r in resolved.items()}
    return result(NAME, opts, started, settings, results, ratios, targets, recipe=recipe, plot=plot.name,
                  table_markdown=_markdown(rows, arms))  # fmt: skip


def _subset(full: pd.DataFrame, fraction: float, seed: int, target_csv: Path) -> pd.DataFrame:
    """All val and test rows, and a stratified `fraction` of each class's train rows (at least one)."""
    rng = np.random.default_rng(seed)
    keep = []
    for _, rows in full[full["split"] == "train"].groupby("label", sort=True):
        n = max(1, round(fraction * len(rows)))
        keep.append(rows.iloc[np.sort(rng.permutation(len(rows))[:n])])
    subset = pd.concat([*keep, full[full["split"] != "train"]]).sort_values("path", kind="stable")
    with atomic_path(target_csv) as tmp:
        subset.to_csv(tmp, index=False, lineterminator="\n")
    return subset


def _train_and_test(params: Params) -> tuple[float, float]:
    """Wall seconds of train + evaluate, and the test accuracy."""
    seconds, _ = timed(lambda: (train.run(params), evaluate.run(params)))
    return seconds, read_json(params.paths.metrics("evaluate"))["accuracy"]


def _plot(rows: list[dict[str, Any]], arms: list[str], target_png: Path) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 3.8), dpi=120)
    axes = figure.add_subplot()
    fractions = [100 * r["fraction"] for r in rows]
    for arm, marker in zip(arms, "os", strict=False):
        axes.plot(fractions, [100 * r[arm] for r in rows], marker=marker, label=arm)
    axes.set_xscale("log")
    axes.set_xticks(
        fractions, [f"{f:g}%\n({r['train_images']})" for f, r in zip(fractions, rows, strict=True)]
    )
    axes.set_xlabel("share of the train split (images)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("ImageNet weights vs random init (same budget)", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(target_png) as tmp:
        figure.savefig(tmp)
    return target_png


def _markdown(rows: list[dict[str, Any]], arms: list[str]) -> str:
    lines = [
        "| train share | images | epochs | " + " | ".join(arms) + " |",
        "|---:|---:|---:|" + "---:|" * len(arms),
    ]
    for r in rows:
        accuracies = " | ".join(f"{100 * r[arm]:.1f}%" for arm in arms)
        lines.append(f"| {100 * r['fraction']:g}% | {r['train_images']} | {r['epochs']} | {accuracies} |")
    return "\n".join(lines)
