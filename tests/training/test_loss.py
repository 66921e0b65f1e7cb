"""training/loss: class weights from the train split; label smoothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models.freezing import EpochPlan
from pipeline.training.loss import build_criterion, class_weights


def test_class_weights_favour_rare_classes_by_the_stated_rule_exactly():
    # Proportional to 1 / count (inverse) or (1 - 0.999) / (1 - 0.999^count) (effective, Cui et al. 2019),
    # scaled to average 1 over the classes; the values below were worked out by hand for counts (80, 20).
    labels = np.array([0] * 80 + [1] * 20)
    assert class_weights(labels, 2, "none") is None
    exact = {"atol": 1e-6, "rtol": 0.0}
    torch.testing.assert_close(class_weights(labels, 2, "inverse"), torch.tensor([0.4, 1.6]), **exact)
    effective = torch.tensor([0.40960982851447825, 1.5903901714855215])
    torch.testing.assert_close(class_weights(labels, 2, "effective"), effective, **exact)
    # A class with no train image counts as one: the largest weight, not a division by zero.
    torch.testing.assert_close(class_weights(np.array([0, 0, 0]), 2, "inverse"), torch.tensor([0.5, 1.5]))


def test_label_smoothing_raises_the_loss_of_a_confident_correct_prediction_to_the_closed_form():
    logits, target, eps = torch.tensor([[6.0, 0.0, -2.0]]), torch.tensor([0]), 0.1
    log_p = torch.log_softmax(logits, 1)[0]
    plain = build_criterion(None, 0.0)(logits, target).item()
    smoothed = build_criterion(None, eps)(logits, target).item()
    # The target is (1 - eps) on the class plus eps / K on every class.
    assert plain == pytest.approx(-log_p[0].item())
    assert smoothed == pytest.approx(-((1 - eps) * log_p[0] + eps / 3 * log_p.sum()).item())
    assert smoothed > plain
    soft = torch.tensor([[0.7, 0.3, 0.0]])  # MixUp/CutMix targets are smoothed the same way
    expected = -(((1 - eps) * soft + eps / 3) * log_p).sum().item()
    assert build_criterion(None, eps)(logits, soft).item() == pytest.approx(expected)


def test_distillation_at_alpha_1_follows_the_teachers_soft_targets_not_the_labels():
    from pipeline.training.loss import DistillationLoss

    t, batch = 3.0, 2
    student = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[-1.0, 3.0, 0.0], [0.5, 0.0, 2.0]])
    loss = DistillationLoss(build_criterion(None, 0.1), alpha=1.0, temperature=t)
    loss(student, torch.tensor([0, 1]), teacher).backward()
    # d/ds of T^2 KL(softmax(t/T) || softmax(s/T)), averaged over the batch: T (p_student - p_teacher) / B.
    expected = t * (torch.softmax(student / t, 1) - torch.softmax(teacher / t, 1)) / batch
    torch.testing.assert_close(student.grad, expected.detach())
    same = loss(student, torch.tensor([2, 2]), teacher)  # the labels do not matter at alpha = 1
    assert same.item() == pytest.approx(loss(student, torch.tensor([0, 1]), teacher).item())
    assert loss(teacher.clone(), torch.tensor([0, 1]), teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_mixes_the_two_terms_and_is_plain_without_a_teacher():
    from pipeline.training.loss import DistillationLoss

    logits, target, teacher = torch.tensor([[1.0, -1.0]]), torch.tensor([1]), torch.tensor([[0.0, 2.0]])
    plain = build_criterion(None, 0.0)
    soft = DistillationLoss(plain, 1.0, 2.0)(logits, target, teacher)
    mixed = DistillationLoss(plain, 0.25, 2.0)(logits, target, teacher)
    assert mixed.item() == pytest.approx(0.75 * plain(logits, target).item() + 0.25 * soft.item())
    assert DistillationLoss(plain, 0.25, 2.0)(logits, target).item() == pytest.approx(
        plain(logits, target).item()
    )


class _Recorder(torch.nn.Module):
    """A 'model' that records its inputs and always prefers class 2."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return torch.tensor([[0.0, 0.0, 4.0]]).expand(len(x), 3)


def _config(size: int, mean: float, std: float) -> dict:
    return {"input_size": [3, size, size], "mean": [mean] * 3, "std": [std] * 3}


def test_the_teacher_sees_the_students_batch_in_its_own_size_and_normalisation():
    from pipeline.training.loss import Teacher

    recorder = _Recorder()
    teacher = Teacher(recorder, _config(8, 0.5, 0.5), _config(16, 0.0, 1.0))
    teacher.train()
    assert not recorder.training  # stays in eval mode
    pixels = torch.full((2, 3, 8, 8), 0.75)
    teacher((pixels - 0.5) / 0.5)
    seen = recorder.seen[-1]
    assert seen.shape == (2, 3, 16, 16)
    torch.testing.assert_close(seen, torch.full_like(seen, 0.75))  # same pixels, the teacher's statistics
    same = Teacher(recorder, _config(8, 0.5, 0.5), _config(8, 0.5, 0.5))
    batch = torch.randn(1, 3, 8, 8)
    same(batch)
    assert recorder.seen[-1] is batch


