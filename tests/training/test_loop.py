"""training/loop: early stopping within the last phase, the best epoch kept; the real Trainer's gradient
accumulation, EMA weights (evaluated and kept), MixUp/CutMix and channels_last inputs on a tiny conv net."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import AugmentParams, TrainParams
from pipeline.data.transforms import build_batch_mix
from pipeline.errors import PipelineError
from pipeline.models import ImageClassifier
from pipeline.models.freezing import EpochPlan, block_groups
from pipeline.training import loop
from pipeline.training.distributed import Dist
from pipeline.training.loop import FitState, Trainer, fit
from pipeline.training.loss import build_criterion
from pipeline.training.precision import Precision

CLASSES = 3
TRAIN_ALL = EpochPlan(0, 1, False)  # the tiny net's backbone is one block group: everything trains


class _Clock:
    """time.perf_counter for the loop's epoch timing, advanced by each scripted epoch."""

    def __init__(self, epoch_seconds: list[float]):
        self.now, self.epoch_seconds = 0.0, list(epoch_seconds)

    def perf_counter(self) -> float:
        return self.now


class _ScriptedTrainer:
    """Stands in for loop.Trainer: val accuracy follows a script."""

    def __init__(self, val_accs: list[float], patience: int, clock: _Clock | None = None, **train):
        self.params = TrainParams(early_stopping_patience=patience, **train)
        self.eval_model, self._accs, self.env = nn.Linear(1, 1), iter(val_accs), Dist()
        self.precision = Precision(torch.device("cuda"), None)  # times grow with the pixels (epoch_seconds)
        self.clock, self.replans = clock, []

    def train_epoch(self, *args, **kwargs) -> dict:
        if self.clock is not None:
            self.clock.now += self.clock.epoch_seconds.pop(0)
        return {"loss": 1.0, "acc": 0.5, "images": 1, "seconds": 1.0}

    def replan(self, epochs_left: int, new_epochs_left: int, steps_done: int = 0) -> None:
        self.replans.append(
            (epochs_left, new_epochs_left, steps_done) if steps_done else (epochs_left, new_epochs_left)
        )

    monitor = Trainer.monitor  # the real Trainer's choice of metric (multilabel False: auto is val_acc)
    multilabel = False

    def evaluate(self, *args, **kwargs) -> dict:
        return {"loss": 1.0, "acc": next(self._accs), "f1": 0.0}

    def lrs(self) -> dict:
        return {"lr": 0.0, "lr_head": 0.0, "lr_trained": 0.0}


class _NoData:
    image_size = 64
    labels = (torch.zeros(30), torch.zeros(9))  # 30 train and 9 val images

    def __init__(self):
        self.sizes = []  # each epoch's training crop size

    def train(self, epoch, on_features, size=None):
        self.sizes.append(size)
        return [], 0

    def val(self, on_features):
        return [], 0


def test_early_stopping_counts_within_the_last_phase_and_the_best_epoch_is_kept():
    # Head-only phase: 3 epochs, getting worse (no stop there). Fine-tuning starts below the head's best,
    # improves, then stalls for `patience` epochs: stop, keeping the overall best epoch (2).
    plans = [EpochPlan(0, 0, True)] * 3 + [EpochPlan(1, 6, False)] * 6
    accs = [0.8, 0.81, 0.7, 0.6, 0.62, 0.61, 0.60, 0.95, 0.95]
    state = fit(_ScriptedTrainer(accs, patience=2), plans, _NoData(), FitState(), 3, lambda *a: None)
    assert [r["val_acc"] for r in state.history] == accs[:7]
    assert state.stopped_early and state.best_epoch == 2 and state.best_value == 0.81


def test_patience_zero_runs_every_epoch():
    plans = [EpochPlan(0, 6, False)] * 4
    trainer = _ScriptedTrainer([0.5, 0.4, 0.3, 0.2], patience=0)
    state = fit(trainer, plans, _NoData(), FitState(), 3, lambda *a: None)
    assert len(state.history) == 4 and not state.stopped_early and state.best_epoch == 1


