"""training/checkpoint: resumable state that loads with weights_only=True; foreign files ignored."""

from __future__ import annotations

import random

import numpy as np
import torch

from pipeline.training import checkpoint


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    checkpoint.seed_everything(7)
    path = tmp_path / "ck.pt"
    checkpoint.save(path, {"fingerprint": "f", "rng": checkpoint.rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.seed_everything(99)
    state = checkpoint.load(path, "f")
    checkpoint.set_rng_state(state["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert (
        torch.equal(expected[0], again[0])
        and np.array_equal(expected[1], again[1])
        and expected[2] == again[2]
    )


def test_foreign_or_corrupt_checkpoints_are_ignored(tmp_path, caplog):
    path = tmp_path / "ck.pt"
    checkpoint.save(path, {"fingerprint": "other"})
    with caplog.at_level("WARNING"):
        assert checkpoint.load(path, "mine") is None
        path.write_bytes(b"truncated")
        assert checkpoint.load(path, "mine") is None
    assert "other data, params or code" in caplog.text and "unreadable" in caplog.text
    assert checkpoint.load(tmp_path / "missing.pt", "mine") is None
