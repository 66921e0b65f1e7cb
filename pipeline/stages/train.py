"""Stage: train. Fine-tunes the pretrained backbone on the train split, selects the best epoch on val.

This module only wires the pieces: data (pipeline.data: uint8 cache, transforms, loaders), what trains when
(pipeline.models.freezing) and the machinery (pipeline.training: precision, DDP, optimizer, checkpoint, loop).
Runs as is under `torchrun` (DDP), and starts it itself when `train.nproc_per_node` > 1; only rank 0 writes.
Resumes from the last complete epoch.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from dvclive import Live

from pipeline.config import FeaturesParams, ModelParams, Params, TrainParams
from pipeline.data.cache import build_cache, cache_path
from pipeline.data.epochs import EpochData
from pipeline.data.labels import LabelSets
from pipeline.data.loader import (
    CachedImages,
    EpochSampler,
    Loading,
    Splits,
    build_loader,
    read_splits,
    resolve_eval_batch_size,
)
from pipeline.data.transforms import Resized, build_batch_mix, build_transforms
from pipeline.io import write_json
from pipeline.models import ImageClassifier, build_model, resolve_data_config, save_trained
from pipeline.models.freezing import EpochPlan, Freezing, block_groups, plan_epochs
from pipeline.stages import Stage
from pipeline.training import checkpoint, distributed
from pipeline.training.distributed import Dist
from pipeline.training.features import backbone_features, feature_pass
from pipeline.training.loop import FitState, Trainer, fit
from pipeline.training.loss import (
    MultiLabelLoss,
    build_criterion,
    class_weights,
    positive_weights,
    with_teacher,
)
from pipeline.training.memory import keep_freed_memory
from pipeline.training.precision import (
    Precision,
    configure_backends,
    flush_denormals,
    resolve_device,
    resolve_precision,
    visible_gpus,
)

STAGE = Stage(
    summary="Fine-tune the pretrained backbone (resumes from the last complete epoch).",
    params=("base", "model", "train", "features"),
    deps=("splits",),
    outs=("model",),
    plots={"curves_dir": "step"},
    note=(
        "paths.checkpoint_dir (resume state) is no output on purpose: DVC never deletes it, so an "
        "interrupted run resumes, and an undeclared folder keeps the stage in DVC's run cache (a `persist` "
        "output would not), so `dvc pull --run-cache` restores train on another machine instead of "
        "retraining."
    ),
)

log = logging.getLogger(__name__)

# dvclive metric name -> key of an epoch record (pipeline.training.loop.fit); evaluate reads these curves.
LIVE_METRICS = {
    "train/loss": "train_loss",
    "train/acc": "train_acc",
    "val/loss": "val_loss",
    "val/acc": "val_acc",
    "val/f1": "val_f1",
    "val/map": "val_map",  # label sets only (base.task: multilabel)
    "lr": "lr",
    "lr_head": "lr_head",
    "images_per_s": "images_per_s",
    "head_only": "on_features",  # 1 for a head-only epoch on cached features: the report shades them
}


def run(params: Params) -> dict[str, Any]:
    tp = params.train
    nproc = distributed.resolve_nproc(tp.nproc_per_node, visible_gpus(), tp.device)
    several = nproc > 1 or distributed.several_nodes(os.environ)  # torchrun's rendezvous joins the machines
    if several and not distributed.under_launcher(os.environ):
        return _launch(params, nproc)
    keep_freed_memory()
    flush_denormals()
    env, device = distributed.setup(tp.device, tp.dist_timeout_min)
    configure_backends(device, tf32=True)
    try:
        return _train(params, env, device)
    finally:
        distributed.teardown(env)


def _launch(params: Params, nproc: int) -> dict[str, Any]:
    """This stage again, as `nproc` processes under torch.distributed.run, on exactly these params."""
    resolve_device(params.train.device, local_rank=nproc - 1, world_size=nproc)  # refused here, not N times
    with _params_file(params) as params_file:
        log.info("train: starting %d processes under torch.distributed.run", nproc)
        distributed.launch(nproc, params_file)
    return {"launcher": "torch.distributed.run", "nproc_per_node": nproc}


@contextmanager
def _params_file(params: Params) -> Iterator[Path]:
    """The params as a file in the working folder, which relative paths are relative to (and which a params
    file's outputs must stay inside), for the launched processes; removed afterwards."""
    handle, name = tempfile.mkstemp(prefix=".train-params-", suffix=".yaml", dir=Path.cwd())
    try:
        with os.fdopen(handle, "w") as out:
            yaml.safe_dump(params.to_dict(), out, sort_keys=False)
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def _train(params: Params, env: Dist, device: torch.device) -> dict[str, Any]:
    tp, paths = params.train, params.paths
    started = time.perf_counter()
    ready = prepare(params, env, device)
    class_names, trainer = ready.splits.class_names, ready.trainer
    fingerprint = checkpoint.fingerprint(params.base, params.model, tp, paths.splits, env.world_size)
    checkpoint_file = paths.checkpoint_dir / checkpoint.CHECKPOINT_NAME
    state = _resume(checkpoint.load_for_every_rank(checkpoint_file, fingerprint, env), trainer)
    resumed_from = state.epoch
    log.info(
        f"train: {tp.strategy}, {params.model.backbone} on {device}, {ready.precision.name}: "
        f"{len(ready.splits.train.labels)} train / {len(ready.splits.val.labels)} val images, "
        f"{len(class_names)} classes, {len(ready.plans)} epochs"
    )
    live = _live(paths.live_dir, state.history) if env.is_local_main else None  # one writer per machine
    after_epoch = _AfterEpoch(
        tp=tp, checkpoint_file=checkpoint_file, trainer=trainer, fingerprint=fingerprint, live=live
    )
    state.setup_seconds += time.perf_counter() - started  # time_limit_min counts it
    state = fit(trainer, ready.plans, ready.data, state, len(class_names), after_epoch)
    if env.is_local_main:
        ready.model.load_state_dict(state.best_state)
        save_trained(paths.model, ready.model, class_names, ready.data_config, params.to_dict())
        write_json(paths.metrics("train"), _metrics(state))
        live.end()
        best = f"{trainer.monitor} {state.best_value:.4f} at epoch {state.best_epoch}"
        log.info(f"train: best {best} -> {paths.model}")
    distributed.barrier(env)
    return {
        "best_epoch": state.best_epoch,
        "best_val_acc": state.history[state.best_epoch - 1]["val_acc"],
        "epochs_run": len(state.history),
        "resumed_from_epoch": resumed_from,
        "precision": ready.precision.name,
        "device": str(device),
        "world_size": env.world_size,
    }


@dataclass
class Prepared:
    """What a training run starts from (the lr finder too)."""

    splits: Splits
    data_config: dict
    precision: Precision
    model: ImageClassifier
    plans: list[EpochPlan]  # what trains when, one per epoch
    data: EpochData  # each epoch's batches
    trainer: Trainer  # loss, optimizer, schedule


def prepare(params: Params, env: Dist, device: torch.device) -> Prepared:
    """Seeded, the splits read, the model built on `device` and everything that trains it."""
    tp, paths, seed = params.train, params.paths, params.base.seed
    checkpoint.seed_everything(seed)
    sets = LabelSets.of(params.base.task, params.base.label_separator)
    splits = read_splits(paths.splits, paths.data_root, sets)
    num_classes = len(splits.class_names)
    data_config = resolve_data_config(params.model)
    precision = resolve_precision(tp.precision, device)
    model = _model(params.model, tp, num_classes, device)
    groups = block_groups(model.backbone)
    plans = plan_epochs(_freezing(tp), len(groups))
    data = _epoch_data(tp, params.features, seed, paths.cache_dir, splits, data_config, model, precision, env)
    steps_per_epoch = math.ceil(len(data.train_loader) / tp.grad_accum_steps)
    if sets.multilabel:
        positive = positive_weights(splits.train.labels, tp.class_weighting)
        criterion: torch.nn.Module = MultiLabelLoss(tp.multilabel_loss, positive, tp.label_smoothing)
    else:
        weights = class_weights(splits.train.labels, num_classes, tp.class_weighting)
        criterion = build_criterion(weights, tp.label_smoothing)
    champion_model = paths.champion_dir / paths.model.name  # where promotion copies the model
    criterion, teacher = with_teacher(criterion, tp.distill, champion_model, splits.class_names, data_config)
    mix = build_batch_mix(tp.augment, num_classes)
    trainer = Trainer(
        model=model,
        params=tp,
        plans=plans,
        block_groups=groups,
        steps_per_epoch=steps_per_epoch,
        precision=precision,
        env=env,
        criterion=criterion,
        batch_mix=mix,
        teacher=teacher,
        multilabel=sets.multilabel,
    )
    return Prepared(splits, data_config, precision, model, plans, data, trainer)


class _AfterEpoch:
    """Each machine's main process's work after each epoch (`live` is None on the other processes, which do
    nothing): a checkpoint every `train.checkpoint_every_s` and after the last epoch, the dvclive step and the
    epoch's log line."""

    def __init__(
        self, *, tp: TrainParams, checkpoint_file: Path, trainer: Trainer, fingerprint: str, live: Live | None
    ):
        self.train_params, self.trainer, self.fingerprint = tp, trainer, fingerprint
        self.live, self.checkpoint_file = live, checkpoint_file
        self.last_saved = time.monotonic()

    def __call__(self, state: FitState, record: dict[str, float]) -> None:
        if self.live is None:
            return
        tp = self.train_params
        # Time-based, as Lightning's train_time_interval: a 0.1 s head-only epoch is not worth a 60 ms write.
        finished = state.stopped_early or state.epoch == state.planned
        if finished or time.monotonic() - self.last_saved >= tp.checkpoint_every_s:
            trainer_state, rng = self.trainer.state_dict(), checkpoint.rng_state()
            payload = {
                "fingerprint": self.fingerprint,
                "trainer": trainer_state,
                "fit": state.to_dict(),
                "rng": rng,
            }
            checkpoint.save(self.checkpoint_file, payload)
            self.last_saved = time.monotonic()
        _log_epoch(self.live, record)
        _report_epoch(record, state.planned, tp.overfit_gap_warning)


def _freezing(tp: TrainParams) -> Freezing:
    """The `train` keys that decide what trains when."""
    return Freezing(
        strategy=tp.strategy,
        epochs=tp.epochs,
        trainable_blocks=tp.trainable_blocks,
        progressive_head_epochs=tp.progressive_head_epochs,
        progressive_unfreeze_every=tp.progressive_unfreeze_every,
    )


def _model(
    model_params: ModelParams, tp: TrainParams, num_classes: int, device: torch.device
) -> ImageClassifier:
    model = build_model(model_params, num_classes=num_classes).to(device)
    if tp.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if tp.compile:
        model.backbone.compile()  # in place: state_dict keys stay those of the plain model
    return model


def _epoch_data(
    tp: TrainParams,
    features_params: FeaturesParams,
    seed: int,
    cache_dir: Path,
    splits: Splits,
    data_config: dict,
    model: ImageClassifier,
    precision: Precision,
    env: Dist,
) -> EpochData:
    """Loaders over the uint8 caches in `cache_dir` (augmented train, center-cropped val) and lazily computed
    features."""
    train_file, val_file = _image_caches(splits, data_config, cache_dir, env)
    loading = Loading(tp.num_workers, tp.pin_memory, tp.persistent_workers)
    train_transform = build_transforms(data_config, tp.augment, train=True)
    eval_transform = build_transforms(data_config, tp.augment, train=False)
    shard = {"rank": env.rank, "world_size": env.world_size}
    resized = Resized(data_config, tp.augment)  # progressive resizing's smaller crops
    train_images = CachedImages(train_file, splits.train.labels, train_transform, seed, resized=resized)
    train_sampler = EpochSampler(splits.train.labels, seed, **shard, balanced=tp.balanced_sampler)
    train_loader = build_loader(train_images, train_sampler, tp.batch_size, loading, precision.device)
    val_images = CachedImages(val_file, splits.val.labels, eval_transform, seed, random=False)
    val_sampler = EpochSampler(splits.val.labels, seed, **shard, shuffle=False)
    eval_batch_size = resolve_eval_batch_size(tp.eval_batch_size, tp.batch_size, precision.device)
    val_loader = build_loader(val_images, val_sampler, eval_batch_size, loading, precision.device)

    def features() -> tuple[np.ndarray, np.ndarray]:
        unaugmented_train = CachedImages(train_file, splits.train.labels, eval_transform, seed, random=False)
        settings = (*feature_pass(features_params, env), cache_dir, env)
        return tuple(backbone_features(model.backbone, (unaugmented_train, val_images), *settings))

    labels = (torch.from_numpy(splits.train.labels.copy()), torch.from_numpy(splits.val.labels.copy()))
    return EpochData(train_loader, val_loader, features, labels, int(data_config["input_size"][-1]))


def _image_caches(splits: Splits, data_config: dict, cache_dir: Path, env: Dist) -> list[Path]:
    """The train and val sets of the uint8 cache, built by one process per machine while the others wait;
    content-addressed, so images the audit (or an earlier run) decoded are not decoded again."""
    for rows in (splits.train, splits.val):
        if env.is_local_main:
            build_cache(rows.paths, rows.identities, data_config, cache_dir, workers=os.cpu_count() or 1)
        distributed.barrier(env)
    return [cache_path(cache_dir, rows.identities, data_config) for rows in (splits.train, splits.val)]


def _resume(saved: dict[str, Any] | None, trainer: Trainer) -> FitState:
    if saved is None:
        return FitState()
    trainer.load_state_dict(saved["trainer"])
    checkpoint.set_rng_state(saved["rng"])
    state = FitState(**saved["fit"])
    log.info("train: resuming after epoch %d from the checkpoint", state.epoch)
    return state


def _live(live_dir: Path, history: list[dict[str, float]]) -> Live:
    """A fresh dvclive log; a resumed run's epochs are replayed so its curves match an uninterrupted run."""
    live = Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
    for record in history:
        _log_epoch(live, record)
    return live


def _log_epoch(live: Live, record: dict[str, float]) -> None:
    for name, key in LIVE_METRICS.items():
        if key in record:
            live.log_metric(name, float(record[key]))
    live.next_step()


def _report_epoch(record: dict[str, float], epochs: int, gap_warning: float) -> None:
    r = record
    # The lr that trains this epoch: the head's in head-only epochs, else the backbone's (and the head's).
    head = f"(head {r['lr_head']:.2e})" if r["trainable_groups"] else "(head only)"
    log.info(
        f"epoch {r['epoch']}/{epochs}  train loss {r['train_loss']:.4f} acc {r['train_acc']:.4f} | "
        f"val loss {r['val_loss']:.4f} acc {r['val_acc']:.4f} f1 {r['val_f1']:.4f}"
        f"{' mAP {:.4f}'.format(r['val_map']) if 'val_map' in r else ''} | "
        f"lr {r['lr_trained']:.2e} {head} | {r['size']} px, {r['images_per_s']:.0f} img/s | "
        f"{r['seconds']:.1f} s"
    )
    gap = r["train_acc"] - r["val_acc"]
    if gap > gap_warning:
        log.warning(
            f"epoch {r['epoch']}: train accuracy exceeds val accuracy by {gap:.3f} "
            f"(train.overfit_gap_warning {gap_warning}): overfitting; consider more augmentation, "
            "a smaller lr or fewer epochs"
        )


def _metrics(state: FitState) -> dict:
    """metrics/train.json: the best epoch's val figures, the last epoch's train loss, time and throughput.
    The last epoch's other figures are the last points of the dvclive curves (and dvclive's metrics.json);
    image and class counts are the split stage's."""
    best, last = state.history[state.best_epoch - 1], state.history[-1]
    # Throughput of the epochs that ran the backbone; head-only epochs on cached features would inflate it.
    image_epochs = [r for r in state.history if not r["on_features"]] or state.history
    images, seconds = sum(r["images"] for r in image_epochs), sum(r["loop_seconds"] for r in image_epochs)
    return {
        "best_epoch": state.best_epoch,
        "best_val_acc": best["val_acc"],
        "best_val_loss": best["val_loss"],
        "best_val_f1": best["val_f1"],
        **({"best_val_map": best["val_map"]} if "val_map" in best else {}),
        "epochs_run": len(state.history),
        "final_train_loss": last["train_loss"],
        "train_seconds": state.seconds,
        "images_per_s": images / max(seconds, 1e-9),
    }