def test_time_limit_plans_the_epochs_that_fit_at_the_last_phases_pace(monkeypatch):
    # 60 s for 1 head-only epoch of 2 s, then 9 fine-tuning epochs of 10 s: after the first of those (12 s
    # spent, 10 s each) 4 more fit: the plan shrinks from 10 to 6 epochs once, and the run stops there.
    clock = _Clock([2.0] + [10.0] * 9)
    monkeypatch.setattr(loop, "time", clock)
    plans = [EpochPlan(0, 0, True)] + [EpochPlan(1, 6, False)] * 9
    trainer = _ScriptedTrainer([0.5] * 10, patience=0, clock=clock, time_limit_min=1.0)
    state = fit(trainer, plans, _NoData(), FitState(), 3, lambda *a: None)
    assert trainer.replans == [(8, 4)]
    assert len(state.history) == state.planned == 6 and state.seconds == pytest.approx(52.0)


def test_time_limit_plans_more_epochs_again_when_the_pace_picks_up_but_never_more_than_planned(monkeypatch):
    clock = _Clock([30.0, 10.0, 10.0, 1.0, 1.0])
    monkeypatch.setattr(loop, "time", clock)
    plans = [EpochPlan(0, 6, False)] * 5
    trainer = _ScriptedTrainer([0.5] * 5, patience=0, clock=clock, time_limit_min=1.5)
    state = fit(trainer, plans, _NoData(), FitState(), 3, lambda *a: None)
    # 90 s: after 30 s, 2 more fit at 30 s (3 epochs); after 40 s at 20 s, 2 more (4 epochs); after 50 s at
    # 16.7 s, 2 more (5 epochs); after 51 s at 12.75 s, 3 more, but 5 were planned: 5 it stays.
    assert trainer.replans == [(4, 2), (1, 2), (1, 2)]
    assert len(state.history) == state.planned == 5


def test_a_time_limit_spent_before_the_last_phase_stops_the_run_there(monkeypatch):
    clock = _Clock([70.0, 10.0])
    monkeypatch.setattr(loop, "time", clock)
    plans = [EpochPlan(0, 0, True)] * 2 + [EpochPlan(1, 6, False)] * 3
    trainer = _ScriptedTrainer([0.5] * 5, patience=0, clock=clock, time_limit_min=1.0)
    state = fit(trainer, plans, _NoData(), FitState(), 3, lambda *a: None)
    assert len(state.history) == state.planned == 1 and trainer.replans == []


def test_without_a_time_limit_every_planned_epoch_runs(monkeypatch):
    clock = _Clock([1000.0] * 3)
    monkeypatch.setattr(loop, "time", clock)
    trainer = _ScriptedTrainer([0.5] * 3, patience=0, clock=clock)
    state = fit(trainer, [EpochPlan(0, 6, False)] * 3, _NoData(), FitState(), 3, lambda *a: None)
    assert len(state.history) == state.planned == 3


class _FormatProbe(nn.Module):
    """Identity that records whether each input it sees is channels_last."""

    def __init__(self):
        super().__init__()
        self.channels_last: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.channels_last.append(x.is_contiguous(memory_format=torch.channels_last))
        return x


