"""Quantization-aware fine-tuning: the grid it trains on is the one ONNX Runtime stores, and it brings the
quantized copy closer to FP32."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from pipeline.config import QuantizeParams
from pipeline.models import TrainedModel
from pipeline.serving import onnx_runtime as rt
from pipeline.stages.quantize import int8
from pipeline.stages.quantize.qat import Tuner, batchnorm_folds, with_weight_grid, without_weight_grid

SIZE = 16


class _Net(nn.Module):
    """A convolution, a depthwise one and a linear head, each convolution followed by a BatchNorm with
    statistics far from the identity (so folding changes the weights the quantizer sees)."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self._build()
        self.eval()

    def _build(self):
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn_dw = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for bn in (self.bn, self.bn_dw):
                bn.weight.copy_(torch.rand(8, generator=generator) * 3 + 0.2)
                bn.bias.copy_(torch.randn(8, generator=generator))
                bn.running_mean.copy_(torch.randn(8, generator=generator))
                bn.running_var.copy_(torch.rand(8, generator=generator) * 4 + 0.1)
            self.fc.weight.mul_(20)  # confident answers, so rounding moves the softmax measurably

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.bn_dw(self.dw(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, 3, SIZE, SIZE)).astype(np.float32)


def test_folds_pair_each_convolution_with_the_batchnorm_that_reads_its_output():
    net = _Net()
    folds = batchnorm_folds(net, torch.zeros(1, 3, SIZE, SIZE))
    assert set(folds) == {"conv", "dw"}  # the head reads no BatchNorm
    expected = net.bn.weight / torch.sqrt(net.bn.running_var + net.bn.eps)
    assert torch.allclose(folds["conv"], expected)


@pytest.mark.parametrize("fmt", ["u8s8_portable", "u8s8"])
def test_the_grid_is_the_one_onnx_runtime_stores(tmp_path, fmt):
    """The exported model's folded weights, quantized by ORT in `fmt`, are the grid's values: the same
    integers (7 bits in the portable format's convolution and head, 8 in its depthwise one) and scales."""
    net = _Net()
    fp32 = rt.export_onnx(net, tmp_path / "fp32.onnx", (3, SIZE, SIZE), 18)
    prepared = int8.prepare(fp32, tmp_path / "prepared.onnx", [])
    quantized = int8.quantize_onnx(prepared, tmp_path / "int8.onnx", _images(8), fmt, QuantizeParams())
    stored = _stored_weights(onnx.load(str(quantized)))

    gridded = with_weight_grid(copy.deepcopy(net), fmt, torch.zeros(1, 3, SIZE, SIZE))
    folds = batchnorm_folds(net, torch.zeros(1, 3, SIZE, SIZE))
    levels = {
        "conv": 64 if fmt == "u8s8_portable" else 127,
        "dw": 127,
        "fc": 64 if fmt == "u8s8_portable" else 127,
    }
    for name, module in (("conv", gridded.conv), ("dw", gridded.dw), ("fc", gridded.fc)):
        fold = folds.get(name, torch.ones(module.weight.shape[0])).view(-1, *[1] * (module.weight.dim() - 1))
        on_grid = (
            (module.weight * fold).detach().numpy()
        )  # the parametrized weight, folded as the exporter does
        integers, scale = stored[on_grid.shape]
        assert np.abs(integers).max() == levels[name], name  # each channel's largest weight at the edge
        assert np.allclose(integers * scale, on_grid, rtol=1e-5, atol=1e-7), name


def _stored_weights(model: onnx.ModelProto) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """Each INT8 weight of a QDQ model by its shape: its integers and per-channel scales (broadcastable)."""
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    stored = {}
    for node in model.graph.node:
        if (
            node.op_type == "DequantizeLinear"
            and node.input[0] in values
            and values[node.input[0]].dtype == np.int8
        ):
            integers, scale = values[node.input[0]].astype(np.int64), values[node.input[1]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * integers.ndim
            shape[axis] = -1
            stored[integers.shape] = (integers, scale.reshape(shape))
    return stored


def test_fine_tuning_brings_the_gridded_copy_closer_to_fp32_and_leaves_the_model_alone(single_thread):
    net = _Net()
    before_state = {k: v.clone() for k, v in net.state_dict().items()}
    trained = TrainedModel(net, ["a", "b", "c", "d"], {"input_size": (3, SIZE, SIZE)}, {})
    q = QuantizeParams(qat_epochs=20, qat_lr=1e-4)
    tuner = Tuner(trained, _images(64), False, q, seed=0, opset=18)
    student, figures = tuner.fine_tune("u8s8_portable")
    assert figures["distance_after"] < 0.5 * figures["distance_before"], figures
    assert figures["images"] == 64 and figures["epochs"] == 20
    assert not any(isinstance(m, nn.utils.parametrize.ParametrizationList) for m in student.modules())
    assert not torch.equal(student.conv.weight, net.conv.weight)  # tuned ...
    assert torch.equal(student.bn.weight, net.bn.weight)  # ... but not the scale folded into the grid
    assert all(torch.equal(v, before_state[k]) for k, v in net.state_dict().items())  # FP32 untouched
    # The tuned copy, back on the grid, is as far from FP32 as the tuning said.
    regridded = with_weight_grid(copy.deepcopy(student), "u8s8_portable", tuner.images[:1])
    assert tuner.distance(regridded) == pytest.approx(figures["distance_after"], rel=1e-4)


@pytest.mark.parametrize("multilabel", [False, True])
def test_the_distance_of_fp32_from_itself_is_zero(multilabel):
    net = _Net()
    trained = TrainedModel(net, ["a", "b", "c", "d"], {"input_size": (3, SIZE, SIZE)}, {})
    tuner = Tuner(trained, _images(16), multilabel, QuantizeParams(), seed=0, opset=18)
    assert tuner.distance(net) == pytest.approx(0.0, abs=1e-6)
    assert tuner.distance(with_weight_grid(copy.deepcopy(net), "u8s8_reduce_range", tuner.images[:1])) > 0
    restored = without_weight_grid(with_weight_grid(copy.deepcopy(net), "u8s8", tuner.images[:1]))
    assert torch.equal(restored.conv.weight, net.conv.weight)  # off the grid again: the weights themselves
