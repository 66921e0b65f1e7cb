"""Pooled backbone features of every image, computed once (eval transform, no augmentation) so head-only
epochs train a linear layer on (N, C) tensors instead of running the backbone: orders of magnitude faster.

Features are also cached on disk by content: one folder per setting (a digest of the backbone's weights, the
transform, the numeric settings and what computed them: CPU or GPU model, precision) holds the features of
every image ever embedded with it, each keyed by a digest of its cached pixels. So experiments that change
only head/optimizer params skip the backbone entirely, and any image set (the audit's usable images, train's
split) reuses what another set already embedded.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.data import DataLoader

from pipeline.config import FeaturesParams
from pipeline.data.cache import open_cache
from pipeline.data.loader import CachedImages
from pipeline.io import atomic_path
from pipeline.progress import progress
from pipeline.training.distributed import Dist, barrier
from pipeline.training.precision import Precision, device_tag, resolve_device, resolve_precision

log = logging.getLogger(__name__)


def feature_pass(params: FeaturesParams, env: Dist) -> tuple[int, Precision, bool]:
    """The `features` section resolved on this machine: batch size, precision on its device, channels_last.
    Batch size None: 16 on CPU (bigger batches are slower there, see `resolve_eval_batch_size`), 64 on GPU."""
    device = resolve_device(params.device, env.local_rank, env.world_size)
    batch_size = params.batch_size or (16 if device.type == "cpu" else 64)
    return batch_size, resolve_precision(params.precision, device), params.channels_last


def backbone_features(
    backbone: nn.Module,
    image_sets: Sequence[CachedImages],
    batch_size: int,
    precision: Precision,
    channels_last: bool,
    cache_dir: Path,
    env: Dist,
) -> list[torch.Tensor]:
    """(N, C) float32 CPU features of each image set (built by one process per machine, read by the others).
    One call for all sets: the weights are digested and the backbone folded once; only images whose content
    is not in the store yet run through the backbone."""
    weights = _weights_digest(backbone)
    settings = (precision.name, channels_last, device_tag(precision.device))
    stores = [
        Path(cache_dir) / f"features-{features_key(images, weights, *settings)}" for images in image_sets
    ]
    contents = [_contents(images) for images in image_sets]
    loaded: dict[Path, dict[str, torch.Tensor]] = {}  # each store read once (train and val share one)

    def rows(store: Path) -> dict[str, torch.Tensor]:
        if store not in loaded:
            loaded[store] = _load_store(store)
        return loaded[store]

    if env.is_local_main:
        network = None
        for n, (images, store, digests) in enumerate(zip(image_sets, stores, contents, strict=True), 1):
            missing = _missing(rows(store), digests)
            if missing:
                desc = f"backbone features {n}/{len(image_sets)}"
                computed, network = _compute(
                    backbone, network, images, batch_size, precision, channels_last, desc, missing
                )
                added = [digests[i] for i in missing]
                _add_to_store(store, added, computed)
                rows(store).update(zip(added, computed, strict=True))
    barrier(env)
    return [_from_store(rows(store), digests, store) for store, digests in zip(stores, contents, strict=True)]


def _contents(images: CachedImages) -> list[str]:
    """A digest of each image's cached pixels: the same picture has the same digest in any image set."""
    array = open_cache(images.cache_file)
    return [hashlib.blake2b(array[i].tobytes(), digest_size=16).hexdigest() for i in range(len(array))]


def _load_store(store: Path) -> dict[str, torch.Tensor]:
    """Content digest -> feature row, over every shard in the store."""
    rows: dict[str, torch.Tensor] = {}
    for shard in sorted(store.glob("*.pt")) if store.is_dir() else []:
        saved = torch.load(shard, map_location="cpu", weights_only=True)
        rows.update(zip(saved["contents"], saved["features"], strict=True))
    return rows


def _missing(known: dict[str, torch.Tensor], digests: Sequence[str]) -> list[int]:
    """Indices of the images (first of each content) whose features are not in the store."""
    first: dict[str, int] = {}
    for i, digest in enumerate(digests):
        first.setdefault(digest, i)
    return sorted(i for digest, i in first.items() if digest not in known)