def _tiny_classifier() -> ImageClassifier:
    """Conv net without dropout or BatchNorm: a step depends only on the batch, not on train/eval mode."""
    torch.manual_seed(0)
    conv = nn.Sequential(_FormatProbe(), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return ImageClassifier(conv, nn.Linear(4, CLASSES))


def _trainer(
    model: ImageClassifier | None = None, steps_per_epoch: int = 2, mix=None, epochs: int = 1, **train
) -> Trainer:
    """The real Trainer with plain SGD (no momentum, weight decay, clipping or warm-up) on the CPU in fp32."""
    settings = {"optimizer": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0, "grad_clip_norm": 0.0}
    params = TrainParams(**{**settings, "warmup_epochs": 0.0, "label_smoothing": 0.0, **train})
    model = model or _tiny_classifier()
    return Trainer(
        model=model,
        params=params,
        plans=[TRAIN_ALL] * epochs,
        block_groups=block_groups(model.backbone),
        steps_per_epoch=steps_per_epoch,
        precision=Precision(torch.device("cpu"), None),
        env=Dist(),
        criterion=build_criterion(None, params.label_smoothing),
        batch_mix=mix,
    )


def _batches(sizes: list[int], seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, 6, 6, generator=generator), torch.randint(0, CLASSES, (n,), generator=generator))
        for n in sizes
    ]


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("micro_batches", [[2, 2], [2, 2, 2]])
def test_accumulation_steps_once_per_k_batches_as_one_step_on_their_concatenation(micro_batches):
    # k=2: [2, 2] is one step on 4 images; [2, 2, 2] is a step on 4 images, then one on the last 2 alone.
    accumulating, plain = _trainer(grad_accum_steps=2), _trainer(grad_accum_steps=1)
    batches = _batches(micro_batches)
    groups = [batches[i : i + 2] for i in range(0, len(batches), 2)]
    concatenated = [(torch.cat([x for x, _ in g]), torch.cat([y for _, y in g])) for g in groups]

    accumulating.train_epoch(TRAIN_ALL, batches, len(batches), "accumulating")
    plain.train_epoch(TRAIN_ALL, concatenated, len(concatenated), "plain")

    assert accumulating.scheduler.last_epoch == plain.scheduler.last_epoch == len(groups)  # optimizer steps
    moved = _weights(accumulating.model)
    assert not torch.allclose(moved["head.weight"], _weights(_tiny_classifier())["head.weight"], atol=1e-3)
    for name, value in _weights(plain.model).items():
        torch.testing.assert_close(moved[name], value, rtol=1e-5, atol=1e-6, msg=name)


