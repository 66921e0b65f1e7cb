"""The epoch loop: optimizer steps with accumulation, clipping, loss scaling and EMA; evaluation reduced
across ranks; best-model tracking and early stopping; a callback after every epoch (checkpoint, logs)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import TrainParams
from pipeline.data.epochs import Batches, EpochData
from pipeline.errors import PipelineError
from pipeline.models import ImageClassifier
from pipeline.models.freezing import EpochPlan, set_trainable, train_mode
from pipeline.progress import progress
from pipeline.training import label_sets
from pipeline.training.distributed import Dist, all_sum, from_main, wrap
from pipeline.training.optim import build_optimizer, build_scheduler, compressed, current_lrs, scaled
from pipeline.training.precision import Precision

log = logging.getLogger(__name__)

LOWER_IS_BETTER = {"val_loss"}  # early-stopping metrics to minimise; val_acc and val_f1 are maximised


class Trainer:
    """Optimizer, lr schedule, loss scaling and EMA around one model; trains and evaluates epoch by epoch."""

    def __init__(
        self,
        *,
        model: ImageClassifier,
        params: TrainParams,
        plans: list[EpochPlan],
        block_groups: list[list[str]],
        steps_per_epoch: int,
        precision: Precision,
        env: Dist,
        criterion: nn.Module,
        batch_mix: Callable | None,
        teacher: nn.Module | None = None,
        multilabel: bool = False,
    ):
        self.model, self.params, self.groups = model, params, block_groups
        self.multilabel = multilabel  # label sets: (B, K) targets, per-label figures (training.label_sets)
        self.precision, self.env = precision, env
        self.criterion, self.batch_mix = criterion.to(precision.device), batch_mix
        # Distillation: the teacher sees each batch as the student does (augmented, mixed); head-only epochs
        # on cached features train on the labels alone (the teacher needs images).
        self.teacher = teacher.to(precision.device) if teacher is not None else None
        self.optimizer = build_optimizer(model, params)
        epoch_phases = [plan.phase for plan in plans]
        self.scheduler = build_scheduler(self.optimizer, epoch_phases, steps_per_epoch, params)
        self.steps_per_epoch = steps_per_epoch
        self.replans: list[tuple] = []  # edits of the schedule (replan, restore), replayed on resume
        self.scaler = precision.grad_scaler()
        self.ema = ModelEmaV3(model, decay=params.ema_decay, use_warmup=True) if params.ema_decay else None
        self._wrapped: tuple[Any, nn.Module] | None = None

    @property
    def monitor(self) -> str:
        """The early-stopping metric: `train.early_stopping_metric`, whose auto is val_map for label sets."""
        chosen = self.params.early_stopping_metric
        return chosen if chosen != "auto" else ("val_map" if self.multilabel else "val_acc")

    @property
    def eval_model(self) -> ImageClassifier:
        """The weights that are evaluated and saved: the EMA when enabled."""
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else {},
            "replans": list(self.replans),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        for edit in state["replans"]:
            self._edit(*edit)

    def replan(self, epochs_left: int, new_epochs_left: int, steps_done: int = 0) -> None:
        """End the run after `new_epochs_left` more epochs rather than `epochs_left`: the rest of the lr
        schedule is compressed into them (optim.compressed), so it still decays to its end. A plan made
        during an epoch counts the epochs from its start, of which `steps_done` optimizer steps have run."""
        start, steps = self.scheduler.last_epoch, self.steps_per_epoch  # LambdaLR counts optimizer steps
        base = start - steps_done
        self._edit("compress", start, base + epochs_left * steps, base + new_epochs_left * steps)

    def restore(self, weights: dict[str, torch.Tensor], lr_factor: float) -> None:
        """Go back to `weights` (the evaluated weights of an earlier epoch, the EMA's when enabled) and train
        on at `lr_factor` times the lr schedule (`train.on_overfit: restore`)."""
        self.model.load_state_dict(weights)
        if self.ema is not None:
            self.ema.module.load_state_dict(weights)
        self._edit("scale", self.scheduler.last_epoch, lr_factor)

    def _edit(self, kind: str, *args: float) -> None:
        """Wrap the schedule's lambdas in one edit; recorded in order, since the lambdas are not saved."""
        edit = {"compress": compressed, "scale": scaled}[kind]
        self.scheduler.lr_lambdas = [edit(factor, *args) for factor in self.scheduler.lr_lambdas]
        self.replans.append((kind, *args))
        if kind == "scale":  # LambdaLR sets the lr at its next step: the rest of this one's too
            lambdas, step = self.scheduler.lr_lambdas, self.scheduler.last_epoch
            for group, base, factor in zip(
                self.optimizer.param_groups, self.scheduler.base_lrs, lambdas, strict=True
            ):
                group["lr"] = base * factor(step)

    def lrs(self) -> dict[str, float]:
        """The lrs the optimizer holds now (pipeline.training.optim.current_lrs): what the logs show."""
        return current_lrs(self.optimizer, self.params.head_lr_mult)

    def train_epoch(
        self,
        plan: EpochPlan,
        batches: Batches,
        num_batches: int,
        desc: str,
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> dict[str, float]:
        """One pass over `batches`; an optimizer step every `grad_accum_steps` batches (and at the end).
        `on_batch(batches done, num_batches, seconds so far)` after each batch."""
        module, accum = self.start_epoch(plan), self.params.grad_accum_steps
        totals = torch.zeros(3, dtype=torch.float64, device=self.precision.device)  # loss sum, correct, count
        bar = progress(f"{desc} train", num_batches, "batch", enabled=self.env.is_main)
        start = time.perf_counter()
        for index, (x, y) in enumerate(batches):
            x, y = self._to_device(x, y)
            last_in_group = (index + 1) % accum == 0 or index + 1 == num_batches
            # The last group may be short: scale by its own size so every step averages its batches.
            group_size = accum if index // accum < num_batches // accum else num_batches % accum
            no_sync = isinstance(module, DistributedDataParallel) and not last_in_group
            with module.no_sync() if no_sync else contextlib.nullcontext():
                loss, logits = self._forward_backward(module, x, y, group_size)
            if last_in_group:
                self._optimizer_step()
            correct = label_sets.correct(logits, y) if self.multilabel else (logits.argmax(1) == y).sum()
            totals += torch.stack([loss.double() * len(y), correct.double(), totals.new_tensor(len(y))])
            bar.update(1)
            if on_batch is not None:
                on_batch(index + 1, num_batches, time.perf_counter() - start)
        seconds = time.perf_counter() - start
        bar.close()
        self._require_finite(desc)
        loss_sum, correct, images = all_sum(self.env, totals).cpu().tolist()
        return {"loss": loss_sum / images, "acc": correct / images, "images": images, "seconds": seconds}

    def _require_finite(self, desc: str) -> None:
        """Raise a PipelineError when the weights hold NaN or infinity after an epoch: training diverged
        (most often an lr far too high), and every later epoch, the model and its metrics would be garbage.
        fp16's loss scaler skips the steps whose gradients overflow, so its weights stay finite; every rank
        holds the same weights and stops alike."""
        if all(torch.isfinite(value).all() for value in self.model.parameters()):
            return
        raise PipelineError(
            f"the weights became NaN or infinite in {desc} (train.lr {self.params.lr:g}, "
            f"{self.precision.name}): training diverged; lower train.lr (python -m pipeline lr-find suggests "
            "one) or keep train.grad_clip_norm above 0"
        )

    def start_epoch(self, plan: EpochPlan) -> nn.Module:
        """Freeze and unfreeze for `plan`, set train mode; the module that trains (head or whole model)."""
        set_trainable(self.model, self.groups, plan.groups)
        train_mode(self.model, self.params.freeze_bn)
        return self._module(plan)

    def step(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step on one batch (no accumulation): its training loss (the lr finder's unit)."""
        x, y = self._to_device(x, y)
        loss, _ = self._forward_backward(module, x, y, 1)
        self._optimizer_step()
        return loss.item()

    @torch.no_grad()
    def evaluate(
        self, batches: Batches, num_batches: int, on_features: bool, num_classes: int, desc: str = "val"
    ) -> dict[str, float]:
        """Plain cross-entropy (no smoothing or class weights), accuracy and macro F1 over all ranks; for
        label sets, `label_sets.Figures` (binary cross-entropy, per-label accuracy, macro F1 and mAP)."""
        if self.multilabel:
            return self._evaluate_label_sets(batches, num_batches, on_features, num_classes, desc)
        model = self.eval_model
        was_training = model.training
        model.eval()
        module = model.head if on_features else model
        loss_sum = torch.zeros(1, dtype=torch.float64, device=self.precision.device)
        confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=self.precision.device)
        with progress(desc, num_batches, "batch", enabled=self.env.is_main) as bar:
            for x, y in batches:
                x, y = self._to_device(x, y)
                with self.precision.autocast():
                    logits = module(x).float()
                loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum")
                confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes**2)
                bar.update(1)
        model.train(was_training)
        loss_sum, confusion = all_sum(self.env, loss_sum).cpu(), all_sum(self.env, confusion).cpu()
        confusion = confusion.view(num_classes, num_classes)
        true_pos, images = confusion.diag().double(), confusion.sum().item()
        f1 = 2 * true_pos / (confusion.sum(0) + confusion.sum(1)).double().clamp(min=1)
        return {
            "loss": loss_sum.item() / images,
            "acc": true_pos.sum().item() / images,
            "f1": f1.mean().item(),
        }

    def _evaluate_label_sets(
        self, batches: Batches, num_batches: int, on_features: bool, num_labels: int, desc: str
    ) -> dict[str, float]:
        model = self.eval_model
        was_training = model.training
        model.eval()
        module = model.head if on_features else model
        figures = label_sets.Figures(num_labels, self.precision.device)
        with progress(desc, num_batches, "batch", enabled=self.env.is_main) as bar:
            for x, y in batches:
                x, y = self._to_device(x, y)
                with self.precision.autocast():
                    logits = module(x).float()
                figures.add(logits, y)
                bar.update(1)
        model.train(was_training)
        return figures.result(self.env)

    def _forward_backward(
        self, module: nn.Module, x: torch.Tensor, y: torch.Tensor, group_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        target = y
        if self.batch_mix is not None and x.ndim == 4:  # MixUp/CutMix on images, not on cached features
            x, target = self.batch_mix(x, y)
        with self.precision.autocast():
            logits = module(x)
            taught = (self.teacher(x).float(),) if self.teacher is not None and x.ndim == 4 else ()
        logits = logits.float()  # the loss and the accuracy read fp32 (argmax of bf16 logits: 9x slower)
        loss = self.criterion(logits, target, *taught)
        self.scaler.scale(loss / group_size).backward()
        return loss.detach(), logits.detach()

    def _optimizer_step(self) -> None:
        if self.params.grad_clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            trainable = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            nn.utils.clip_grad_norm_(trainable, self.params.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.scheduler.last_epoch)

    def _module(self, plan: EpochPlan) -> nn.Module:
        """The module this epoch trains, DDP-wrapped afresh whenever its trainable parameters change."""
        key = (plan.on_features, plan.groups)
        if self._wrapped is None or self._wrapped[0] != key:
            module = self.model.head if plan.on_features else self.model
            self._wrapped = (key, wrap(module, self.env, self.precision.device))
        return self._wrapped[1]

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.precision.device, non_blocking=True)
        if self.params.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.precision.device, non_blocking=True)


@dataclass
class FitState:
    """Progress that a checkpoint restores besides the trainer's own state."""

    epoch: int = 0  # epochs completed
    planned: int = 0  # epochs the run takes: all the plans, or those that fit in train.time_limit_min
    history: list[dict[str, float]] = field(default_factory=list)
    best_value: float | None = None  # of the early-stopping metric, over all epochs: picks the saved model
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    phase_best: float | None = None  # best within the current phase: drives early stopping
    bad_epochs: int = 0
    stopped_early: bool = False
    restores: int = 0  # train.on_overfit: restore
    seconds: float = 0.0  # the epochs'
    setup_seconds: float = 0.0  # the stage's before its first epoch (each resumed process's added)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def fit(
    trainer: Trainer,
    plans: list[EpochPlan],
    data: EpochData,
    state: FitState,
    num_classes: int,
    on_epoch_end: Callable[[FitState, dict[str, float]], None],
) -> FitState:
    """Run the remaining epochs, keeping the best epoch's weights.

    Early stopping ends the last phase once it has gone `early_stopping_patience` epochs without beating its
    own best: a new phase (e.g. unfreezing after progressive's head-only epochs) starts worse at its peak lr,
    so comparing it with the previous phase's best would stop it before it gets going. Under
    `train.time_limit_min` the run ends after the epochs that fit (`state.planned`).
    """
    patience = trainer.params.early_stopping_patience
    state.planned = state.planned or len(plans)
    while state.epoch < state.planned and not state.stopped_early:
        epoch = state.epoch
        plan = plans[epoch]
        if epoch > 0 and plans[epoch - 1].phase != plan.phase:
            state.phase_best, state.bad_epochs = None, 0
        size = train_sizes(trainer.params, plans, state.planned, data.image_size)[epoch]
        first_of_last_phase = plan.phase == plans[-1].phase and all(
            r["phase"] != plan.phase for r in state.history
        )
        probe = None
        if trainer.params.time_limit_min is not None and first_of_last_phase:
            probe = _plan_from_first_batches(trainer, plans, state, data, size)
        record = _run_epoch(trainer, plan, epoch, state.planned, data, num_classes, size, probe)
        state.history.append(record)
        state.seconds += record["seconds"]
        _track_best(state, trainer, record[trainer.monitor], epoch)
        state.epoch = epoch + 1
        if trainer.params.time_limit_min is not None:
            _keep_to_time_limit(trainer, plans, state, data.image_size)
        in_last_phase = plan.phase == plans[-1].phase and state.epoch < state.planned
        overfit_stop = in_last_phase and _act_on_overfit(trainer, state, record)
        state.stopped_early = bool(
            overfit_stop or (in_last_phase and patience and state.bad_epochs >= patience)
        )
        on_epoch_end(state, record)
    return state


