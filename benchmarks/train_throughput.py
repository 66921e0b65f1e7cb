"""train_throughput: training images/s of the real train stage against (a) the compute limit, the same model,
batch, resolution, precision and trainable parameters fed synthetic tensors already in memory, and (b) a
baseline written the way the classic tutorials do it: torchvision ImageFolder + PIL transforms, every file
decoded every epoch, a plain training loop.

All three train the same number of images for the same epochs, in the same process, one after the other in
each repeat, after an untimed warm-up (the first steps in a process pay for creating its compute kernels).
The stage's figure is its own `images_per_s` (metrics/train.json: the epochs' loops, excluding the one-time
image cache and validation); the other two are timed over the same loops.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

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
    workdir,
)
from pipeline.config import Params
from pipeline.data.loader import read_splits
from pipeline.data.transforms import build_batch_mix
from pipeline.io import read_json
from pipeline.models import build_model, resolve_data_config
from pipeline.models.freezing import block_groups, plan_epochs, set_trainable
from pipeline.stages import train
from pipeline.training import checkpoint, distributed
from pipeline.training.loop import Trainer
from pipeline.training.loss import build_criterion
from pipeline.training.precision import Precision, resolve_precision

NAME = "train_throughput"
_RECIPE = {"train.strategy": "full", "train.epochs": 1, "train.early_stopping_patience": 0}
SETTINGS = {
    "full": {
        "repeats": 3,
        "listing": {"train_per_class": 150, "val_per_class": 20, "test_per_class": 0},
        "classic_workers": 2,  # the tutorials' DataLoader(num_workers=...) ; here: one per core
        "params": _RECIPE,
    },
    "smoke": {
        "repeats": 1,
        "listing": {"train_per_class": 6, "val_per_class": 2, "test_per_class": 0},
        "classic_workers": 0,
        "params": {**_RECIPE, **SMOKE_PARAMS, "train.epochs": 1},
    },
}


def run(opts: Options) -> dict[str, Any]:
    started, settings = machine(), opts.settings(SETTINGS)
    runs: dict[str, list[float]] = {"stage": [], "compute_limit": [], "classic": [], "stage_wall_seconds": []}
    with workdir(opts, NAME) as root:
        params = listed_params(opts, root, settings["listing"], settings["params"])
        prepare_splits(params)
        splits = read_splits(params.paths.splits, params.paths.data_root)
        images, classes = len(splits.train.labels), len(splits.class_names)
        folder = _image_folder(root / "classic", splits.train.paths, splits.train.labels, splits.class_names)
        _compute_limit(params, images, classes)  # warm-up: the first steps of a process create its kernels
        for _ in range(settings["repeats"]):
            figure, seconds = _stage(params)
            runs["stage"].append(figure)
            runs["stage_wall_seconds"].append(seconds)
            runs["compute_limit"].append(_compute_limit(params, images, classes))
            runs["classic"].append(_classic(params, folder, classes, settings["classic_workers"]))

    results = {key: summary(values) for key, values in runs.items()}
    results.update(train_images=images, classes=classes)
    stage, limit, classic = (median(runs[k]) for k in ("stage", "compute_limit", "classic"))
    ratios = {"stage_vs_compute_limit": stage / limit, "stage_vs_classic": stage / classic}
    targets = {"stage_vs_compute_limit": target(ratios["stage_vs_compute_limit"], ">=", 0.90)}
    resolved = params.to_dict()
    settings.update(model=resolved["model"], train=resolved["train"], precision=_precision(params).name)
    return result(NAME, opts, started, settings, results, ratios, targets, units="images/s")


def _precision(params: Params) -> Precision:
    return resolve_precision(params.train.precision, distributed.setup(params.train.device)[1])


def _stage(params: Params) -> tuple[float, float]:
    """The real train stage from scratch (no checkpoint to resume): its images/s and wall seconds."""
    shutil.rmtree(params.paths.checkpoint_dir, ignore_errors=True)
    seconds, _ = timed(lambda: train.run(params))
    return read_json(params.paths.metrics("train"))["images_per_s"], seconds


def _compute_limit(params: Params, images: int, classes: int) -> float:
    """The stage's own Trainer on the stage's epoch plans, fed one in-memory batch over and over."""
    tp = params.train
    env, device = distributed.setup(tp.device)
    precision = resolve_precision(tp.precision, device)
    checkpoint.seed_everything(params.base.seed)
    model = _model(params, classes, device)
    groups = block_groups(model.backbone)
    plans = [plan for plan in plan_epochs(train._freezing(tp), len(groups)) if not plan.on_features]
    size = int(resolve_data_config(params.model)["input_size"][-1])
    x = torch.randn(tp.batch_size, 3, size, size)
    y = torch.randint(0, classes, (tp.batch_size,))
    sizes = [tp.batch_size] * (images // tp.batch_size) + (
        [images % tp.batch_size] if images % tp.batch_size else []
    )
    batches = [(x[:n], y[:n]) for n in sizes]
    steps = -(-len(batches) // tp.grad_accum_steps)
    criterion = build_criterion(None, tp.label_smoothing)
    trainer = Trainer(
        model=model,
        params=tp,
        plans=plans,
        block_groups=groups,
        steps_per_epoch=steps,
        precision=precision,
        env=env,
        criterion=criterion,
        batch_mix=build_batch_mix(tp.augment, classes),
    )
    done = [trainer.train_epoch(plan, iter(batches), len(batches), "compute limit") for plan in plans]
    return sum(d["images"] for d in done) / sum(d["seconds"] for d in done)


def _classic(params: Params, folder: Path, classes: int, workers: int) -> float:
    """The tutorial loop: ImageFolder + PIL transforms (decode, random crop, flip, ToTensor, Normalize) in a
    shuffled DataLoader, model.train(), forward, loss, backward, step; same model, trainable parameters,
    batch, resolution and precision as the stage."""
    from torchvision import datasets, transforms

    tp, cfg = params.train, resolve_data_config(params.model)
    _, device = distributed.setup(tp.device)
    precision = resolve_precision(tp.precision, device)
    checkpoint.seed_everything(params.base.seed)
    model = _model(params, classes, device)
    groups = block_groups(model.backbone)
    plans = [plan for plan in plan_epochs(train._freezing(tp), len(groups)) if not plan.on_features]
    transform = transforms.Compose([
        transforms.RandomResizedCrop(int(cfg["input_size"][-1])),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(cfg["mean"], cfg["std"]),
    ])  # fmt: skip
    loader = DataLoader(datasets.ImageFolder(str(folder), transform), batch_size=tp.batch_size, shuffle=True,
                        num_workers=workers)  # fmt: skip
    criterion = nn.CrossEntropyLoss(label_smoothing=tp.label_smoothing)
    images = seconds = 0.0
    for plan in plans:
        set_trainable(model, groups, plan.groups)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tp.lr)
        model.train()
        elapsed, count = timed(lambda opt=optimizer: _classic_epoch(model, loader, opt, criterion, precision))
        images, seconds = images + count, seconds + elapsed
    return images / seconds


def _classic_epoch(
    model: nn.Module, loader: DataLoader, optimizer, criterion: nn.Module, precision: Precision
) -> int:
    count = 0
    for x, y in loader:
        x, y = x.to(precision.device), y.to(precision.device)
        optimizer.zero_grad()
        with precision.autocast():
            logits = model(x)
        loss = criterion(logits.float(), y)
        loss.backward()
        optimizer.step()
        count += len(y)
    return count


def _model(params: Params, classes: int, device: torch.device) -> nn.Module:
    model = build_model(params.model, num_classes=classes).to(device)
    return model.to(memory_format=torch.channels_last) if params.train.channels_last else model


def _image_folder(root: Path, paths: list[str], labels, class_names: list[str]) -> Path:
    """The train split as ImageFolder wants it (<root>/<class>/<file>), as symlinks to the source files."""
    for path, label in zip(paths, labels, strict=True):
        link = root / class_names[label] / Path(path).name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(Path(path).resolve(), link)
    return root
