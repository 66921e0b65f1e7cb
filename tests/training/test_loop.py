"""training/loop: early stopping within the last phase, the best epoch kept."""

from __future__ import annotations

from torch import nn

from pipeline.config import TrainParams
from pipeline.models.freezing import EpochPlan
from pipeline.training.loop import FitState, fit


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