def _act_on_overfit(trainer: Trainer, state: FitState, record: dict[str, float]) -> bool:
    """`train.on_overfit` after an epoch of the last phase whose train accuracy exceeds val accuracy by more
    than `train.overfit_gap_warning` while the early-stopping metric did not beat the phase's best (as early
    stopping counts); whether to stop. `restore` goes back to the best epoch of the run."""
    p = trainer.params
    gap = record["train_acc"] - record["val_acc"]
    if p.on_overfit == "warn" or gap <= p.overfit_gap_warning or state.bad_epochs == 0:
        return False  # bad_epochs 0: it beat its phase's best (a new phase starts below the last one's)
    what = f"epoch {record['epoch']}: train accuracy exceeds val accuracy by {gap:.3f}, and its "
    what += f"{trainer.monitor}"
    if p.on_overfit == "stop":
        log.warning(
            f"train: {what} is no better than epoch {state.best_epoch}'s; stopping (train.on_overfit)"
        )
        return True
    trainer.restore(state.best_state, p.overfit_lr_factor)
    state.restores += 1
    log.warning(
        f"train: {what} is no better than epoch {state.best_epoch}'s; back to its weights, the lr from here "
        f"x{p.overfit_lr_factor:g} (train.on_overfit: restore)"
    )
    return False


