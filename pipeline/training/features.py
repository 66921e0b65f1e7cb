"""Pooled backbone features of every image, computed once (eval transform, no augmentation) so head-only
epochs train a linear layer on (N, C) tensors instead of running the backbone: orders of magnitude faster.

Features are also cached on disk, keyed by the image cache, a digest of the backbone's weights and the numeric
settings, so experiments that change only head/optimizer params skip the backbone entirely.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.data.loader import CachedImages, EpochSampler
from pipeline.io import atomic_path
from pipeline.training.distributed import Dist, barrier
from pipeline.training.precision import Precision

log = logging.getLogger(__name__)


def backbone_features(
    backbone: nn.Module,
    images: CachedImages,
    batch_size: int,
    precision: Precision,
    channels_last: bool,
    cache_dir: Path,
    env: Dist,
) -> torch.Tensor:
    """(N, C) float32 CPU features of `images` (built by one process per machine, read by the others)."""
    target = Path(cache_dir) / f"features-{_key(backbone, images, precision, channels_last)}.pt"
    if env.is_local_main and not target.is_file():
        features = _compute(backbone, images, batch_size, precision, channels_last)
        with atomic_path(target) as tmp:
            torch.save({"features": features}, tmp)
        barrier(env)
        return features
    barrier(env)
    log.info("features: reusing %s", target)
    return torch.load(target, map_location="cpu", weights_only=True)["features"]


@torch.no_grad()
def _compute(
    backbone: nn.Module, images: CachedImages, batch_size: int, precision: Precision, channels_last: bool
) -> torch.Tensor:
    was_training = backbone.training
    backbone.eval()
    # Its own generator: computing (rather than loading) features must not advance the global RNG.
    sampler = EpochSampler(images.labels, 0, shuffle=False)
    loader = DataLoader(
        images, batch_size=batch_size, sampler=sampler, generator=torch.Generator().manual_seed(0)
    )
    chunks = []
    for batch, _ in loader:
        batch = batch.to(precision.device, non_blocking=True)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            chunks.append(backbone(batch).float().cpu())
    backbone.train(was_training)
    return torch.cat(chunks)


def _key(backbone: nn.Module, images: CachedImages, precision: Precision, channels_last: bool) -> str:
    # The transform's repr carries the crop size and normalisation; the state digest the exact weights.
    digest = hashlib.sha256(
        f"{images.cache_file.name}|{images.transform!r}|{precision.name}|{channels_last}".encode()
    )
    for name, tensor in backbone.state_dict().items():
        digest.update(name.encode() + tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]
