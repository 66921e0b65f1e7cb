"""training/loss: class weights from the train split; label smoothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.training.loss import build_criterion, class_weights


def test_class_weights_favour_rare_classes():
    labels = np.array([0] * 80 + [1] * 20)
    assert class_weights(labels, 2, "none") is None
    inverse = class_weights(labels, 2, "inverse")
    torch.testing.assert_close(inverse, torch.tensor([0.4, 1.6]))  # 1/count, mean 1
    effective = class_weights(labels, 2, "effective")
    assert effective.mean().item() == pytest.approx(1.0) and 1.0 < effective[1] / effective[0] < 4.0


def test_label_smoothing_raises_the_loss_of_a_confident_correct_prediction_to_the_closed_form():
    logits, target, eps = torch.tensor([[6.0, 0.0, -2.0]]), torch.tensor([0]), 0.1
    log_p = torch.log_softmax(logits, 1)[0]
    plain = build_criterion(None, 0.0)(logits, target).item()
    smoothed = build_criterion(None, eps)(logits, target).item()
    # The target is (1 - eps) on the class plus eps / K on every class.
    assert plain == pytest.approx(-log_p[0].item())
    assert smoothed == pytest.approx(-((1 - eps) * log_p[0] + eps / 3 * log_p.sum()).item())
    assert smoothed > plain
    soft = torch.tensor([[0.7, 0.3, 0.0]])  # MixUp/CutMix targets are smoothed the same way
    expected = -(((1 - eps) * soft + eps / 3) * log_p).sum().item()
    assert build_criterion(None, eps)(logits, soft).item() == pytest.approx(expected)
