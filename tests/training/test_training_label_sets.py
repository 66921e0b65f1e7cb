"""Training on label sets (`base.task: multilabel`): the per-label figures, the losses, and the train stage
end to end on the tiny backbone (head-only epochs on features, MixUp, early stopping on val mAP)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import multilabel_train_params, train_params
from sklearn.metrics import average_precision_score, f1_score

from pipeline.errors import ParamsError
from pipeline.io import read_json
from pipeline.models import load_trained
from pipeline.stages import train
from pipeline.training.distributed import Dist
from pipeline.training.label_sets import Figures, correct
from pipeline.training.loss import MultiLabelLoss, positive_weights


def test_figures_match_scikit_learn_summed_over_batches():
    rng = np.random.default_rng(0)
    targets = (rng.random((500, 6)) < 0.3).astype(np.float32)
    logits = (3 * (targets - 0.5) + rng.normal(size=targets.shape) * 1.5).astype(np.float32)
    figures = Figures(6, torch.device("cpu"))
    for start in range(0, 500, 64):  # batches, as validation adds them
        figures.add(
            torch.from_numpy(logits[start : start + 64]), torch.from_numpy(targets[start : start + 64])
        )

    result = figures.result(Dist())

    exact_map = np.mean([average_precision_score(targets[:, k], logits[:, k]) for k in range(6)])
    assert result["map"] == pytest.approx(exact_map, abs=0.005)  # ties within a 1/64 logit bin only
    assert result["f1"] == pytest.approx(f1_score(targets, logits > 0, average="macro", zero_division=0))
    assert result["acc"] == pytest.approx(((logits > 0) == (targets > 0.5)).mean())
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(logits), torch.from_numpy(targets)
    )
    assert result["loss"] == pytest.approx(bce.item(), rel=1e-6)
    assert correct(torch.from_numpy(logits), torch.from_numpy(targets)).item() == pytest.approx(
        result["acc"] * 500
    )


def test_losses_smooth_towards_one_half_and_weigh_rare_positives():
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    weights = positive_weights(targets.numpy(), "inverse")
    assert weights.tolist() == [3.0, 3.0] and positive_weights(targets.numpy(), "none") is None
    logits = torch.tensor([[2.0, -1.0], [0.5, -3.0], [-1.0, 0.0], [1.0, 2.0]])
    smoothed = MultiLabelLoss("bce", None, 0.2)(logits, targets)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets * 0.8 + 0.1)
    assert smoothed.item() == pytest.approx(expected.item())
    weighted = MultiLabelLoss("bce", weights, 0.0)(logits, targets)
    assert weighted > MultiLabelLoss("bce", None, 0.0)(logits, targets)
    asl = MultiLabelLoss("asl", None, 0.0)
    easy_negative = asl(torch.tensor([[-4.0]]), torch.tensor([[0.0]]))
    assert easy_negative < 0.01 * torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([[-4.0]]), torch.tensor([[0.0]])
    )  # Asymmetric Loss all but ignores an easy negative


def test_the_train_stage_trains_label_sets_and_keeps_the_best_val_map_epoch(tmp_path):
    params = multilabel_train_params(
        tmp_path, train={"epochs": 3, "progressive_head_epochs": 2, "augment": {"mixup_alpha": 0.2}}
    )

    summary = train.run(params)

    metrics = read_json(params.paths.metrics("train"))
    curve = (params.paths.live_dir / "plots/metrics/val/map.tsv").read_text().splitlines()[1:]
    history = [float(line.split("\t")[-1]) for line in curve]
    assert len(history) == summary["epochs_run"] == 3
    assert metrics["best_val_map"] == max(history) and 0 < metrics["best_val_map"] <= 1
    assert metrics["best_epoch"] == history.index(max(history)) + 1
    trained = load_trained(params.paths.model)
    assert trained.class_names == ["class_0", "class_1", "class_2", "even"]
    assert trained.params["base"]["task"] == "multilabel"
    assert trained.model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"train": {"balanced_sampler": True}}, "train.balanced_sampler: an image holds several labels"),
        ({"train": {"class_weighting": "effective"}}, "train.class_weighting: effective is for single-label"),
        (
            {"base": {"task": "single"}, "train": {"early_stopping_metric": "val_map"}},
            "val_map is for base.task",
        ),
    ],
)
def test_train_keys_of_the_other_task_are_refused_naming_the_key(tmp_path, sections, message):
    sections = {"base": {"task": "multilabel"}, **sections}
    with pytest.raises(ParamsError, match=message):
        train_params(tmp_path, **sections)