def train_sizes(params: TrainParams, plans: list[EpochPlan], planned: int, full: int) -> list[int]:
    """The training crop size of each of the first `planned` epochs (progressive resizing): `full`
    (model.image_size) before the last phase and in head-only epochs; in the last phase
    `train.resize_start` x `full` at its first epoch, growing linearly to `train.resize_end` x `full` at epoch
    `planned`, in steps of 8 px."""
    first = next(i for i, plan in enumerate(plans) if plan.phase == plans[-1].phase)
    span, sizes = max(1, planned - 1 - first), []
    for epoch in range(planned):
        share = params.resize_start + (params.resize_end - params.resize_start) * min(
            1, (epoch - first) / span
        )
        size = min(full, max(_SIZE_STEP, _SIZE_STEP * round(full * share / _SIZE_STEP)))
        sizes.append(full if epoch < first or plans[epoch].on_features else size)
    return sizes


_SIZE_STEP = 8


# How a CPU's training loop grows with the crop's pixels before a second size has run: lite2 trained at 182
# img/s at 40 px and 96 at 80 px (fp32, 2-core Intel Xeon), at 133-137 and 72-77 in benchmarks/budget_recipe
# (same CPU, 2026-12-08): 4x the pixels for 1.8-1.9x the time, pixels ** 0.43-0.46. A GPU's large batches
# grow with the pixels.
CPU_PIXEL_EXPONENT = 0.5


