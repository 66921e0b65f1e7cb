"""Backbone families beyond lite0: bundled lite0/1/2, and ResNet, EfficientNet-B0, MobileNetV3 and a ViT
from `model.weights: file:` in torchvision's or timm's naming; each trains a step, exports and quantizes."""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import pytest
import timm
import torch
import torchvision

from pipeline.config import ModelParams, QuantizeParams, TrainParams
from pipeline.models import build_model
from pipeline.models.weights import BUNDLED_CHECKPOINTS
from pipeline.serving import onnx_runtime as rt
from pipeline.stages.quantize.int8 import prepare, quantize_onnx
from pipeline.training.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("single_thread")
SIZE = 32

# timm name -> the torchvision builder whose state dict (torchvision naming) must load into it, or None for
# a state dict saved from timm itself (at timm's pretrained size: a ViT's position embeddings are resampled).
FAMILIES = {
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
    "efficientnet_b0": torchvision.models.efficientnet_b0,
    "mobilenetv3_large_100": torchvision.models.mobilenet_v3_large,
    "vit_tiny_patch16_224": None,
}
HEAVY = {"resnet50"}


def _family_params(name: str) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in name]


def _donor(name: str) -> torch.nn.Module:
    """A random-weight network whose state dict is the `file:` weights: BatchNorm statistics randomised
    too, so a wrongly paired tensor shows in the outputs."""
    torch.manual_seed(0)
    donor = FAMILIES[name](weights=None) if FAMILIES[name] else timm.create_model(name, num_classes=1000)
    for module in donor.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return donor.eval()


@pytest.fixture(scope="module", params=_family_params(list(FAMILIES)))
def family(request, tmp_path_factory):
    """(name, donor network, our model built from the donor's saved state dict with 3 classes)."""
    name, donor = request.param, _donor(request.param)
    path = tmp_path_factory.mktemp(name) / "weights.pth"
    torch.save(donor.state_dict(), path)
    params = ModelParams(backbone=name, weights=f"file:{path}", image_size=SIZE, head="mlp", head_hidden=16)
    return name, donor, build_model(params, num_classes=3)


def test_file_weights_in_either_naming_reproduce_the_donors_features(family):
    name, donor, model = family
    x = torch.randn(2, 3, SIZE, SIZE)
    model.eval()
    with torch.inference_mode():
        ours = model.forward_features(x)
        if FAMILIES[name] is None:  # timm naming, built at 224 px: compare a weight, not the outputs
            qkv = model.backbone.blocks[0].attn.qkv.weight
            torch.testing.assert_close(qkv, donor.blocks[0].attn.qkv.weight)
            assert model.backbone.pos_embed.shape[1] == (SIZE // 16) ** 2 + 1  # resampled to a 2 x 2 grid
            return
        # The pooled features: torchvision's MobileNetV3 keeps its Linear + Hardswish (timm's head conv).
        head = donor.classifier[:2] if name.startswith("mobilenetv3") else torch.nn.Identity()
        donor.fc = donor.classifier = head
        theirs = donor(x)
    # MobileNetV3: torchvision's BatchNorm eps is 1e-3, timm's 1e-5; all else is exact.
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4)


def test_one_training_step_moves_backbone_and_head(family):
    _, _, model = family
    model.train()
    optimizer = build_optimizer(model, TrainParams(lr=1e-2))
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, SIZE, SIZE)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    moved = [not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True)]
    assert all(moved[:2]) and all(moved[-2:]), "the stem and the head must both train"


def test_export_and_int8_quantization_follow_pytorch(family, tmp_path):
    name, _, model = family
    model.eval()
    fp32 = rt.export_onnx(model, tmp_path / "model.onnx", [3, SIZE, SIZE], opset=18)
    ops = {node.op_type for node in onnx.load(str(fp32)).graph.node}
    if name.startswith("resnet"):
        assert "BatchNormalization" not in ops  # folded into the convolutions
    if name.startswith("vit"):
        assert {"LayerNormalization", "Softmax", "MatMul"} <= ops  # attention through ONNX as is
    inputs = np.random.default_rng(0).standard_normal((8, 3, SIZE, SIZE)).astype(np.float32)
    with torch.inference_mode():
        reference = model(torch.from_numpy(inputs)).numpy()
    np.testing.assert_allclose(rt.logits(rt.session(fp32), inputs), reference, rtol=1e-3, atol=1e-4)

    q = QuantizeParams(calibration_images=8)
    prepared = prepare(fp32, tmp_path / "prepared.onnx", [])
    int8 = quantize_onnx(prepared, tmp_path / "model.int8.onnx", inputs, "u8s8_reduce_range", q)
    quantized = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert "DequantizeLinear" in quantized and rt.file_mb(int8) < rt.file_mb(fp32) / 2
    int8_logits = rt.logits(rt.session(int8), inputs)
    # A random head's logits are small: INT8 must track them, not match them.
    assert np.corrcoef(int8_logits.ravel(), reference.ravel())[0, 1] > 0.9


@pytest.mark.parametrize("backbone", sorted(BUNDLED_CHECKPOINTS))
def test_bundled_lite_weights_are_the_packages_own(backbone):
    module, locator = BUNDLED_CHECKPOINTS[backbone]
    raw = torch.load(
        getattr(importlib.import_module(module), locator).get_model_file_path(), weights_only=True
    )
    model = build_model(ModelParams(backbone=backbone, image_size=SIZE), num_classes=3)
    torch.testing.assert_close(model.backbone.conv_stem.weight, raw["_conv_stem.weight"])
    torch.testing.assert_close(model.backbone.conv_head.weight, raw["_conv_head.weight"])
    assert model.eval()(torch.zeros(1, 3, SIZE, SIZE)).shape == (1, 3)
