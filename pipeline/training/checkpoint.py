"""Resumable training state, written atomically after an epoch (`train.checkpoint_every_s`) and read back
with `weights_only=True`.

A checkpoint holds only tensors and primitive containers (model, optimizer, scheduler, scaler and EMA state
dicts, RNG states, epoch, history), never pickled objects. It carries a fingerprint of everything that shapes
the run (base/model/train params, the splits file, the world size and the training code): a checkpoint with
another fingerprint is ignored with a warning and training starts fresh, never resumed by mistake.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import BaseParams, ModelParams, TrainParams
from pipeline.io import atomic_path
from pipeline.training.distributed import Dist, from_main

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
# Train params that change how fast data arrives or what is printed, not the numbers a run produces.
_RESULT_NEUTRAL = {
    "num_workers",
    "pin_memory",
    "persistent_workers",
    "overfit_gap_warning",
    "checkpoint_every_s",
    "dist_timeout_min",
    "nproc_per_node",  # the world size, which is in the fingerprint, is what matters
}
_PACKAGE = Path(__file__).resolve().parents[1]
_CODE = (
    "training/*.py",
    "data/cache.py",
    "data/epochs.py",
    "data/shards.py",
    "data/loader.py",
    "data/splits.py",
    "data/transforms.py",
    "models/*.py",
    "preprocess.py",  # the cache's resize geometry
    "stages/train.py",
)


def fingerprint(
    base: BaseParams, model: ModelParams, train: TrainParams, splits_file: Path, world_size: int
) -> str:
    """What a checkpoint must match to be resumed: the sections that shape the run (train's result-neutral
    keys aside), the splits file's content, the world size and the training code."""
    spec = {
        "base": base.model_dump(mode="json"),
        "model": model.model_dump(mode="json"),
        "train": train.model_dump(mode="json", exclude=_RESULT_NEUTRAL),
        "splits": hashlib.sha256(Path(splits_file).read_bytes()).hexdigest(),
        "world_size": world_size,
        "code": _code_digest(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def save(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at `path` if it belongs to this run, else None (missing, unreadable or foreign)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file must not stop training; it is replaced
        log.warning("%s: unreadable checkpoint (%s); training from scratch", path, exc)
        return None
    if state.get("fingerprint") != expected_fingerprint:
        log.warning("%s: written for other data, params or code; training from scratch", path)
        return None
    return state


def load_for_every_rank(path: Path, expected_fingerprint: str, env: Dist) -> dict[str, Any] | None:
    """`load` by rank 0 only, its result sent to every rank: one decision (resume or start fresh) for all, and
    the other machines of a multi-node run need no copy of the file, which only rank 0 writes."""
    return from_main(env, load(path, expected_fingerprint) if env.is_main else None)


def rng_state() -> dict[str, Any]:
    """torch, CUDA, numpy and Python RNG states as tensors and primitives (weights_only-loadable)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # The current GPU's only (setup makes it this process's): get_rng_state_all would open a context,
        # hundreds of MB, on every visible GPU from every process. None when CUDA is unused (a CPU run).
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"][0])
    numpy = state["numpy"]
    np.random.set_state(
        ("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["gauss"])
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))


def _code_digest() -> str:
    digest = hashlib.sha256()
    for pattern in _CODE:
        for source in sorted(_PACKAGE.glob(pattern)):
            digest.update(source.name.encode() + source.read_bytes())
    return digest.hexdigest()


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch. CPU kernels here are already run-to-run deterministic (tested);
    torch.use_deterministic_algorithms would add nothing but made fine-tuning 8x slower (slow fallbacks)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