def _student_trainer(teacher: torch.nn.Module | None, alpha: float):
    from torch import nn

    from pipeline.config import TrainParams
    from pipeline.models import ImageClassifier
    from pipeline.models.freezing import block_groups
    from pipeline.training.distributed import Dist
    from pipeline.training.loop import Trainer
    from pipeline.training.loss import DistillationLoss
    from pipeline.training.precision import Precision

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = ImageClassifier(backbone, nn.Linear(4, 3))
    settings = {"optimizer": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0, "warmup_epochs": 0.0}
    params = TrainParams(**settings, label_smoothing=0.0, grad_clip_norm=0.0)
    criterion = DistillationLoss(build_criterion(None, 0.0), alpha, temperature=2.0)
    return Trainer(
        model=model,
        params=params,
        plans=[EpochPlan(0, 1, False)],
        block_groups=block_groups(backbone),
        steps_per_epoch=20,
        precision=Precision(torch.device("cpu"), None),
        env=Dist(),
        criterion=criterion,
        batch_mix=None,
        teacher=teacher,
    )


def test_a_student_taught_at_alpha_1_learns_the_teachers_answer_and_without_it_the_labels():
    from pipeline.training.loss import Teacher

    config = _config(6, 0.5, 0.5)
    batches = [(torch.randn(4, 3, 6, 6), torch.zeros(4, dtype=torch.int64)) for _ in range(20)]  # labels: 0
    taught = _student_trainer(Teacher(_Recorder(), config, config), alpha=1.0)
    alone = _student_trainer(None, alpha=1.0)  # the teacher ignored: only the labels remain
    for trainer in (taught, alone):
        trainer.train_epoch(EpochPlan(0, 1, False), batches, len(batches), desc="test")
    x = torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        assert (taught.model(x).argmax(1) == 2).all()  # the teacher's class, never a label
        assert (alone.model(x).argmax(1) == 0).all()


def _saved_model(path, class_names: list[str], image_size: int = 32):
    from pipeline.config import ModelParams
    from pipeline.models import build_model, resolve_data_config, save_trained

    params = ModelParams(backbone="test_efficientnet", weights="none", image_size=image_size)
    model = build_model(params, len(class_names)).eval()
    save_trained(
        path, model, class_names, resolve_data_config(params), {"model": params.model_dump(mode="json")}
    )
    return path


def test_the_teacher_is_a_model_file_or_the_champions_and_must_know_the_same_classes(tmp_path, caplog):
    from pipeline.config import DistillParams
    from pipeline.errors import PipelineError
    from pipeline.training.loss import DistillationLoss, with_teacher

    names = ["a", "b", "c"]
    config = _config(32, 0.5, 0.5)
    champion = tmp_path / "champion" / "model.pt"

    def distill(teacher: str) -> DistillParams:
        return DistillParams(teacher=teacher, alpha=0.7)

    plain = build_criterion(None, 0.0)
    assert with_teacher(plain, distill("none"), champion, names, config) == (plain, None)
    with pytest.raises(PipelineError, match=r"train.distill.teacher: .*champion.*model.pt not found"):
        with_teacher(plain, distill("champion"), champion, names, config)
    _saved_model(champion, names, image_size=48)
    with caplog.at_level("INFO", logger="pipeline.training.loss"):
        criterion, teacher = with_teacher(plain, distill("champion"), champion, names, config)
    assert "distilling from" in caplog.text and "model.pt (48 px; alpha 0.7, temperature 4)" in caplog.text
    assert isinstance(criterion, DistillationLoss) and criterion.alpha == 0.7
    assert teacher(torch.zeros(2, 3, 32, 32)).shape == (2, 3)  # resized to its own 48 px inside
    other = _saved_model(tmp_path / "other.pt", ["a", "b", "x"])
    with pytest.raises(PipelineError, match="knows the classes"):
        with_teacher(plain, distill(str(other)), champion, names, config)


@pytest.mark.slow
def test_the_train_stage_distils_from_a_teacher_file(tmp_path):
    from helpers import train_params

    from pipeline.io import read_json
    from pipeline.stages import train

    teacher = _saved_model(tmp_path / "teacher.pt", [f"class_{k}" for k in range(3)])
    distill = {"teacher": str(teacher), "alpha": 1.0, "temperature": 2.0}
    losses = {}
    for name, section in (("plain", {}), ("distilled", {"distill": distill})):
        params = train_params(tmp_path / name, train={"epochs": 2, **section})
        train.run(params)
        losses[name] = read_json(params.paths.metrics("train"))["final_train_loss"]
    # Epoch 2 trains on images: against labels, a near-uniform random student scores about ln 3; against a
    # near-uniform random teacher, T^2 x KL is close to 0.
    assert losses["plain"] > 0.8 and losses["distilled"] < 0.2 * losses["plain"], losses
