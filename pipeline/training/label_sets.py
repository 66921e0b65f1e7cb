"""Training figures for label sets (`base.task: multilabel`): targets are (B, K) multi-hot (or, mixed by
MixUp/CutMix, soft) and each label is its own yes/no question, answered yes at logit > 0 (probability 0.5).

- accuracy: the share of (image, label) answers that are right (1 - Hamming loss);
- f1: the macro F1 over the labels at 0.5;
- map: the macro average precision over the labels that have a positive, from per-label histograms of the
  logits (_BINS bins of 1/64 over [-16, 16]: ties within a bin count as one threshold), so the ranks sum over
  batches and DDP processes in K x _BINS counts, however many images.

The evaluate stage reports exact figures; these pick the epoch and stop early.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.training.distributed import Dist, all_sum

_BINS, _LIMIT = 2048, 16.0


def correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The right answers of a batch, in images: per image, the share of its labels answered right."""
    return ((logits > 0) == (targets > 0.5)).double().mean(dim=1).sum()


class Figures:
    """Sums over a validation pass: the BCE loss, counts at 0.5 and the logits' histograms per label."""

    def __init__(self, num_labels: int, device: torch.device):
        self.loss = torch.zeros(1, dtype=torch.float64, device=device)
        self.counts = torch.zeros(4, num_labels, dtype=torch.float64, device=device)  # tp, fp, fn, right
        self.histograms = torch.zeros(2, num_labels * _BINS, dtype=torch.int64, device=device)  # neg, pos
        self.images = torch.zeros(1, dtype=torch.float64, device=device)
        self.num_labels = num_labels

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        truth, said = targets > 0.5, logits > 0
        self.loss += nn.functional.binary_cross_entropy_with_logits(logits, targets.float(), reduction="sum")
        self.counts += torch.stack(
            [(truth & said).sum(0), (~truth & said).sum(0), (truth & ~said).sum(0), (truth == said).sum(0)]
        ).double()
        binned = ((logits.clamp(-_LIMIT, _LIMIT) + _LIMIT) * (_BINS / (2 * _LIMIT))).long()
        cells = binned.clamp(max=_BINS - 1) + torch.arange(self.num_labels, device=logits.device) * _BINS
        for side in (0, 1):
            chosen = cells[truth] if side else cells[~truth]
            self.histograms[side] += torch.bincount(chosen, minlength=self.num_labels * _BINS)
        self.images += len(targets)

    def result(self, env: Dist) -> dict[str, float]:
        """{loss (mean over images and labels), acc, f1, map}, summed over every process."""
        loss, counts = all_sum(env, self.loss).cpu(), all_sum(env, self.counts).cpu()
        histograms, images = all_sum(env, self.histograms).cpu(), all_sum(env, self.images).cpu().item()
        tp, fp, fn, right = counts
        f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
        return {
            "loss": loss.item() / max(images * self.num_labels, 1),
            "acc": right.sum().item() / max(images * self.num_labels, 1),
            "f1": f1.mean().item(),
            "map": mean_average_precision(histograms.view(2, self.num_labels, _BINS)),
        }


def mean_average_precision(histograms: torch.Tensor) -> float:
    """Macro AP from (2, K, bins) counts of negatives and positives per score bin, over the labels with a
    positive: each bin, highest first, is a threshold; AP = sum of (its positives / all positives) x the
    precision at it."""
    negatives, positives = histograms.double().flip(-1)  # highest scores first
    tp, fp = positives.cumsum(-1), negatives.cumsum(-1)
    precision = tp / (tp + fp).clamp(min=1)
    total = positives.sum(-1)
    ap = (positives * precision).sum(-1) / total.clamp(min=1)
    present = total > 0
    return ap[present].mean().item() if present.any() else 0.0