def epoch_seconds(done: list[dict[str, float]], full: int, cpu: bool = False) -> Callable[[int], float]:
    """A last-phase epoch's seconds at a crop size, predicted from the epochs `done`: validation (the rest of
    an epoch) as it took, the training loop as a + b x its pixels, fitted by least squares once two sizes
    have run. Before that, the loop grows in proportion to the pixels, or on a CPU (`cpu`), whose small
    crops keep per-layer costs, to the power `CPU_PIXEL_EXPONENT` of them: in proportion, a first epoch at
    half the size predicted a full-size one at twice its real time, and the plan was short by a third."""
    fixed = sum(r["seconds"] - r["loop_seconds"] for r in done) / len(done)
    pixels = np.array([(r["size"] / full) ** 2 for r in done])
    loops = np.array([r["loop_seconds"] for r in done])
    if len(set(pixels.tolist())) > 1:
        slope, intercept = np.polyfit(pixels, loops, 1)
        if slope > 0 and intercept >= 0:
            return lambda size: fixed + float(intercept) + float(slope) * (size / full) ** 2
    exponent, share, loop = (CPU_PIXEL_EXPONENT if cpu else 1.0), float(pixels.mean()), float(loops.mean())
    return lambda size: fixed + loop * ((size / full) ** 2 / share) ** exponent