class _SnapshotData:
    """Two training batches; the live weights are recorded after each optimizer step (one per batch)."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.live = trainer, []
        self.train_batches, self.val_batches = _batches([4, 4], seed=2), _batches([6], seed=3)

    def _train(self):
        for batch in self.train_batches:
            yield batch
            self.live.append(_weights(self.trainer.model))

    image_size = 6

    def train(self, epoch, on_features, size=None):
        return self._train(), len(self.train_batches)

    def val(self, on_features):
        return self.val_batches, 1


def test_the_ema_weights_are_the_ones_evaluated_and_kept_as_the_best_epoch():
    decay = 0.3  # timm's warm-up: decay 0 at the first step (a copy), then min(0.3, 1 - 2 ** -2/3 = 0.37)
    trainer = _trainer(ema_decay=decay, lr=2.0)
    data = _SnapshotData(trainer)

    state = fit(trainer, [TRAIN_ALL], data, FitState(), CLASSES, lambda *a: None)

    first, live = data.live
    expected = {name: decay * first[name] + (1 - decay) * live[name] for name in live}
    assert not torch.allclose(expected["head.weight"], live["head.weight"], atol=1e-2)  # a large update
    for name, value in expected.items():
        torch.testing.assert_close(state.best_state[name], value, msg=name)  # what the stage saves

    x, y = data.val_batches[0]
    ema_loss = nn.functional.cross_entropy(torch.func.functional_call(trainer.model, expected, (x,)), y)
    live_loss = nn.functional.cross_entropy(trainer.model(x), y)
    assert state.history[0]["val_loss"] == pytest.approx(ema_loss.item(), rel=1e-5)
    assert ema_loss.item() != pytest.approx(live_loss.item(), rel=1e-3)


@pytest.mark.parametrize("augment", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}])
def test_the_training_loss_is_taken_on_the_mixed_batch_and_its_soft_targets(augment):
    mix = build_batch_mix(AugmentParams(**augment), CLASSES)
    trainer = _trainer(mix=mix, lr=1e-9)  # the weights barely move: the loss below uses the same model
    with torch.no_grad():
        trainer.model.head.weight.mul_(50.0)  # confident logits, so mixed and unmixed losses differ
    (x, y), seed = _batches([4])[0], 7

    torch.manual_seed(seed)
    loss = trainer.train_epoch(TRAIN_ALL, [(x, y)], 1, "mixed")["loss"]

    torch.manual_seed(seed)
    mixed, soft = mix(x, y)
    with torch.no_grad():
        expected = nn.functional.cross_entropy(trainer.model(mixed), soft).item()
        unmixed = nn.functional.cross_entropy(trainer.model(x), y).item()
    assert loss == pytest.approx(expected, rel=1e-4) and loss != pytest.approx(unmixed, rel=1e-3)


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_inputs_reach_the_model_in_that_memory_format(channels_last):
    trainer = _trainer(channels_last=channels_last)
    probe = trainer.model.backbone[0]
    trainer.train_epoch(TRAIN_ALL, _batches([2]), 1, "train")
    trainer.evaluate(_batches([2]), 1, on_features=False, num_classes=CLASSES)
    assert probe.channels_last == [channels_last, channels_last]


def _lrs_over(trainer: Trainer, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        trainer.optimizer.step()
        trainer.scheduler.step()
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    return lrs


def test_a_replanned_schedule_ends_sooner_and_a_resumed_run_replays_it(tmp_path):
    # 4 epochs of 4 steps at cosine; after the first epoch only 1 more fits: the lr reaches 0 at step 8.
    trainer = _trainer(steps_per_epoch=4, epochs=4)
    before = _lrs_over(trainer, 4)
    trainer.replan(3, 1)
    torch.save(trainer.state_dict(), tmp_path / "checkpoint.pt")
    after = _lrs_over(trainer, 4)
    assert after[-1] == pytest.approx(0.0, abs=1e-12) and 0 < after[-2] < after[0] < before[-1]
    resumed = _trainer(steps_per_epoch=4, epochs=4)
    resumed.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True))
    assert _lrs_over(resumed, 4) == pytest.approx(after)


def test_on_overfit_stop_ends_the_last_phase_at_a_gap_without_progress():
    # Train accuracy is 0.5 every epoch. Epoch 2 is the best; epoch 3's gap is 0.3 (over 0.15) without
    # progress: stop. A new phase's first epoch beats that phase's best (none yet) whatever the last phase's.
    plans = [EpochPlan(0, 6, False)] * 6
    accs = [0.30, 0.40, 0.20, 0.45, 0.5, 0.5]
    trainer = _ScriptedTrainer(accs, patience=0, on_overfit="stop")
    state = fit(trainer, plans, _NoData(), FitState(), 3, lambda *a: None)
    assert len(state.history) == 3 and state.stopped_early and state.best_epoch == 2
    head_first = [EpochPlan(0, 0, True)] + [EpochPlan(1, 6, False)] * 2
    trainer = _ScriptedTrainer([0.3, 0.2, 0.45], patience=0, on_overfit="stop")
    state = fit(trainer, head_first, _NoData(), FitState(), 3, lambda *a: None)
    assert len(state.history) == 3 and not state.stopped_early  # epoch 2 is the phase's first: no stop
    warned = _ScriptedTrainer(accs, patience=0, on_overfit="warn")
    assert len(fit(warned, plans, _NoData(), FitState(), 3, lambda *a: None).history) == 6


def test_on_overfit_restore_goes_back_to_the_best_weights_at_a_lower_lr_and_resumes_so():
    """After an epoch past the gap without progress, the model is the best epoch's and the rest of the
    schedule is scaled; a trainer restored from the checkpoint's state goes on with the same lr."""
    trainer = _trainer(epochs=4, overfit_gap_warning=0.0, on_overfit="restore", overfit_lr_factor=0.25)
    state = FitState(planned=4, best_value=2.0, best_epoch=1, bad_epochs=1)  # no epoch beats 2.0
    state.best_state = _weights(trainer.eval_model)
    before = trainer.lrs()["lr"]
    record = loop._run_epoch(trainer, TRAIN_ALL, 1, 4, _SnapshotData(trainer), CLASSES, 6)
    assert not torch.equal(trainer.model.head.weight, state.best_state["head.weight"])

    assert loop._act_on_overfit(trainer, state, {**record, "train_acc": 1.0, "val_acc": 0.0}) is False

    assert state.restores == 1
    for name, value in _weights(trainer.model).items():
        assert torch.equal(value, state.best_state[name]), name
    step, unscaled = trainer.scheduler.last_epoch, _trainer(epochs=4).scheduler.lr_lambdas[0]
    assert trainer.lrs()["lr"] == pytest.approx(0.25 * 0.5 * unscaled(step)) and trainer.lrs()["lr"] < before
    resumed = _trainer(epochs=4, on_overfit="restore", overfit_lr_factor=0.25)
    resumed.load_state_dict(trainer.state_dict())
    for later in (step, step + 3):
        assert resumed.scheduler.lr_lambdas[0](later) == pytest.approx(0.25 * unscaled(later))
    assert resumed.scheduler.lr_lambdas[0](step - 1) == pytest.approx(unscaled(step - 1))


