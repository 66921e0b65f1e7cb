"""fashion_mnist: the default fine-tuning recipe on the official Fashion-MNIST split, through the real stages
(ingest -> validate -> split -> train -> evaluate): test accuracy on the official 10,000 test images, wall
time and training images/s, next to the published anchors.

The official train split gives `val_per_class` images per class to validation (model selection, temperature);
the rest trains. The recipe is params.yaml plus `params` overrides (and --set), recorded under `recipe`.
"""

from __future__ import annotations

from typing import Any

from benchmarks._common import (
    SMOKE_PARAMS,
    Options,
    listed_params,
    machine,
    result,
    target,
    timed,
    workdir,
)
from pipeline.io import read_json
from pipeline.pages.report import read_training_curves
from pipeline.stages import evaluate, ingest, split, train, validate

NAME = "fashion_mnist"
STAGES = {"ingest": ingest, "validate": validate, "split": split, "train": train, "evaluate": evaluate}
# Published test accuracies (Fashion-MNIST benchmark table and paper, Xiao et al. 2017).
ANCHORS = {"svc_rbf": 0.897, "two_conv_cnn": 0.92, "resnet18": 0.949}
SETTINGS = {
    "full": {
        "listing": {"val_per_class": 500},  # train: the other 5,500 of each class; test: all 1,000
        # The 60-minute budget on 2 cores: 28 px images need no 160 px input; at small inputs, fp32 with
        # channels_last trains fastest on CPU (bf16 autocast is slower there at this size); every block
        # trains, at a higher lr, since product photos in grey are far from ImageNet. An EMA of the weights
        # (timm's, with its warm-up) smooths the last epochs, where val accuracy still rose at 10 epochs.
        # lite2 rather than lite0: at 64 px its extra width costs only about 1.2x the time on this CPU
        # (small tensors), and it gained 1.1 points on a 10,000-image subset (benchmarks/README.md).
        # crop_pct 1.0: Fashion-MNIST's products fill their 28 px frame, and the backbone's eval crop (0.89)
        # cut their borders off; keeping the whole image gained 1.4 points on that subset (lite0), none on
        # the full data at 64 px. 80 px rather than 64: +0.24 points on the full data (94.84% vs 94.60%)
        # for about 1.6x the time: 61.3 min at 144-180 img/s in session 11, just over the hour.
        # The hour holds on any VM through train.time_limit_min: up to 14 epochs, as many as fit in 58 min
        # of epochs. The rest took 72 s in session 12 (ingest 11 s, validate and split 3 s, image caches and
        # set-up 15 s, TTA evaluation 43 s); with 57 min, 11 epochs ran and 6.6 of the 60 min went unused.
        "params": {
            "model.backbone": "tf_efficientnet_lite2",
            "model.image_size": 80,
            "model.crop_pct": 1.0,
            "train.precision": "fp32",
            "train.channels_last": True,
            "train.epochs": 14,
            "train.time_limit_min": 58,
            "train.progressive_head_epochs": 1,
            "train.trainable_blocks": None,
            "train.lr": 3e-4,
            "train.ema_decay": 0.9995,
            "train.augment.scale_min": 0.8,
            "evaluate.tta": True,
        },
        "max_minutes": 60,
    },
    "smoke": {
        "listing": {"val_per_class": 2, "train_per_class": 6, "test_per_class": 4},
        "params": {**SMOKE_PARAMS, "train.epochs": 1},
        "max_minutes": 60,
    },
}


def run(opts: Options) -> dict[str, Any]:
    started, settings = machine(), opts.settings(SETTINGS)
    with workdir(opts, NAME) as root:
        params = listed_params(opts, root, settings["listing"], settings["params"])
        seconds, summaries = {}, {}
        for name, stage in STAGES.items():
            seconds[name], summaries[name] = timed(lambda stage=stage: stage.run(params))
        train_metrics = read_json(params.paths.metrics("train"))
        test = read_json(params.paths.metrics("evaluate"))
        val_curve = read_training_curves(params.paths.curves_dir)["val/acc"]["value"]

    wall_minutes = sum(seconds.values()) / 60
    results = {
        "test_accuracy": test["accuracy"],
        "test_images": summaries["split"]["test"],
        "train_images": summaries["split"]["train"],
        "val_images": summaries["split"]["val"],
        "best_val_acc": train_metrics["best_val_acc"],
        "epochs_run": train_metrics["epochs_run"],
        "val_acc_by_epoch": [round(float(acc), 4) for acc in val_curve],
        "epochs_seconds": train_metrics["train_seconds"],  # what train.time_limit_min caps
        "train_images_per_s": train_metrics["images_per_s"],
        "stage_seconds": seconds,
        "wall_minutes": wall_minutes,
    }
    ratios = {f"vs_{name}_points": 100 * (test["accuracy"] - value) for name, value in ANCHORS.items()}
    targets = {
        "test_accuracy": target(test["accuracy"], ">=", 0.95),
        "wall_minutes": target(wall_minutes, "<=", settings["max_minutes"]),
    }
    resolved = params.to_dict()
    recipe = {"overrides": settings["params"], "model": resolved["model"], "train": resolved["train"]}
    return result(NAME, opts, started, settings, results, ratios, targets, recipe=recipe, anchors=ANCHORS)