def _keep_to_time_limit(
    trainer: Trainer,
    plans: list[EpochPlan],
    state: FitState,
    full: int,
    current: dict[str, float] | None = None,
    steps_done: int = 0,
) -> None:
    """`train.time_limit_min` (Ultralytics' `time`), after each epoch: once the last phase has run an epoch,
    plan as many epochs as fit in the time left (never more than the plans) and compress the rest of the lr
    schedule into them; before that, only stop once the time is spent. An epoch's time is predicted from
    the last phase's so far (`epoch_seconds`), at its crop size (progressive resizing). `current`: the
    predicted record of the epoch in progress (`_plan_from_first_batches`), `steps_done` steps into it; it
    counts as one of the epochs to fit, and it always ends."""
    limit_min = trainer.params.time_limit_min
    left = limit_min * 60 - state.setup_seconds - state.seconds
    done = [r for r in state.history if r["phase"] == plans[-1].phase] + ([current] if current else [])
    fewest = state.epoch + (current is not None)  # the epoch in progress ends
    if done:
        seconds = epoch_seconds(done, full, cpu=trainer.precision.device.type == "cpu")
        pace = seconds(full)

        def fits(n: int) -> bool:
            sizes = train_sizes(trainer.params, plans, n, full)[state.epoch :]
            return sum(seconds(size) for size in sizes) <= left

        planned = next((n for n in range(len(plans), fewest, -1) if fits(n)), fewest)
    else:
        planned = state.planned if left > 0 else state.epoch
    planned = from_main(trainer.env, planned)  # the ranks' clocks differ: rank 0 decides for all
    if planned == state.planned:
        return
    if planned > state.epoch:
        trainer.replan(state.planned - state.epoch, planned - state.epoch, steps_done)
        log.info(
            f"train: {planned} of {len(plans)} epochs fit in train.time_limit_min {limit_min:g} at "
            f"{pace:.0f} s a full-size epoch; the lr schedule now ends after epoch {planned}"
        )
    else:
        why = "is spent" if left <= 0 else f"leaves {left:.0f} s, less than the next epoch takes"
        log.warning(
            f"train: train.time_limit_min {limit_min:g} {why} after epoch {state.epoch} of "
            f"{state.planned}; stopping (the best epoch so far is kept). Raise it to train every epoch"
        )
    state.planned = planned


