"""Training objective: cross-entropy with label smoothing and optional class weights from the train split;
knowledge distillation from a trained teacher on top of it. Label sets (`base.task: multilabel`): binary
cross-entropy or Asymmetric Loss per label (`MultiLabelLoss`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.config import DistillParams
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

# Cui et al., "Class-Balanced Loss Based on Effective Number of Samples" (CVPR 2019): their usual beta.
EFFECTIVE_NUMBER_BETA = 0.999

_WEIGHTS: dict[str, Callable[[np.ndarray], np.ndarray | None]] = {
    "none": lambda counts: None,
    "inverse": lambda counts: 1.0 / counts,
    "effective": lambda counts: (1.0 - EFFECTIVE_NUMBER_BETA) / (1.0 - EFFECTIVE_NUMBER_BETA**counts),
}


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> torch.Tensor | None:
    """Per-class loss weights (mean 1 over classes) from the train labels; None for `none`."""
    counts = np.maximum(np.bincount(labels, minlength=num_classes), 1).astype(np.float64)
    weights = _WEIGHTS[mode](counts)
    if weights is None:
        return None
    return torch.as_tensor(weights * num_classes / weights.sum(), dtype=torch.float32)


def positive_weights(targets: np.ndarray, mode: str) -> torch.Tensor | None:
    """A multilabel task's weight on each label's positive term (BCE's `pos_weight`) from the (N, K) train
    targets: `inverse` = its negatives / positives (a rare label's few positives weigh as much as its many
    negatives); None for `none`. `effective` has no per-label meaning here and is refused by `prepare`."""
    if mode == "none":
        return None
    positives = np.maximum(targets.sum(axis=0), 1.0)
    return torch.as_tensor((len(targets) - positives).clip(min=1.0) / positives, dtype=torch.float32)


class MultiLabelLoss(nn.Module):
    """Binary cross-entropy per label (mean over images and labels), or Asymmetric Loss (Ridnik et al.,
    ICCV 2021: easy negatives down-weighted by (p)^gamma_neg, timm's implementation with its defaults), on
    multi-hot or soft (mixed) targets; label smoothing pulls each target towards 0.5 by `smoothing` / 2."""

    def __init__(self, kind: str, pos_weight: torch.Tensor | None, smoothing: float):
        super().__init__()
        self.smoothing = smoothing
        if kind == "asl":
            from timm.loss import AsymmetricLossMultiLabel

            self.loss = AsymmetricLossMultiLabel(smoothing=smoothing, pos_weight=pos_weight, reduction="mean")
            self.smoothing = 0.0  # applied inside
        else:
            self.loss = nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.float()
        if self.smoothing:
            targets = targets * (1.0 - self.smoothing) + 0.5 * self.smoothing
        return self.loss(logits, targets)


def build_criterion(weights: torch.Tensor | None, label_smoothing: float) -> nn.Module:
    """Accepts class indices (B,) or soft targets (B, K) from MixUp/CutMix."""
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)


class DistillationLoss(nn.Module):
    """Hinton et al. (2015): (1 - alpha) x `criterion` on the labels + alpha x T^2 x KL(teacher || student)
    on the logits softened by temperature T (T^2 keeps the soft term's gradients the size of the hard one's).

    Called as loss(logits, target, teacher_logits); without teacher logits it is `criterion` alone.
    """

    def __init__(self, criterion: nn.Module, alpha: float, temperature: float):
        super().__init__()
        self.criterion, self.alpha, self.temperature = criterion, alpha, temperature

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, teacher_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        hard = self.criterion(logits, target)
        if teacher_logits is None:
            return hard
        t = self.temperature
        soft = nn.functional.kl_div(
            nn.functional.log_softmax(logits / t, dim=1),
            nn.functional.log_softmax(teacher_logits.float() / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        return (1.0 - self.alpha) * hard + self.alpha * t * t * soft


class Teacher(nn.Module):
    """A trained model of this pipeline run on the student's batches: the student's augmented, normalised
    images (B, 3, S, S) are un-normalised, resized to the teacher's input size and normalised its way.
    Frozen and in eval mode; (B, 3, S, S) -> (B, K) logits."""

    def __init__(self, model: nn.Module, student_config: dict, teacher_config: dict):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.size = tuple(teacher_config["input_size"][1:])
        self.same = _geometry(student_config) == _geometry(teacher_config)
        for name, config in (("student", student_config), ("teacher", teacher_config)):
            for stat in ("mean", "std"):
                value = torch.tensor(config[stat], dtype=torch.float32).view(1, 3, 1, 1)
                self.register_buffer(f"{name}_{stat}", value, persistent=False)

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # BatchNorm and dropout stay in eval mode whatever the student does

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.same:
            pixels = images.float() * self.student_std + self.student_mean
            if tuple(pixels.shape[-2:]) != self.size:
                pixels = nn.functional.interpolate(pixels, self.size, mode="bilinear", antialias=True)
            images = ((pixels - self.teacher_mean) / self.teacher_std).to(images.dtype)
        return self.model(images)


def _geometry(config: dict) -> tuple:
    return tuple(config["input_size"]), tuple(config["mean"]), tuple(config["std"])


def with_teacher(
    criterion: nn.Module,
    distill: DistillParams,
    champion_model: Path,
    class_names: list[str],
    data_config: dict,
) -> tuple[nn.Module, Teacher | None]:
    """`criterion` and no teacher when `train.distill.teacher` is none; else the distillation loss around it
    and the teacher (a model.pt of this pipeline, or the champion's at `champion_model`), which must know the
    same classes."""
    from pipeline.models import load_trained

    if distill.teacher == "none":
        return criterion, None
    path = champion_model if distill.teacher == "champion" else Path(distill.teacher)
    if not path.is_file():
        raise PipelineError(
            f"train.distill.teacher: {path} not found; give a trained model.pt, `champion` once a model has "
            "been promoted, or none"
        )
    trained = load_trained(path)
    if trained.class_names != list(class_names):
        raise PipelineError(
            f"train.distill.teacher: {path} knows the classes {trained.class_names[:6]}, not this split's "
            f"{list(class_names)[:6]} (same names, same order); train the teacher on the same data"
        )
    teacher = Teacher(trained.model, data_config, trained.data_config)
    side = trained.data_config["input_size"][-1]
    log.info(
        "train: distilling from %s (%d px; alpha %g, temperature %g) in the image epochs",
        path, side, distill.alpha, distill.temperature,
    )  # fmt: skip
    return DistillationLoss(criterion, distill.alpha, distill.temperature), teacher
