"""The optimizer story: parameter groups, no weight decay on norms and biases, the head's lr multiplier, the
per-phase schedule, and the lrs read back from the optimizer."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelParams, TrainParams
from pipeline.models import build_model
from pipeline.models.freezing import block_groups, set_trainable
from pipeline.training.optim import build_optimizer, build_scheduler, current_lrs, lr_factor

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
    scheduler = build_scheduler(optimizer, [0, 0, 1, 1, 1], steps_per_epoch=2, warmup_epochs=1)
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
