"""The train stage end to end on tiny data (timm's test_efficientnet, random weights, 32 px): every strategy,
precision mode, class weighting, early stopping, determinism, resume and the outputs other stages read."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from helpers import assert_headline_metrics, train_params

from pipeline import progress
from pipeline.errors import PipelineError
from pipeline.models import load_trained
from pipeline.stages import train
from pipeline.training import checkpoint
from pipeline.training.precision import cpu_supports_bf16

pytestmark = pytest.mark.usefixtures("single_thread")
CLASSES = ["class_0", "class_1", "class_2"]
TIMING_KEYS = {"train_seconds", "images_per_s"}
HEADLINE_KEYS = {
    *TIMING_KEYS,
    "best_epoch",
    "best_val_acc",
    "best_val_loss",
    "best_val_f1",
    "epochs_run",
    "final_train_loss",
}


def _metrics(params) -> dict:
    return json.loads(params.paths.metrics("train").read_text())


def _curve(params, name: str) -> list[float]:
    with open(params.paths.curves_dir / f"{name}.tsv") as handle:
        return [float(row[name.split("/")[-1]]) for row in csv.DictReader(handle, delimiter="\t")]


@pytest.mark.parametrize("strategy", ["linear_probe", "partial", "full", "progressive"])
def test_each_strategy_trains_and_writes_the_outputs_other_stages_read(tmp_path, strategy):
    params = train_params(tmp_path, train={"strategy": strategy, "epochs": 3, "trainable_blocks": 1})
    summary = train.run(params)

    metrics = _metrics(params)
    assert metrics["epochs_run"] == 3 == summary["epochs_run"]
    assert 1 <= metrics["best_epoch"] <= 3 and 0.0 <= metrics["best_val_acc"] <= 1.0
    assert all(math.isfinite(metrics[k]) for k in ("final_train_loss", "best_val_loss", "images_per_s"))
    assert set(metrics) == HEADLINE_KEYS
    assert_headline_metrics(metrics, CLASSES)
    for name in ("train/loss", "train/acc", "val/loss", "val/acc", "val/f1", "lr", "lr_head", "images_per_s"):
        assert len(_curve(params, name)) == 3, name
    head_only = {"linear_probe": [1, 1, 1], "partial": [0, 0, 0], "full": [0, 0, 0], "progressive": [1, 0, 0]}
    assert _curve(params, "head_only") == head_only[strategy]  # the report shades these epochs
    trained = load_trained(params.paths.model)
    assert trained.class_names == CLASSES
    assert trained.data_config["input_size"] == [3, 32, 32]
    assert trained.params["train"]["strategy"] == strategy
    assert trained.model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_frozen_parts_do_not_change(tmp_path):
    """linear_probe trains only the head; partial leaves all but the last block group as pretrained."""
    params = train_params(tmp_path, train={"strategy": "partial", "trainable_blocks": 1, "epochs": 2})
    torch.manual_seed(params.base.seed)
    from pipeline.models import build_model

    initial = build_model(params.model, num_classes=3).backbone.state_dict()
    train.run(params)
    trained = load_trained(params.paths.model).model.backbone.state_dict()
    changed = {name for name in initial if not torch.equal(initial[name], trained[name])}
    assert changed and all(name.startswith(("blocks.4", "conv_head", "bn2")) for name in changed), changed


def test_the_same_params_and_data_give_identical_metrics(tmp_path):
    """Reproducible on CPU: two runs (the second reusing the caches) agree on every figure but the timings."""
    runs = []
    augment = {"random_erasing": 0.5, "auto_augment": "trivial"}
    for name in ("a", "b"):
        paths = {"metrics_dir": str(tmp_path / name), "checkpoint_dir": str(tmp_path / name / "ck")}
        params = train_params(
            tmp_path, paths=paths, train={"strategy": "progressive", "epochs": 3, "augment": augment}
        )
        train.run(params)
        runs.append({k: v for k, v in _metrics(params).items() if k not in TIMING_KEYS})
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    "precision",
    [
        "fp32",
        "fp16",
        pytest.param("bf16", marks=pytest.mark.skipif(not cpu_supports_bf16(), reason="no bf16")),
    ],
)
def test_each_precision_mode_the_cpu_supports(tmp_path, precision):
    params = train_params(tmp_path, train={"strategy": "full", "precision": precision})
    summary = train.run(params)
    assert summary["precision"] == precision
    assert math.isfinite(_metrics(params)["final_train_loss"])


def test_switches_together_ema_mixup_cutmix_accumulation_sgd_mlp_head_class_weights(tmp_path):
    params = train_params(
        tmp_path,
        model={"head": "mlp", "head_hidden": 16},
        train={
            "strategy": "full", "optimizer": "sgd", "lr": 0.01, "ema_decay": 0.9, "grad_accum_steps": 2,
            "class_weighting": "effective", "balanced_sampler": True, "channels_last": True,
            "augment": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "auto_augment": "randaugment"},
        },
    )  # fmt: skip
    train.run(params)
    assert math.isfinite(_metrics(params)["final_train_loss"])
    assert load_trained(params.paths.model).params["model"]["head"] == "mlp"


def _keep_two_train_images_of_class_2(params) -> None:
    """Imbalance the train split: class_2 keeps 2 of its 6 train images (train counts 6, 6, 2)."""
    rows = params.paths.splits.read_text().splitlines()
    dropped = [r for r in rows if r.startswith("class_2/") and ",train," in r][2:]
    params.paths.splits.write_text("\n".join(r for r in rows if r not in dropped) + "\n")
    assert sum(",train," in row for row in params.paths.splits.read_text().splitlines()) == 14


# The weights the stated rule gives for train counts (6, 6, 2), worked out by hand: proportional to 1 / count
# (inverse) or to (1 - beta) / (1 - beta^count) with beta = 0.999 (effective, Cui et al. 2019), then scaled
# to average 1 over the classes. inverse: (1/6, 1/6, 1/2) x 3 / (5/6).
HAND_WEIGHTS = {
    "none": None,
    "inverse": [0.6, 0.6, 1.8],
    "effective": [0.6007200235006187, 0.6007200235006187, 1.7985599529987626],
}


class _Spy(torch.nn.Module):
    """Around the trainer's loss: records every (logits, target) it is called with, then computes it."""

    def __init__(self, criterion: torch.nn.Module):
        super().__init__()
        self.criterion, self.calls = criterion, []

    def forward(self, logits: torch.Tensor, target: torch.Tensor, *teacher: torch.Tensor) -> torch.Tensor:
        self.calls.append((logits.detach().clone(), target.detach().clone()))
        return self.criterion(logits, target, *teacher)


