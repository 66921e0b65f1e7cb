"""budget_recipe: what a fixed time budget buys with each way of spending it (issue 32's "training per
CPU-minute"), on a Fashion-MNIST subset through the real stages (ingest -> validate -> split once, then train
-> evaluate for each arm and seed).

Every arm is `fashion_mnist`'s full recipe (lite2 at 80 px, fp32, every block trained, EMA) with the same
`train.time_limit_min`, so each trains as many epochs as fit on the machine at hand and compresses its lr
schedule into them; the arms differ only in how the budget is spent:
- `default`: cosine decay at the full 80 px (the recipe as it is);
- `linear to zero`: the lr decays straight to zero over the budget ("budgeted training", Li et al. 2020);
- `linear + resizing 0.5-0.875`: and the last phase's crops grow from half the size to 0.875 of it (FFCV's
  progressive resizing; the model is evaluated at the full size, FixRes's train-test resolution effect), so
  more, cheaper epochs fit in the budget;
- `linear + resizing 0.5-1.0`: the same growth to the full size, which tells the two effects apart.
The subset (500 train and 100 val images per class from the official train split, 500 test per class from
the official test split) and a 5-minute budget give as many full-size epochs as the 30-minute full run gives
on a 2-core Xeon (about 2). Before the arms, a linear probe builds the image cache and the backbone features
that every run's head-only epoch reads, so no arm pays for them in its budget. Gains are paired by seed and
judged against the default's spread (`judge_arms`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import fashion_mnist
from benchmarks._common import (
    ARM_FIGURES,
    SMOKE_PARAMS,
    Options,
    judge_arms,
    listed_params,
    machine,
    prepare_splits,
    result,
    run_arms,
    timed,
    with_overrides,
    workdir,
)
from pipeline.config import Params

NAME = "budget_recipe"
ARMS = {
    "default": {},
    "linear to zero": {"train.schedule": "linear"},
    "linear + resizing 0.5-0.875": {
        "train.schedule": "linear",
        "train.resize_start": 0.5,
        "train.resize_end": 0.875,
    },
    "linear + resizing 0.5-1.0": {
        "train.schedule": "linear",
        "train.resize_start": 0.5,
        "train.resize_end": 1.0,
    },
}
SEEDS = (42, 7, 123)
SETTINGS = {
    "full": {
        "listing": {"val_per_class": 100, "train_per_class": 500, "test_per_class": 500},
        "params": {
            **fashion_mnist.SETTINGS["full"]["params"],
            "train.time_limit_min": 5,
            "evaluate.tta": False,  # the same for every arm; it would double the evaluation's time
        },
        "repeats": 2,
    },
    "smoke": {
        "listing": {"val_per_class": 2, "train_per_class": 6, "test_per_class": 4},
        "params": {
            **SMOKE_PARAMS,
            "model.image_size": 64,  # half of it still leaves the tiny backbone a 1 px map
            "train.precision": "fp32",
            "train.epochs": 4,
            "train.progressive_head_epochs": 1,
            "train.time_limit_min": 10,  # never reached: the planner runs, every epoch fits
        },
        "repeats": 2,
    },
}


def run(opts: Options, arms: list[str] | None = None) -> dict[str, Any]:
    """`arms`: the arms to run (`--arms`; `default` always runs, as every other arm is compared with it)."""
    started, settings = machine(), opts.settings(SETTINGS)
    chosen = {arm: ARMS[arm] for arm in ARMS if arm == "default" or arms is None or arm in arms}
    seeds = [SEEDS[k % len(SEEDS)] for k in range(settings["repeats"])]
    with workdir(opts, NAME) as root:
        base = listed_params(opts, root, settings["listing"], settings["params"])
        seconds, split = timed(lambda: _prepare(root, base))
        runs = run_arms(root, base, chosen, seeds)
    judged = judge_arms(runs) | {
        "split": {key: split[key] for key in ("train", "val", "test")},
        "prepare_seconds": seconds,
        "time_limit_min": settings["params"]["train.time_limit_min"],
    }
    ratios = {
        f"{arm} minus default, {figure}": judged["gains"][arm][figure]["median"]
        for arm in chosen
        if arm != "default"
        for figure in ARM_FIGURES
    }
    recipe = {"overrides": settings["params"], "seeds": seeds, "arms": chosen}
    return result(NAME, opts, started, settings, judged, ratios, {}, recipe=recipe)


def _prepare(root: Path, base: Params) -> dict[str, Any]:
    """ingest -> validate -> split, then a one-epoch linear probe that fills the image and feature caches the
    arms share; the split summary."""
    from pipeline.stages import train

    split = prepare_splits(base)
    warm = {"train.strategy": "linear_probe", "train.epochs": 1}
    train.run(with_overrides(base, {**warm, "paths.checkpoint_dir": str(root / "warm-up")}))
    return split