def _add_to_store(store: Path, digests: list[str], features: torch.Tensor) -> None:
    """One new shard, named by its contents, written atomically."""
    name = hashlib.sha256("|".join(digests).encode()).hexdigest()[:20]
    with atomic_path(store / f"{name}.pt") as tmp:
        torch.save({"contents": list(digests), "features": features}, tmp)


def _from_store(rows: dict[str, torch.Tensor], digests: Sequence[str], store: Path) -> torch.Tensor:
    log.info("features: %d images from %s", len(digests), store)
    return torch.stack([rows[d] for d in digests]) if digests else torch.empty(0)


def _compute(
    backbone: nn.Module,
    network: nn.Module | None,
    images: CachedImages,
    batch_size: int,
    precision: Precision,
    channels_last: bool,
    desc: str,
    indices: Sequence[int],
) -> tuple[torch.Tensor, nn.Module]:
    """Features of `images[indices]` and the network that made them: `network`, else the backbone's
    inference copy."""
    was_training = backbone.training
    backbone.eval()
    # Its own generator: computing (rather than loading) features must not advance the global RNG.
    sampler = [(0, i) for i in indices]  # (epoch, index) keys, as EpochSampler yields them
    loader = DataLoader(
        images, batch_size=batch_size, sampler=sampler, generator=torch.Generator().manual_seed(0)
    )
    chunks = []
    # inference_mode: about 8% faster than no_grad on CPU (no version counters, no views tracked)
    with torch.inference_mode(), progress(desc, len(sampler), "img") as bar:
        for batch, _ in loader:
            batch = batch.to(precision.device, non_blocking=True)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            if network is None:
                network = inference_copy(backbone, batch[:2])
            with precision.autocast():
                chunks.append(network(batch).float().cpu())
            bar.update(len(batch))
    backbone.train(was_training)
    # Outside inference mode, so the result is an ordinary tensor that the head can train on with autograd.
    return torch.cat(chunks), network


# What a BatchNorm becomes once folded into the convolution before it: what it applied after normalising.
_FOLDED: dict[type, Callable[[nn.Module], nn.Module]] = {
    nn.BatchNorm2d: lambda bn: nn.Identity(),
    BatchNormAct2d: lambda bn: nn.Sequential(bn.drop, bn.act),
}


def inference_copy(backbone: nn.Module, probe: torch.Tensor) -> nn.Module:
    """A copy of the backbone (in eval mode) with each BatchNorm folded into the convolution it follows:
    BatchNorm is a fifth of lite0's inference time on CPU. A conv+BN pair is two neighbouring children, conv
    first, so the copy is checked on `probe` and the backbone itself is used if the outputs differ."""
    if next(backbone.parameters()).device != probe.device:  # the pass may run elsewhere than training
        backbone = copy.deepcopy(backbone).to(probe.device)
    folded = copy.deepcopy(backbone).eval()
    for parent in list(folded.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:], strict=False):
            if (
                isinstance(conv, nn.Conv2d)
                and type(norm) in _FOLDED
                and norm.num_features == conv.out_channels
                and norm.track_running_stats
            ):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(parent, norm_name, _FOLDED[type(norm)](norm))
    expected, got = backbone(probe), folded(probe)
    if not torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item()):
        log.warning(
            "features: folding BatchNorm changed %s's outputs; using it unfolded", type(backbone).__name__
        )
        return backbone
    return folded


def _weights_digest(backbone: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        digest.update(name.encode() + tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def features_key(images: CachedImages, weights: str, precision: str, channels_last: bool, device: str) -> str:
    """The feature store's key. The transform's repr carries the crop size and normalisation, `weights`
    digests the exact weights, `precision` (fp32 | bf16 | fp16) and `device` (`device_tag`) say what
    computed them."""
    spec = f"{images.transform!r}|{precision}|{channels_last}|{device}|{weights}"
    return hashlib.sha256(spec.encode()).hexdigest()[:20]
