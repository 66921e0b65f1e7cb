"""Pooled backbone features of every image, computed once (eval transform, no augmentation) so head-only
epochs train a linear layer on (N, C) features instead of running the backbone: orders of magnitude faster.

Features are also cached on disk by content: one folder per setting (a digest of the backbone's weights, the
transform, the numeric settings and what computed them: CPU or GPU model, precision) holds the features of
every image ever embedded with it, each keyed as the image cache keys its square (identity and resize
settings). So experiments that change only head/optimizer params skip the backbone entirely, and any image
set (the audit's usable images, train's split) reuses what another set already embedded.

The folder is a `ShardStore`: float16 shards of `CHUNK` images, each written as soon as it is computed, so a
kill keeps every finished chunk and a rerun computes only the rest. Each image set is then gathered, in its
order, into one (N, C) float16 file under `sets/` that every consumer memory-maps and reads a block at a time:
a million 1,280-d features are 2.6 GB on disk and never 5 GB of float32 in memory.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.data import DataLoader

from pipeline.config import FeaturesParams
from pipeline.data.cache import open_cache
from pipeline.data.loader import CachedImages
from pipeline.data.shards import ShardStore
from pipeline.errors import PipelineError
from pipeline.io import atomic_path
from pipeline.progress import progress
from pipeline.training.distributed import Dist, barrier
from pipeline.training.precision import Precision, device_tag, resolve_device, resolve_precision

log = logging.getLogger(__name__)

# 2: float16 `ShardStore` shards (1: torch .pt shards of float32, loaded whole). float16 keeps 11 significant
# bits (relative error <= 2^-11 = 4.9e-4), bf16 keeps 8: features computed in bf16 are stored exactly.
STORE_VERSION = 2
DTYPE = np.float16
# Images per shard: what a kill can lose. 10 MB of float16 at 1,280-d; about 10 s at lite0's 430 img/s on
# 2 CPU cores (160 px, bf16), a minute at 224 px in fp32; a million images make 245 shards.
CHUNK = 4096


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
) -> list[np.ndarray]:
    """(N, C) float16 features of each image set, as read-only memmaps (built by one process per machine, read
    by the others). One call for all sets: the weights are digested and the backbone folded once; only images
    whose content is not in the store yet run through the backbone."""
    weights = _weights_digest(backbone)
    settings = (precision.name, channels_last, device_tag(precision.device))
    folders = [
        Path(cache_dir) / f"features-{features_key(images, weights, *settings)}" for images in image_sets
    ]
    contents = [_contents(images) for images in image_sets]
    if env.is_local_main:
        stores: dict[Path, ShardStore] = {}  # each store indexed once (train and val share one)
        network = None
        for n, (images, folder, keys) in enumerate(zip(image_sets, folders, contents, strict=True), 1):
            store = stores[folder] = stores[folder] if folder in stores else ShardStore(folder)
            missing = store.missing(keys)
            if len(missing):
                desc = f"backbone features {n}/{len(image_sets)}"
                network = _compute(
                    backbone,
                    network,
                    images,
                    batch_size,
                    precision,
                    channels_last,
                    desc,
                    store,
                    keys,
                    missing,
                )
            _write_set(store, keys)
    barrier(env)
    return [_open_set(folder, keys) for folder, keys in zip(folders, contents, strict=True)]


def _contents(images: CachedImages) -> np.ndarray:
    """(N,) keys of the images' cached squares (identity and resize settings, `data.cache`): the same image
    has the same key in any image set, and no pixel is read: blake2b of every square took 27 s a million at
    64 px (73 px squares), 300 s at 224 px, on a 2-core Xeon, plus reading the whole cache from disk."""
    return open_cache(images.cache_file).keys


def _set_file(folder: Path, keys: np.ndarray) -> Path:
    return folder / "sets" / f"{hashlib.sha256(keys.tobytes()).hexdigest()[:20]}.npy"


def _write_set(store: ShardStore, keys: np.ndarray) -> None:
    """The set's rows gathered in its order into one (N, C) file, written atomically; reused if it exists."""
    target = _set_file(store.folder, keys)
    if target.is_file() or not len(keys):
        return
    with atomic_path(target) as tmp:
        store.save(tmp, *store.locate(keys))


def _open_set(folder: Path, keys: np.ndarray) -> np.ndarray:
    log.info("features: %d images from %s", len(keys), folder)
    if not len(keys):
        return np.zeros((0, 0), DTYPE)
    return np.load(_set_file(folder, keys), mmap_mode="r")


def _compute(
    backbone: nn.Module,
    network: nn.Module | None,
    images: CachedImages,
    batch_size: int,
    precision: Precision,
    channels_last: bool,
    desc: str,
    store: ShardStore,
    keys: np.ndarray,
    indices: np.ndarray,
) -> nn.Module:
    """Features of `images[indices]` into `store`, a shard of `CHUNK` images as each chunk finishes; returns
    the network that made them: `network`, else the backbone's inference copy."""
    was_training = backbone.training
    backbone.eval()
    # inference_mode: about 8% faster than no_grad on CPU (no version counters, no views tracked)
    with torch.inference_mode(), progress(desc, len(indices), "img") as bar:
        for start in range(0, len(indices), CHUNK):
            chunk = indices[start : start + CHUNK]
            # Its own generator: computing (rather than loading) features must not advance the global RNG.
            sampler = [(0, int(i)) for i in chunk]  # (epoch, index) keys, as EpochSampler yields them
            loader = DataLoader(
                images, batch_size=batch_size, sampler=sampler, generator=torch.Generator().manual_seed(0)
            )
            rows = []
            for batch, _ in loader:
                batch = batch.to(precision.device, non_blocking=True)
                if channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                if network is None:
                    network = inference_copy(backbone, batch[:2])
                with precision.autocast():
                    rows.append(network(batch).float().cpu().numpy())
                bar.update(len(batch))
            store.add(keys[chunk], _stored(np.concatenate(rows)))
    backbone.train(was_training)
    return network


def _stored(rows: np.ndarray) -> np.ndarray:
    """(n, C) float32 rows as the store keeps them, in float16, which holds |x| <= 65504: pooled features of a
    sane backbone are a few units."""
    if not np.isfinite(rows).all() or np.abs(rows).max(initial=0) > np.finfo(DTYPE).max:
        raise PipelineError(
            "backbone features are not finite in float16 (|x| > 65504, or NaN): check the backbone's weights"
        )
    return rows.astype(DTYPE)


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
    computed them, `STORE_VERSION` how they are stored (so a store of the old layout is never misread)."""
    spec = f"{STORE_VERSION}|{images.transform!r}|{precision}|{channels_last}|{device}|{weights}"
    return hashlib.sha256(spec.encode()).hexdigest()[:20]