def _prepared_first_epoch(params):
    """What the stage prepares from `params` (train.prepare) and the first epoch's plan and batches."""
    from pipeline.training.distributed import Dist

    ready = train.prepare(params, Dist(), torch.device("cpu"))
    plan = ready.plans[0]
    assert not plan.on_features  # the image epochs are the ones that mix
    return ready, plan, ready.data.train(0, plan.on_features)


@pytest.mark.parametrize(
    ("weighting", "smoothing"), [("none", 0.0), ("none", 0.3), ("inverse", 0.0), ("effective", 0.2)]
)
def test_the_training_loss_is_cross_entropy_with_the_params_smoothing_and_hand_computed_class_weights(
    tmp_path, weighting, smoothing
):
    section = {"class_weighting": weighting, "label_smoothing": smoothing, "precision": "fp32"}
    params = train_params(tmp_path, train={"strategy": "full", **section})
    _keep_two_train_images_of_class_2(params)
    ready, plan, (batches, num_batches) = _prepared_first_epoch(params)
    weight = None if HAND_WEIGHTS[weighting] is None else torch.tensor(HAND_WEIGHTS[weighting])

    def expected(logits: torch.Tensor, target: torch.Tensor) -> float:
        loss = torch.nn.functional.cross_entropy(logits, target, weight=weight, label_smoothing=smoothing)
        return loss.item()

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-3.0, 1.0, 4.0], [1.5, 1.5, -2.0]])
    for target in (torch.tensor([0, 1, 2, 2]), torch.tensor([[0.7, 0.3, 0.0]] * 4)):  # labels; mixed targets
        got = ready.trainer.criterion(logits, target).item()
        assert got == pytest.approx(expected(logits, target), abs=1e-6), (weighting, smoothing, target)
    # ... and it is the loss the epoch loop trains on and reports.
    spy = ready.trainer.criterion = _Spy(ready.trainer.criterion)
    reported = ready.trainer.train_epoch(plan, batches, num_batches, desc="test")
    sizes = [len(target) for _, target in spy.calls]
    assert len(spy.calls) == num_batches and sum(sizes) == reported["images"] == 14
    mean = sum(expected(*call) * size for call, size in zip(spy.calls, sizes, strict=True)) / sum(sizes)
    assert reported["loss"] == pytest.approx(mean, abs=1e-6)