def test_progressive_resizing_grows_the_last_phases_crops_and_the_time_limit_plans_by_their_pixels(
    monkeypatch,
):
    """Head-only epochs train at the full size; fine-tuning from 0.5 to 1.0 of 64 px over its epochs. Under a
    time limit the predicted epochs cost their training loop in proportion to their pixels, so more of the
    small early epochs fit than at the full size's pace."""
    plans = [EpochPlan(0, 0, True)] + [EpochPlan(1, 6, False)] * 5
    trainer = _ScriptedTrainer([0.5] * 6, patience=0, resize_start=0.5, resize_end=1.0)
    data = _NoData()
    fit(trainer, plans, data, FitState(), 3, lambda *a: None)
    assert data.sizes == [64, 32, 40, 48, 56, 64]
    assert loop.train_sizes(TrainParams(resize_start=0.5, resize_end=0.875), plans, 6, 64) == [
        64,
        32,
        40,
        48,
        48,
        56,
    ]
    assert loop.train_sizes(TrainParams(), plans, 6, 64) == [64] * 6

    # 30 s: the head-only epoch takes 1 s; a fine-tuning epoch 1 s of validation plus 8 s of training loop
    # at 64 px, in proportion to its pixels below. After epoch 2 (32 px: 3 s) the pace is 9 s a full-size
    # epoch, but epochs 3-6 at 40, 48, 56 and 64 px take 25.75 s of the 26 left: all 6 fit, where 9 s
    # epochs would have fit 4.
    class _Sized(_ScriptedTrainer):
        def train_epoch(self, plan, *args, **kwargs):
            loop_seconds = 0.0 if plan.on_features else 8 * (data.sizes[-1] / 64) ** 2
            self.clock.now += 1 + loop_seconds
            return {"loss": 1.0, "acc": 0.5, "images": 1, "seconds": loop_seconds}

    clock = _Clock([])
    monkeypatch.setattr(loop, "time", clock)
    data = _NoData()
    limited = _Sized([0.5] * 6, patience=0, clock=clock, time_limit_min=0.5, resize_start=0.5)
    state = fit(limited, plans, data, FitState(), 3, lambda *a: None)
    assert len(state.history) == state.planned == 6 and state.seconds == pytest.approx(29.75)
    assert data.sizes == [64, 32, 40, 48, 56, 64]
    full_size = _Sized([0.5] * 6, patience=0, clock=clock, time_limit_min=0.5)
    clock.now, data = 0.0, _NoData()
    assert fit(full_size, plans, data, FitState(), 3, lambda *a: None).planned == 1 + 29 // 9


class _Batched(_ScriptedTrainer):
    """Image epochs of 20 batches: the first two (warm-up) take 3 s each, the others 1 s; each reported to
    `on_batch` as the real Trainer does. Head-only epochs take 2 s in one go."""

    def train_epoch(self, plan, batches, num_batches, desc, on_batch=None):
        start = self.clock.now
        if plan.on_features:
            self.clock.now += 2.0
            return {"loss": 1.0, "acc": 0.5, "images": 1, "seconds": 2.0}
        for done in range(1, 21):
            self.clock.now += 3.0 if done <= 2 else 1.0
            if on_batch is not None:
                on_batch(done, 20, self.clock.now - start)
        return {"loss": 1.0, "acc": 0.5, "images": 1, "seconds": self.clock.now - start}


