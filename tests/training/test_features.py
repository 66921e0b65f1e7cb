"""training/features: the BatchNorm-folded inference copy of the backbone."""

from __future__ import annotations

import torch
from torch import nn


def test_inference_copy_folds_every_batchnorm_and_keeps_the_features():
    import timm

    from pipeline.training.features import inference_copy

    torch.manual_seed(0)
    backbone = timm.create_model("test_efficientnet", num_classes=0)
    with torch.no_grad():  # non-trivial statistics, as after pretraining
        for module in backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    backbone.eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        folded = inference_copy(backbone, images[:2])
        assert folded is not backbone
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        assert any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())  # the original is untouched
        torch.testing.assert_close(folded(images), backbone(images), rtol=1e-4, atol=1e-5)


def test_inference_copy_falls_back_when_neighbouring_children_are_not_conv_then_norm():
    from pipeline.training.features import inference_copy

    class NormBeforeConv(nn.Module):  # bn is declared after conv but applied before it
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(self.bn(x))

    torch.manual_seed(0)
    backbone = NormBeforeConv()
    with torch.no_grad():
        backbone.bn.running_mean.uniform_(-1, 1)
        backbone.bn.running_var.uniform_(0.2, 3.0)
    backbone.eval()
    with torch.no_grad():
        assert inference_copy(backbone, torch.randn(2, 3, 8, 8)) is backbone