def _source_of(mixed: torch.Tensor, own: torch.Tensor, others: torch.Tensor) -> tuple[int, float]:
    """(j, w) such that `mixed` is `own` blended or pasted with others[j], `own` making up share w in (0, 1):
    MixUp gives w x own + (1 - w) x others[j] everywhere, CutMix own's pixels outside a box and others[j]'s
    inside it. Fails when no other image explains `mixed`."""
    for j, other in enumerate(others):
        gap = own - other
        if gap.abs().max() < 1e-3:
            continue
        w = ((mixed - other) * gap).sum() / (gap * gap).sum()  # least squares: mixed = other + w x gap
        if (mixed - other - w * gap).abs().max() < 1e-4 and 0.0 < w < 1.0:
            return j, w.item()
        pasted = (mixed == other).all(0) & ~(mixed == own).all(0)  # (H, W): pixels that are only other's
        if ((mixed == own).all(0) | pasted).all() and pasted.any() and not pasted.all():
            return j, 1.0 - pasted.float().mean().item()
    raise AssertionError("the image is no MixUp blend or CutMix paste of its own image and another")


@pytest.mark.parametrize("augment", [{}, {"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}])
def test_the_train_stage_mixes_its_batches_as_train_augment_says(tmp_path, augment):
    """Through the stage's own wiring (train.prepare: params -> loader -> trainer) the model sees blends of
    two images and the loss soft targets weighted as the images were (CutMix: by the pasted area)."""
    params = train_params(tmp_path, train={"strategy": "full", "augment": augment, "label_smoothing": 0.0})
    ready, plan, (batches, num_batches) = _prepared_first_epoch(params)
    unmixed = list(batches)  # the loader's batches are a function of (seed, epoch, index): the same again
    seen: list[torch.Tensor] = []
    ready.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    spy = ready.trainer.criterion = _Spy(ready.trainer.criterion)
    ready.trainer.train_epoch(plan, batches, num_batches, desc="test")
    assert len(seen) == len(spy.calls) == len(unmixed) == num_batches
    soft_rows, tolerance = 0, 0.02 if "cutmix_alpha" in augment else 1e-5  # CutMix: pixels equal in both
    for (images, labels), model_input, (_, target) in zip(unmixed, seen, spy.calls, strict=True):
        if not augment:
            assert torch.equal(model_input, images) and torch.equal(target, labels)
            continue
        assert target.shape == (len(labels), 3) and target.dtype.is_floating_point
        torch.testing.assert_close(target.sum(1), torch.ones(len(labels)))
        assert not torch.equal(model_input, images)
        for i, label in enumerate(labels.tolist()):
            j, own_share = _source_of(model_input[i], images[i], images)
            expected = torch.zeros(3)
            expected[label] += own_share
            expected[labels[j]] += 1.0 - own_share
            torch.testing.assert_close(target[i], expected, atol=tolerance, rtol=0)
            soft_rows += int(target[i].max() < 1.0)
    assert soft_rows > 0 or not augment  # some images mixed with another class: targets no longer one-hot


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_stage_builds_conv_weights_in_the_memory_format_asked_for(tmp_path, channels_last):
    params = train_params(tmp_path, train={"channels_last": channels_last})
    model = train._model(params.model, params.train, num_classes=3, device=torch.device("cpu"))
    convs = [p for p in model.parameters() if p.ndim == 4 and p.shape[-1] > 1 and p.shape[1] > 1]
    assert convs
    assert all(p.is_contiguous(memory_format=torch.channels_last) is channels_last for p in convs)


def test_early_stopping_ends_the_run_after_patience_epochs_without_improvement(tmp_path):
    # A learning rate this small leaves val accuracy unchanged, so epochs 2 and 3 cannot improve on epoch 1.
    params = train_params(
        tmp_path, train={"strategy": "full", "epochs": 8, "lr": 1e-12, "early_stopping_patience": 2}
    )
    train.run(params)
    metrics = _metrics(params)
    assert metrics["epochs_run"] == 3 and metrics["best_epoch"] == 1  # of 8 planned


def test_a_spent_time_limit_stops_the_run_keeps_its_model_and_resumes_as_finished(tmp_path, caplog):
    params = train_params(tmp_path, train={"strategy": "full", "epochs": 4, "time_limit_min": 1e-6})
    with caplog.at_level("WARNING"):
        first = train.run(params)
    assert first["epochs_run"] == 1 == _metrics(params)["epochs_run"]  # of 4 planned
    assert "train.time_limit_min 1e-06 is spent after epoch 1 of 4" in caplog.text
    assert load_trained(params.paths.model).class_names == CLASSES
    again = train.run(params)
    assert again["resumed_from_epoch"] == 1 and again["epochs_run"] == 1


def test_a_finished_run_resumes_as_finished_and_a_changed_param_starts_fresh(tmp_path, caplog):
    params = train_params(tmp_path, train={"strategy": "full", "epochs": 2})
    first = train.run(params)
    assert first["resumed_from_epoch"] == 0
    again = train.run(params)
    assert again["resumed_from_epoch"] == 2 and again["epochs_run"] == 2
    changed = train_params(tmp_path, train={"strategy": "full", "epochs": 2, "lr": 2e-4})
    with caplog.at_level("WARNING"):
        assert train.run(changed)["resumed_from_epoch"] == 0
    assert "training from scratch" in caplog.text


def test_checkpoint_holds_only_tensors_and_primitives(tmp_path):
    params = train_params(tmp_path, train={"strategy": "full", "epochs": 1, "ema_decay": 0.5})
    train.run(params)
    state = torch.load(params.paths.checkpoint_dir / checkpoint.CHECKPOINT_NAME, weights_only=True)
    assert (
        state["fit"]["epoch"] == 1 and state["trainer"]["ema"] and state["rng"]["torch"].dtype == torch.uint8
    )


@pytest.mark.parametrize(("every_s", "saved_after"), [(0.0, [1, 2, 3]), (3600.0, [3])])
def test_checkpoints_are_written_once_the_interval_has_passed_and_after_the_last_epoch(
    tmp_path, monkeypatch, every_s, saved_after
):
    params = train_params(tmp_path, train={"strategy": "full", "epochs": 3, "checkpoint_every_s": every_s})
    saved, save = [], checkpoint.save
    monkeypatch.setattr(
        checkpoint, "save", lambda path, state: (saved.append(state["fit"]["epoch"]), save(path, state))
    )
    train.run(params)
    assert saved == saved_after
    assert (
        torch.load(params.paths.checkpoint_dir / checkpoint.CHECKPOINT_NAME, weights_only=True)["fit"][
            "epoch"
        ]
        == 3
    )


def test_missing_splits_table_names_the_file_and_the_fix(tmp_path):
    params = train_params(tmp_path, paths={"splits": str(tmp_path / "nope.csv")})
    with pytest.raises(PipelineError, match="nope.csv.*run the split stage"):
        train.run(params)


def test_epoch_log_shows_the_lr_that_trains_and_long_passes_report_progress(tmp_path, caplog, monkeypatch):
    """Head-only epochs train at the head's lr (lr x head_lr_mult), not the backbone's; and with the progress
    interval at 0 every pass (backbone features, train and val batches) logs done/total lines."""
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    params = train_params(tmp_path, train={"epochs": 2, "progressive_head_epochs": 1, "trainable_blocks": 1})
    with caplog.at_level("INFO"):
        train.run(params)
    backbone_lr, head_lr = _curve(params, "lr"), _curve(params, "lr_head")
    assert head_lr[0] == pytest.approx(10 * backbone_lr[0]) and backbone_lr[1] > 0
    epochs = [
        r.getMessage() for r in caplog.records if r.name == train.log.name and "train loss" in r.getMessage()
    ]
    assert f"| lr {head_lr[0]:.2e} (head only) |" in epochs[0], epochs[0]
    assert f"| lr {backbone_lr[1]:.2e} (head {head_lr[1]:.2e}) |" in epochs[1], epochs[1]
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.progress"]
    passes = ("backbone features 1/2", "epoch 1/2 train", "epoch 1/2 val", "epoch 2/2 train", "epoch 2/2 val")
    for desc in passes:
        assert any(line.startswith(f"{desc}: ") and ", done in " in line for line in lines), (desc, lines)
