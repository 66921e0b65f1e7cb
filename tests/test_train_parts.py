"""Training machinery on its own: class weights, samplers, precision, checkpoints, stopping."""

from __future__ import annotations

import platform
import random
import sys

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import TrainParams
from pipeline.data.loader import EpochSampler, resolve_eval_batch_size, resolve_workers
from pipeline.errors import PipelineError
from pipeline.models.freezing import EpochPlan
from pipeline.training import checkpoint
from pipeline.training.loop import FitState, fit
from pipeline.training.loss import class_weights
from pipeline.training.memory import keep_freed_memory
from pipeline.training.precision import resolve_device, resolve_precision


def test_class_weights_favour_rare_classes():
    labels = np.array([0] * 80 + [1] * 20)
    assert class_weights(labels, 2, "none") is None
    inverse = class_weights(labels, 2, "inverse")
    torch.testing.assert_close(inverse, torch.tensor([0.4, 1.6]))  # 1/count, mean 1
    effective = class_weights(labels, 2, "effective")
    assert effective.mean().item() == pytest.approx(1.0) and 1.0 < effective[1] / effective[0] < 4.0


def test_balanced_sampler_draws_classes_equally_and_is_seeded_by_epoch():
    labels = np.array([0] * 90 + [1] * 10)
    sampler = EpochSampler(labels, seed=3, balanced=True)
    draws = np.concatenate([labels[[i for _, i in sampler]] for sampler.epoch in range(20)])
    assert 0.45 < draws.mean() < 0.55
    sampler.set_epoch(4)
    assert list(sampler) == list(sampler) and list(sampler) != list(
        EpochSampler(labels, seed=3, balanced=True)
    )


def test_sharded_samplers_split_the_data_between_ranks():
    labels = np.arange(10) % 2
    train = [sorted(i for _, i in EpochSampler(labels, 0, rank=r, world_size=3)) for r in range(3)]
    assert all(len(shard) == 4 for shard in train) and set().union(*train) == set(range(10))
    val = [[i for _, i in EpochSampler(labels, 0, rank=r, world_size=3, shuffle=False)] for r in range(3)]
    assert sorted(sum(val, [])) == list(range(10))  # evaluation counts every image exactly once


def test_precision_and_device_resolution_on_cpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("fp32", cpu).dtype is None
    fp16 = resolve_precision("fp16", cpu)
    assert fp16.dtype is torch.float16 and fp16.needs_scaler and fp16.grad_scaler().is_enabled()
    assert not resolve_precision("bf16", cpu).needs_scaler
    assert resolve_precision("auto", cpu).name in {"bf16", "fp32"}
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(PipelineError, match="train.device"):
            resolve_device("cuda:0")
    assert resolve_workers(None, cpu) == 0 and resolve_workers(3, cpu) == 3
    assert resolve_eval_batch_size(None, 32, cpu) == 16 and resolve_eval_batch_size(None, 32, gpu) == 64
    assert resolve_eval_batch_size(7, 32, cpu) == 7 and resolve_eval_batch_size(7, 32, gpu) == 7


def test_freed_memory_is_kept_where_the_c_library_is_glibc():
    assert keep_freed_memory() == (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")


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


class _ScriptedTrainer:
    """Stands in for loop.Trainer: val accuracy follows a script."""

    def __init__(self, val_accs: list[float], patience: int):
        self.params = TrainParams(early_stopping_patience=patience)
        self.eval_model, self._accs = nn.Linear(1, 1), iter(val_accs)

    def train_epoch(self, *args, **kwargs) -> dict:
        return {"loss": 1.0, "acc": 0.5, "images": 1, "seconds": 1.0}

    def evaluate(self, *args, **kwargs) -> dict:
        return {"loss": 1.0, "acc": next(self._accs), "f1": 0.0}

    def lrs(self) -> dict:
        return {"lr": 0.0, "lr_head": 0.0, "lr_trained": 0.0}


class _NoData:
    def train(self, epoch, on_features):
        return [], 0

    def val(self, on_features):
        return [], 0


def test_early_stopping_counts_within_the_last_phase_and_the_best_epoch_is_kept():
    # Head-only phase: 3 epochs, getting worse (no stop there). Fine-tuning starts below the head's best,
    # improves, then stalls for `patience` epochs: stop, keeping the overall best epoch (2).
    plans = [EpochPlan(0, 0, True)] * 3 + [EpochPlan(1, 6, False)] * 6
    accs = [0.8, 0.81, 0.7, 0.6, 0.62, 0.61, 0.60, 0.95, 0.95]
    state = fit(_ScriptedTrainer(accs, patience=2), plans, _NoData(), FitState(), 3, lambda *a: None)
    assert [r["val_acc"] for r in state.history] == accs[:7]
    assert state.stopped_early and state.best_epoch == 2 and state.best_value == 0.81


def test_patience_zero_runs_every_epoch():
    plans = [EpochPlan(0, 6, False)] * 4
    trainer = _ScriptedTrainer([0.5, 0.4, 0.3, 0.2], patience=0)
    state = fit(trainer, plans, _NoData(), FitState(), 3, lambda *a: None)
    assert len(state.history) == 4 and not state.stopped_early and state.best_epoch == 1


def test_inference_copy_folds_every_batchnorm_and_keeps_the_features():
    import timm

    from pipeline.training.features import inference_copy

    torch.manual_seed(0)
    backbone = timm.create_model("test_efficientnet", num_classes=0)
    with torch.no_grad():  # non-trivial statistics, as after pretraining
        for module in backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    backbone.eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        folded = inference_copy(backbone, images[:2])
        assert folded is not backbone
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        assert any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())  # the original is untouched
        torch.testing.assert_close(folded(images), backbone(images), rtol=1e-4, atol=1e-5)


def test_inference_copy_falls_back_when_neighbouring_children_are_not_conv_then_norm():
    from pipeline.training.features import inference_copy

    class NormBeforeConv(nn.Module):  # bn is declared after conv but applied before it
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(self.bn(x))

    torch.manual_seed(0)
    backbone = NormBeforeConv()
    with torch.no_grad():
        backbone.bn.running_mean.uniform_(-1, 1)
        backbone.bn.running_var.uniform_(0.2, 3.0)
    backbone.eval()
    with torch.no_grad():
        assert inference_copy(backbone, torch.randn(2, 3, 8, 8)) is backbone