_PROBE_WARMUP, _PROBE_SHARE = 2, 0.05  # batches left out of the pace (kernels warming up); batches timed


def _plan_from_first_batches(
    trainer: Trainer, plans: list[EpochPlan], state: FitState, data: EpochData, size: int
) -> Callable[[int, int, float], None]:
    """`train.time_limit_min` in the last phase's first epoch: once 5% of its batches have run (at least 3
    after 2 of warm-up), the epochs that fit are planned from their pace, so the lr schedule fits the
    budget from the start. Planned only after that epoch, a budget of one or two epochs (a large set on a
    slow CPU) kept the warm-up's peak lr to its end. The epoch's validation is predicted at a third of a
    training image's time per val image (a forward pass without the backward), at the full size; the
    plan is made again after the epoch, from its measured time."""
    mark: dict[str, float] = {}
    train_images, val_images = (len(labels) for labels in data.labels)
    full = data.image_size

    def on_batch(done: int, total: int, seconds: float) -> None:
        if done == _PROBE_WARMUP:
            mark["seconds"] = seconds
        at = max(_PROBE_WARMUP + 3, math.ceil(total * _PROBE_SHARE))
        if done != at or done >= total or "seconds" not in mark:
            return
        loop_seconds = (seconds - mark["seconds"]) / (done - _PROBE_WARMUP) * total
        val_seconds = loop_seconds / 3 * val_images / train_images * (full / size) ** 2
        current = {"size": size, "loop_seconds": loop_seconds, "seconds": loop_seconds + val_seconds}
        _keep_to_time_limit(trainer, plans, state, full, current, done // trainer.params.grad_accum_steps)

    return on_batch


def _run_epoch(
    trainer: Trainer,
    plan: EpochPlan,
    epoch: int,
    planned: int,
    data: EpochData,
    num_classes: int,
    size: int,
    on_batch: Callable[[int, int, float], None] | None = None,
) -> dict[str, float]:
    """Train (on crops of `size`) and evaluate one epoch; its record for the history, logs and curves."""
    start = time.perf_counter()
    batches, num_batches = data.train(epoch, plan.on_features, size)
    desc = f"epoch {epoch + 1}/{planned}"
    train = trainer.train_epoch(plan, batches, num_batches, desc=desc, on_batch=on_batch)
    val = trainer.evaluate(*data.val(plan.on_features), plan.on_features, num_classes, desc=f"{desc} val")
    return {
        "epoch": epoch + 1,
        "phase": plan.phase,
        "trainable_groups": plan.groups,
        "on_features": plan.on_features,
        "train_loss": train["loss"],
        "train_acc": train["acc"],
        "val_loss": val["loss"],
        "val_acc": val["acc"],
        "val_f1": val["f1"],
        **({"val_map": val["map"]} if "map" in val else {}),
        "size": size,
        "images": train["images"],
        "loop_seconds": train["seconds"],
        "images_per_s": train["images"] / max(train["seconds"], 1e-9),
        "seconds": time.perf_counter() - start,
        **trainer.lrs(),
    }


def _track_best(state: FitState, trainer: Trainer, value: float, epoch: int) -> None:
    """Keep the best epoch's weights over all epochs; count the epochs without progress in this phase."""
    monitor = trainer.monitor
    if _improved(value, state.best_value, monitor):
        state.best_value, state.best_epoch = value, epoch + 1
        state.best_state = {k: v.detach().cpu().clone() for k, v in trainer.eval_model.state_dict().items()}
    if _improved(value, state.phase_best, monitor):
        state.phase_best, state.bad_epochs = value, 0
    else:
        state.bad_epochs += 1


def _improved(value: float, best: float | None, monitor: str) -> bool:
    if best is None:
        return True
    return value < best if monitor in LOWER_IS_BETTER else value > best
