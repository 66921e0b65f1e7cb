"""training/loss: class weights from the train split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.training.loss import class_weights


def test_class_weights_favour_rare_classes():
    labels = np.array([0] * 80 + [1] * 20)
    assert class_weights(labels, 2, "none") is None
    inverse = class_weights(labels, 2, "inverse")
    torch.testing.assert_close(inverse, torch.tensor([0.4, 1.6]))  # 1/count, mean 1
    effective = class_weights(labels, 2, "effective")
    assert effective.mean().item() == pytest.approx(1.0) and 1.0 < effective[1] / effective[0] < 4.0
