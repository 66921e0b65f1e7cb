"""The optimizer story: parameter groups, no weight decay on norms and biases, the head's lr multiplier, the
per-phase schedule, and the lrs read back from the optimizer."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ModelParams, TrainParams
from pipeline.models import build_model
from pipeline.models.freezing import block_groups, set_trainable
from pipeline.training.optim import (
    build_optimizer,
    build_scheduler,
    compressed,
    current_lrs,
    lr_factor,
    schedule_factor,
    set_lr,
)

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = ModelParams(backbone="test_efficientnet", weights="none", image_size=32)


@pytest.fixture(scope="module")
def model():
    return build_model(TINY, num_classes=3)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_groups_skip_weight_decay_on_norms_and_biases_and_the_head_gets_its_lr_multiplier(model, optimizer):
    params = TrainParams(optimizer=optimizer, lr=0.002, weight_decay=0.05, head_lr_mult=10.0)
    groups = build_optimizer(model, params).param_groups
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for group in groups:
        dims = {p.ndim for p in group["params"]}
        assert (group["weight_decay"] == 0.0) == (dims == {1}), group["weight_decay"]
    head_ids = {id(p) for p in model.head.parameters()}
    for group in groups:
        in_head = {id(p) in head_ids for p in group["params"]}
        assert in_head == {group["lr"] == pytest.approx(0.02)}
        assert in_head == {group["lr"] != pytest.approx(0.002)}


def test_schedule_warms_up_then_decays_to_zero_and_restarts_for_each_phase():
    phases, warmup = [10, 20], 4
    factors = [lr_factor(step, phases, warmup) for step in range(30)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # linear warm-up
    assert factors[4] == pytest.approx(1.0) and all(
        a > b for a, b in zip(factors[4:9], factors[5:10], strict=True)
    )
    assert factors[10] == pytest.approx(0.2)  # second phase starts its own warm-up
    assert factors[29] < 0.01 and lr_factor(40, phases, warmup) == 0.0


def test_logged_lrs_are_the_optimizers_own_through_the_phases(model):
    params = TrainParams(lr=0.001, head_lr_mult=4.0, warmup_epochs=1)
    optimizer = build_optimizer(model, params)
    # Two head-only epochs (phase 0), then three with the whole backbone (phase 1); two steps an epoch.
    scheduler = build_scheduler(optimizer, [0, 0, 1, 1, 1], steps_per_epoch=2, params=params)
    set_trainable(model, block_groups(model.backbone), 0)
    seen = []
    for step in range(10):
        if step == 4:
            set_trainable(model, block_groups(model.backbone), 99)
        seen.append(current_lrs(optimizer, params.head_lr_mult))
        optimizer.step()
        scheduler.step()
    expected = [lr_factor(step, [4, 6], 2) for step in range(10)]
    assert [s["lr"] for s in seen] == pytest.approx([0.001 * f for f in expected])
    assert [s["lr_head"] for s in seen] == pytest.approx([0.004 * f for f in expected])
    assert [s["lr_trained"] for s in seen] == [s["lr_head"] for s in seen[:4]] + [s["lr"] for s in seen[4:]]
    assert seen[4]["lr"] == pytest.approx(0.001 / 3)  # the second phase restarts its warm-up


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_one_step_moves_the_head_head_lr_mult_times_as_far_as_the_backbone(optimizer):
    torch.manual_seed(0)
    model = build_model(TINY, num_classes=3)
    params = TrainParams(optimizer=optimizer, lr=0.01, head_lr_mult=5.0, weight_decay=0.0, momentum=0.0)
    opt = build_optimizer(model, params)
    model(torch.rand(2, 3, 32, 32)).logsumexp(1).sum().backward()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        grad = p.grad
        # A first step without momentum or weight decay: SGD moves lr * g, AdamW lr * g / (|g| + eps).
        unit = grad if optimizer == "sgd" else grad / (grad.abs() + 1e-8)
        scale = 5.0 if name.startswith("head.") else 1.0
        torch.testing.assert_close(p.detach() - before[name], -0.01 * scale * unit, rtol=1e-3, atol=1e-6)


def _curve(model, steps: int, epoch_phases: list[int], **train) -> list[float]:
    """The backbone lr the optimizer holds at each of `steps` steps (2 steps per epoch)."""
    params = TrainParams(lr=1.0, warmup_epochs=1, **train)
    optimizer = build_optimizer(model, params)
    scheduler = build_scheduler(optimizer, epoch_phases, steps_per_epoch=2, params=params)
    lrs = []
    for _ in range(steps):
        lrs.append(current_lrs(optimizer, params.head_lr_mult)["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_restarts_warms_up_then_restarts_every_period_growing_by_the_multiplier(model):
    # 1 warm-up epoch (2 steps), then cycles of 2 epochs (4 steps), the next 2x as long (8 steps).
    lrs = _curve(model, 16, [0] * 8, schedule="cosine_restarts", restart_epochs=2, restart_mult=2.0)
    assert lrs[:2] == pytest.approx([1 / 3, 2 / 3])
    first = [0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    second = [0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(8)]
    assert lrs[2:6] == pytest.approx(first) and lrs[6:14] == pytest.approx(second)
    assert lrs[14] == pytest.approx(1.0)  # the third cycle restarts at the peak


def test_step_schedule_drops_by_gamma_at_each_milestone_and_keeps_the_warm_up(model):
    lrs = _curve(model, 12, [0] * 6, schedule="step", step_milestones=[2, 4], step_gamma=0.5)
    assert lrs[:2] == pytest.approx([1 / 3, 2 / 3])
    assert lrs[2:4] == pytest.approx([1.0, 1.0])  # epochs 1-2 (from the warm-up's end to milestone 2)
    assert lrs[4:8] == pytest.approx([0.5] * 4) and lrs[8:12] == pytest.approx([0.25] * 4)


def test_linear_schedule_falls_in_a_straight_line_to_zero_at_the_phases_end(model):
    # 1 warm-up epoch (2 steps), then 6 steps from 1 down by 1/6 a step ("budgeted training").
    lrs = _curve(model, 8, [0] * 4, schedule="linear")
    assert lrs[:2] == pytest.approx([1 / 3, 2 / 3])
    assert lrs[2:] == pytest.approx([1 - i / 6 for i in range(6)])
    assert schedule_factor([0] * 4, 2, TrainParams(schedule="linear", warmup_epochs=1))(8) == 0.0


def test_every_schedule_warms_up_again_in_each_phase(model):
    for schedule in ("cosine", "linear", "cosine_restarts", "step"):
        lrs = _curve(model, 8, [0, 0, 1, 1], schedule=schedule, step_milestones=[1.5])
        assert lrs[4:6] == pytest.approx([1 / 3, 2 / 3]), schedule
        assert max(lrs[:4]) == pytest.approx(1.0) and max(lrs[4:]) == pytest.approx(1.0), schedule


def test_set_lr_keeps_the_heads_multiplier(model):
    optimizer = build_optimizer(model, TrainParams(head_lr_mult=3.0))
    set_lr(optimizer, 0.01)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([0.01, 0.03])


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_a_compressed_schedule_goes_on_from_where_it_is_and_reaches_its_end_sooner(schedule):
    # 10 epochs of 10 steps; after 40 steps only 30 more fit: steps 40..100 of the plan run as 40..70.
    params = TrainParams(schedule=schedule, warmup_epochs=1.0, step_milestones=[6.0])
    factor = schedule_factor([0] * 10, 10, params)
    short = compressed(factor, 40, 100, 70)
    assert [short(s) for s in range(41)] == [factor(s) for s in range(41)]  # the past is kept
    assert short(55) == pytest.approx(factor(70))  # half-way through the rest: the plan's half-way lr
    assert short(70) == pytest.approx(factor(100))  # the end of the plan, 30 steps sooner
    if schedule == "step":  # the milestone at step 60 of the plan moves to step 50
        assert short(49) == factor(40) and short(50) == pytest.approx(factor(60)) and factor(60) < factor(40)
    else:
        assert short(70) == pytest.approx(0.0, abs=1e-12) and 0 < short(69) < short(41) < factor(40)