def test_the_time_limit_plans_from_the_last_phases_first_batches_so_a_short_budget_still_decays(monkeypatch):
    # 30 s: a 2 s head-only epoch, then fine-tuning epochs of 24 s. After 5 of the first one's 20 batches,
    # the 3 past the warm-up ran at 1 s: 20 s of loop and 2 s of val (20 / 3 x 9 / 30) a predicted epoch, so
    # only the epoch in progress fits in the 28 s left. The schedule is compressed into the rest of it then
    # (9 epochs left from its start -> 1, 5 steps into it), not after it, when the lr would have stayed at
    # its warm-up peak to the end.
    clock = _Clock([])
    monkeypatch.setattr(loop, "time", clock)
    plans = [EpochPlan(0, 0, True)] + [EpochPlan(1, 6, False)] * 9
    trainer = _Batched([0.5] * 10, patience=0, clock=clock, time_limit_min=0.5)
    state = fit(trainer, plans, _NoData(), FitState(), 3, lambda *a: None)
    assert trainer.replans == [(9, 1, 5)]
    assert len(state.history) == state.planned == 2
    # 72 s: 70 s left, 3 predicted epochs of 22 s fit (1 + 3 epochs); after the first (24 s measured, 46 s
    # left) only 1 more of 24 s does: the measured plan wins.
    clock.now = 0.0
    longer = _Batched([0.5] * 10, patience=0, clock=clock, time_limit_min=1.2)
    state = fit(longer, plans, _NoData(), FitState(), 3, lambda *a: None)
    assert longer.replans == [(9, 3, 5), (2, 1)]
    assert len(state.history) == state.planned == 3


def test_a_replan_made_during_an_epoch_counts_its_epochs_from_the_epochs_start():
    # 4 epochs of 4 steps at cosine; 2 steps into the first, only it fits: the lr reaches 0 at step 4.
    trainer = _trainer(steps_per_epoch=4, epochs=4)
    _lrs_over(trainer, 2)
    trainer.replan(4, 1, steps_done=2)
    after = _lrs_over(trainer, 2)
    assert after[-1] == pytest.approx(0.0, abs=1e-12) and 0 < after[0]


def test_the_time_limit_counts_the_stages_set_up(monkeypatch):
    # 60 s, of which set-up (caches, model) took 30: after a 10 s epoch, 2 more fit, not 5.
    clock = _Clock([10.0] * 6)
    monkeypatch.setattr(loop, "time", clock)
    trainer = _ScriptedTrainer([0.5] * 6, patience=0, clock=clock, time_limit_min=1.0)
    state = fit(
        trainer, [EpochPlan(0, 6, False)] * 6, _NoData(), FitState(setup_seconds=30.0), 3, lambda *a: None
    )
    assert len(state.history) == state.planned == 3


def test_an_epochs_seconds_are_predicted_from_its_pixels_and_a_fixed_part_once_two_sizes_ran():
    def epoch(size, loop_seconds):
        return {"size": size, "loop_seconds": loop_seconds, "seconds": loop_seconds + 2.0}

    one_size = loop.epoch_seconds([epoch(32, 3.0)], 64)  # in proportion: 12 s of loop at 64 px
    assert one_size(64) == pytest.approx(14.0) and one_size(32) == pytest.approx(5.0)
    on_a_cpu = loop.epoch_seconds([epoch(32, 3.0), epoch(32, 5.0)], 64, cpu=True)  # 4 s, x (4 ** 0.5)
    assert on_a_cpu(64) == pytest.approx(2 + 8.0) and on_a_cpu(32) == pytest.approx(6.0)
    # loops of 4 + 8 x pixels (as on a CPU, where small crops keep per-layer costs): 6 s at 32, 12 s at 64
    affine = loop.epoch_seconds([epoch(32, 6.0), epoch(48, 8.5)], 64)
    assert affine(64) == pytest.approx(14.0) and affine(40) == pytest.approx(2 + 4 + 8 * (40 / 64) ** 2)


def test_training_that_diverges_stops_with_a_line_naming_the_lr():
    trainer = _trainer(lr=1e30)  # the first step takes the weights past float32's range
    data = _SnapshotData(trainer)

    with pytest.raises(PipelineError, match=r"NaN or infinite in epoch 1/1 \(train.lr 1e\+30, fp32\).*lower"):
        fit(trainer, [TRAIN_ALL], data, FitState(), CLASSES, lambda *a: None)

    calm = _trainer(lr=0.5)
    state = fit(calm, [TRAIN_ALL], _SnapshotData(calm), FitState(), CLASSES, lambda *a: None)
    assert len(state.history) == 1  # a run that does not diverge is not stopped
