"""What trains when: block groups, the strategies' per-epoch plans, frozen BatchNorm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import ModelParams
from pipeline.models import build_model
from pipeline.models.freezing import Freezing, block_groups, plan_epochs, set_trainable, train_mode

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = ModelParams(backbone="test_efficientnet", weights="none", image_size=32)


@pytest.fixture(scope="module")
def model():
    return build_model(TINY, num_classes=3)


def test_block_groups_cover_every_backbone_parameter_once_from_input_to_output(model):
    groups = block_groups(model.backbone)
    names = [name for group in groups for name in group]
    assert sorted(names) == sorted(name for name, _ in model.backbone.named_parameters())
    assert groups[0][0].startswith("conv_stem") and any(n.startswith("conv_head") for n in groups[-1])


def test_block_groups_fall_back_to_top_level_children():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    assert block_groups(net) == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"strategy": "linear_probe", "epochs": 3}, [(0, 0, True)] * 3),
        ({"strategy": "partial", "epochs": 2, "trainable_blocks": 2}, [(0, 2, False)] * 2),
        ({"strategy": "partial", "epochs": 1, "trainable_blocks": 99}, [(0, 6, False)]),
        ({"strategy": "partial", "epochs": 1, "trainable_blocks": None}, [(0, 6, False)]),
        ({"strategy": "full", "epochs": 2}, [(0, 6, False)] * 2),
        (
            {"strategy": "progressive", "epochs": 6, "progressive_head_epochs": 2, "trainable_blocks": 2,
             "progressive_unfreeze_every": 1},
            [(0, 0, True), (0, 0, True), (1, 2, False), (1, 3, False), (1, 4, False), (1, 5, False)],
        ),
        (
            {"strategy": "progressive", "epochs": 4, "progressive_head_epochs": 1, "trainable_blocks": None},
            [(0, 0, True), (1, 6, False), (1, 6, False), (1, 6, False)],
        ),
        (
            {"strategy": "progressive", "epochs": 3, "progressive_head_epochs": 1, "trainable_blocks": 3},
            [(0, 0, True), (1, 3, False), (1, 3, False)],
        ),
        (
            {"strategy": "progressive", "epochs": 2, "progressive_head_epochs": 0, "trainable_blocks": 2,
             "progressive_unfreeze_every": 1},
            [(0, 2, False), (0, 3, False)],
        ),
    ],
)  # fmt: skip
def test_each_strategy_plans_its_epochs(overrides, expected):
    plans = plan_epochs(Freezing(**overrides), num_groups=6)
    assert [(p.phase, p.groups, p.on_features) for p in plans] == expected


def test_set_trainable_freezes_all_but_the_head_and_the_last_groups(model):
    groups = block_groups(model.backbone)
    set_trainable(model, groups, 2)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == set(groups[-2] + groups[-1])
    assert all(p.requires_grad for p in model.head.parameters())
    set_trainable(model, groups, 0)
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_train_mode_keeps_frozen_parts_and_frozen_batchnorm_in_eval(model):
    groups = block_groups(model.backbone)
    set_trainable(model, groups, 1)
    train_mode(model, freeze_bn=False)
    assert not model.backbone.conv_stem.training and not model.backbone.bn1.training  # frozen group
    assert model.backbone.bn2.training and model.head.training  # trainable BatchNorm and head
    train_mode(model, freeze_bn=True)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    assert model.head.training


def test_frozen_batchnorm_statistics_do_not_move_in_a_training_step(model):
    set_trainable(model, block_groups(model.backbone), 99)
    train_mode(model, freeze_bn=True)
    before = model.backbone.bn2.running_mean.clone()
    model(torch.randn(4, 3, 32, 32) * 5 + 3).sum().backward()
    assert torch.equal(before, model.backbone.bn2.running_mean)
