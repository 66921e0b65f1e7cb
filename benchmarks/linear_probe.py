"""linear_probe: 10 epochs of linear probing on cached backbone features (`train.strategy: linear_probe`:
the backbone runs once over the images, then the head trains on (N, C) tensors) against the same 10 epochs
with the frozen backbone run on every image every epoch (`strategy: partial` with `trainable_blocks: 0`, the
classic "feature extraction" loop), both through the real train stage, with their validation accuracy.

Each run is the whole train stage starting from an empty cache folder (so both pay for decoding the images
into the uint8 cache once, and the cached run for computing the features: what a first run pays); `warm`
re-runs the cached variant on the features and images the cold run saved, as an experiment that changes only
head or optimizer params does.
"""

from __future__ import annotations

import shutil
from typing import Any

from benchmarks._common import (
    SMOKE_PARAMS,
    Options,
    listed_params,
    machine,
    median,
    prepare_splits,
    result,
    summary,
    target,
    timed,
    with_overrides,
    workdir,
)
from pipeline.config import Params
from pipeline.io import read_json
from pipeline.stages import train

NAME = "linear_probe"
_COMMON = {"train.epochs": 10, "train.early_stopping_patience": 0}
VARIANTS = {
    "cached_features": {"train.strategy": "linear_probe"},
    "backbone_every_epoch": {"train.strategy": "partial", "train.trainable_blocks": 0},
}
# (result key, variant), in the order they run in each repeat
_RUNS = (
    ("cached_features", "cached_features"),
    ("cached_features_warm", "cached_features"),
    ("backbone_every_epoch", "backbone_every_epoch"),
)
SETTINGS = {
    "full": {
        "repeats": 3,  # a median of 3: one cold run in 4 meets a full collection of Python's GC (0.36 s)
        "listing": {"train_per_class": 100, "val_per_class": 100, "test_per_class": 0},
        "params": _COMMON,
    },
    "smoke": {
        "repeats": 1,
        "listing": {"train_per_class": 6, "val_per_class": 2, "test_per_class": 0},
        "params": {**_COMMON, **SMOKE_PARAMS, "train.epochs": 2},
    },
}


def run(opts: Options) -> dict[str, Any]:
    started, settings = machine(), opts.settings(SETTINGS)
    seconds: dict[str, list[float]] = {
        "cached_features": [],
        "cached_features_warm": [],
        "backbone_every_epoch": [],
    }
    accuracy: dict[str, list[float]] = {key: [] for key in seconds}
    with workdir(opts, NAME) as root:
        base = listed_params(opts, root, settings["listing"], settings["params"])
        prepare_splits(base)
        _train(with_overrides(base, {**VARIANTS["cached_features"], "train.epochs": 1,
                                     "paths.cache_dir": str(root / "warm-up")}))  # fmt: skip
        for repeat in range(settings["repeats"]):
            for key, variant in _RUNS:  # the warm run reuses the cache folder the cold run filled
                cache_dir = str(root / f"cache-{repeat}-{variant}")
                elapsed, acc = _train(
                    with_overrides(base, {**VARIANTS[variant], "paths.cache_dir": cache_dir})
                )
                seconds[key].append(elapsed)
                accuracy[key].append(acc)
        images = {split: count for split, count in read_json(base.paths.metrics("split"))["images"].items()}

    results = {key: {"seconds": summary(seconds[key]), "val_acc": median(accuracy[key])} for key in seconds}
    results["images"] = images
    every, cold, warm = (
        median(seconds[k]) for k in ("backbone_every_epoch", "cached_features", "cached_features_warm")
    )
    gap = 100 * abs(results["cached_features"]["val_acc"] - results["backbone_every_epoch"]["val_acc"])
    ratios = {
        "wall_time_every_epoch_vs_cached": every / cold,
        "wall_time_every_epoch_vs_cached_warm": every / warm,
    }
    targets = {
        "less_wall_time": target(ratios["wall_time_every_epoch_vs_cached"], ">=", 10.0),
        "accuracy_gap_points": target(gap, "<=", 0.5),
    }
    resolved = base.to_dict()
    settings.update(variants=VARIANTS, model=resolved["model"], train=resolved["train"])
    return result(NAME, opts, started, settings, results, ratios, targets)


def _train(params: Params) -> tuple[float, float]:
    """Wall seconds of one train stage run from scratch, and its best validation accuracy."""
    shutil.rmtree(params.paths.checkpoint_dir, ignore_errors=True)
    seconds, _ = timed(lambda: train.run(params))
    return seconds, read_json(params.paths.metrics("train"))["best_val_acc"]
