"""Quantization-aware fine-tuning: a copy of the model learns weights that survive the format's rounding.

Post-training quantization rounds each weight to its format's grid once; the 7-bit grid of the portable
format costs most of the agreement it loses (on the Oxygen icons u8s8, 8 bits, agreed with FP32 on 98.8% of
val+test, u8s8_portable 97.2%). Here a copy of the trained model is fine-tuned for a few epochs on train
images with each weight rounded in the forward pass exactly as ONNX Runtime's quantizer will store it, its
gradient passed straight through (Bengio et al. 2013), and FP32's own logits as the target (distillation: the
goal is agreement with FP32, not new accuracy). That copy is exported and quantized as usual; FP32 stays the
model the candidate is judged against.

The grid is ORT's: the exporter folds each BatchNorm into the convolution before it, so the rounded weight is
the folded one, W x gamma / sqrt(var + eps), per output channel, symmetric, scale max|W| / 127 (8 bits) or
/ 64 (7 bits: ORT's reduce_range, the range [-64, 64]). Activations are left to calibration as before.
BatchNorm stays in eval mode (its statistics are what gets folded), so any batch size trains the same model.

Cost: `qat_epochs` passes over `qat_images` images, forward and backward through the whole network (about
20 s an epoch of 512 images at 160 px with lite0 on 2 cores); it does not grow with the data set.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from pipeline.config import QuantizeParams
from pipeline.models import TrainedModel
from pipeline.serving import onnx_runtime as rt
from pipeline.stages.quantize.int8 import FORMATS, prepare

log = logging.getLogger(__name__)

_BATCH = 32
_SEVEN_BIT, _EIGHT_BIT = 64, 127  # ORT's symmetric int8 range: [-64, 64] with reduce_range, else [-127, 127]


class Tuner:
    """Fine-tunes a copy of the `trained` model per format on `images` (preprocessed train images, NCHW
    float32) against the model's own logits, and gives the copy as a prepared FP32 ONNX model (exported with
    `opset`) for the quantizer."""

    def __init__(
        self,
        trained: TrainedModel,
        images: np.ndarray,
        multilabel: bool,
        q: QuantizeParams,
        seed: int,
        opset: int,
    ):
        self.model, self.input_size = trained.model.eval(), trained.data_config["input_size"]
        self.multilabel, self.q, self.seed, self.opset = multilabel, q, seed, opset
        self.images = torch.from_numpy(images)
        with torch.no_grad():  # not inference_mode: the loss saves its target for backward
            self.teacher = torch.cat([self.model(batch) for batch in self.images.split(_BATCH)])

    def prepared(self, fmt: str, folder: Path) -> tuple[Path, dict]:
        """The fine-tuned copy for `fmt`, exported and prepared in `folder`, and what the tuning measured."""
        student, figures = self.fine_tune(fmt)
        exported = rt.export_onnx(student, folder / f"{fmt}.qat.onnx", self.input_size, self.opset)
        return prepare(exported, folder / f"{fmt}.qat.prepared.onnx", self.q.exclude_nodes), figures

    def fine_tune(self, fmt: str) -> tuple[nn.Module, dict]:
        """A copy of the model tuned for `fmt`'s weight grid (plain weights again: the grid is the
        quantizer's to apply), and its distance from FP32 on the images before and after."""
        started = time.perf_counter()
        order = torch.Generator().manual_seed(self.seed)  # the batches' order; nothing else here is random
        student = with_weight_grid(copy.deepcopy(self.model), fmt, self.images[:1])
        optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=self.q.qat_lr)
        steps = self.q.qat_epochs * -(-len(self.images) // _BATCH)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
        before = self.distance(student)
        for _ in range(self.q.qat_epochs):
            for batch in torch.randperm(len(self.images), generator=order).split(_BATCH):
                loss = self._loss(student(self.images[batch]), self.teacher[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        after = self.distance(student)
        figures = {
            "images": len(self.images),
            "epochs": self.q.qat_epochs,
            "lr": self.q.qat_lr,
            "distance_before": before,
            "distance_after": after,
            "seconds": round(time.perf_counter() - started, 2),
        }
        log.info("QAT for %s: %d images x %d epochs, distance from FP32 %.4g -> %.4g (%.0f s)", fmt,
                 len(self.images), self.q.qat_epochs, before, after, figures["seconds"])  # fmt: skip
        return without_weight_grid(student), figures

    def distance(self, student: nn.Module) -> float:
        """Mean distillation loss of `student` (weights on the grid) from FP32 over the images."""
        with torch.no_grad():
            total = sum(
                self._loss(student(images), teacher).item() * len(images)
                for images, teacher in zip(self.images.split(_BATCH), self.teacher.split(_BATCH), strict=True)
            )
        return total / len(self.images)

    def _loss(self, logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """KL(FP32 || student) of the softmaxes; for label sets, each label's sigmoid (binary cross-entropy to
        FP32's probabilities, minus its entropy, so that a perfect copy scores 0)."""
        if self.multilabel:
            target = torch.sigmoid(teacher)
            return nn.functional.binary_cross_entropy_with_logits(
                logits, target
            ) - nn.functional.binary_cross_entropy_with_logits(teacher, target)
        return nn.functional.kl_div(
            nn.functional.log_softmax(logits, dim=1),
            nn.functional.log_softmax(teacher, dim=1),
            reduction="batchmean",
            log_target=True,
        )


class WeightGrid(nn.Module):
    """A weight parametrization: the weight folded with its BatchNorm's per-channel factor `fold`, rounded
    to the symmetric per-output-channel grid of `levels` steps a side, unfolded again; gradients pass
    straight through the rounding."""

    def __init__(self, fold: torch.Tensor, levels: int):
        super().__init__()
        self.register_buffer("fold", fold)
        self.levels = levels

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        fold = self.fold.view(-1, *[1] * (weight.dim() - 1))
        folded = weight * fold
        scale = grid_scale(folded.detach(), self.levels)
        rounded = torch.clamp(torch.round(folded / scale), -self.levels, self.levels) * scale
        return (folded + (rounded - folded).detach()) / fold


def grid_scale(folded: torch.Tensor, levels: int) -> torch.Tensor:
    """ORT's symmetric per-channel scale: the channel's largest |weight| over `levels` (axis 0 is output)."""
    largest = folded.abs().amax(dim=tuple(range(1, folded.dim())), keepdim=True)
    return torch.clamp(largest, min=torch.finfo(torch.float32).tiny) / levels


def with_weight_grid(model: nn.Module, fmt: str, example: torch.Tensor) -> nn.Module:
    """`model` (eval mode) with each Conv2d and Linear weight on `fmt`'s grid: 7 bits where the format
    gives that node 7-bit weights (`int8.Format.seven_bit`: all, or every node but depthwise ones), else 8;
    each BatchNorm's scale frozen."""
    seven_bit = FORMATS[fmt].seven_bit
    folds = batchnorm_folds(model, example)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            seven = seven_bit == "all" or (seven_bit == "gemm" and not _depthwise(module))
            fold = folds.get(name, torch.ones(module.weight.shape[0]))
            fold = torch.where(fold.abs() < 1e-12, torch.full_like(fold, 1e-12), fold)  # a dead channel
            grid = WeightGrid(fold, _SEVEN_BIT if seven else _EIGHT_BIT)
            parametrize.register_parametrization(module, "weight", grid)
        elif isinstance(module, nn.BatchNorm2d) and module.affine:
            module.weight.requires_grad_(False)  # its scale is folded into the weights the grid rounds
    return model.eval()


def without_weight_grid(model: nn.Module) -> nn.Module:
    """The tuned weights as plain parameters (off the grid: ORT rounds them again to the same values)."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    return model.eval()


def batchnorm_folds(model: nn.Module, example: torch.Tensor) -> dict[str, torch.Tensor]:
    """For each convolution whose output goes straight into a BatchNorm (seen in one forward pass of
    `example`: the BatchNorm's input is the convolution's output tensor), that BatchNorm's per-channel factor
    gamma / sqrt(running_var + eps), by which the exporter scales the convolution's weights."""
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # tensors kept alive, so no id is reused in the pass
    folds: dict[str, torch.Tensor] = {}

    def produced(name):
        return lambda module, args, output: outputs.__setitem__(id(output), (name, output))

    def consumed(module, args):
        name, tensor = outputs.get(id(args[0]), (None, None))
        if tensor is args[0]:
            gamma = module.weight.detach() if module.affine else torch.ones_like(module.running_var)
            folds[name] = gamma / torch.sqrt(module.running_var + module.eps)

    hooks = [
        module.register_forward_hook(produced(name))
        if isinstance(module, nn.Conv2d)
        else module.register_forward_pre_hook(consumed)
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.BatchNorm2d)
    ]
    try:
        with torch.no_grad():  # the factors become buffers of a model that trains: no inference tensors
            model.eval()(example)
    finally:
        for hook in hooks:
            hook.remove()
    return folds


def _depthwise(module: nn.Module) -> bool:
    """One input channel per group and one group per output channel, as `int8._depthwise` reads a Conv."""
    return (
        isinstance(module, nn.Conv2d)
        and module.groups > 1
        and module.out_channels == module.groups
        and module.weight.shape[1] == 1
    )
