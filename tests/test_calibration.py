"""Temperature scaling and expected calibration error on hand-computed and synthetic inputs."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.calibration import (
    expected_calibration_error,
    fit_temperature,
    log_loss,
    nll,
    reliability,
    softmax,
)


def test_ece_of_uniformly_overconfident_predictions_is_the_gap():
    # every row: confidence 0.9 for class 0; half the labels are 0 -> accuracy 0.5, gap 0.4
    probs = np.tile([0.9, 0.1], (10, 1))
    labels = np.array([0, 1] * 5)
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.4)


def test_ece_weights_bins_by_their_share():
    # bin (0.5, 0.6]: 2 rows, conf 0.55, both right -> gap 0.45, weight 0.5
    # bin (0.9, 1.0]: 2 rows, conf 0.95, one right  -> gap 0.45, weight 0.5
    probs = np.array([[0.55, 0.45], [0.45, 0.55], [0.95, 0.05], [0.95, 0.05]])
    labels = np.array([0, 1, 0, 1])
    rel = reliability(probs, labels, n_bins=10)
    assert rel.counts.tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 0, 2]
    assert rel.accuracy[5] == pytest.approx(1.0) and rel.accuracy[9] == pytest.approx(0.5)
    assert rel.confidence[5] == pytest.approx(0.55) and rel.confidence[9] == pytest.approx(0.95)
    assert rel.ece == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)


def test_reliability_bins_are_closed_on_the_right():
    probs = np.array([[0.5, 0.5], [1.0, 0.0]])
    rel = reliability(probs, np.array([0, 0]), n_bins=2)
    assert rel.counts.tolist() == [1, 1]  # 0.5 falls in (0, 0.5], 1.0 in (0.5, 1]
    assert rel.edges.tolist() == [0.0, 0.5, 1.0]


def test_perfectly_confident_and_right_has_zero_ece():
    probs = np.eye(3)[[0, 1, 2, 1]]
    assert expected_calibration_error(probs, np.array([0, 1, 2, 1]), n_bins=15) == pytest.approx(0.0)


def test_nll_matches_log_loss_of_softmax_and_softmax_keeps_argmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 4)) * 3
    labels = rng.integers(0, 4, size=50)
    assert nll(logits, labels, 2.0) == pytest.approx(log_loss(softmax(logits, 2.0), labels))
    np.testing.assert_allclose(softmax(logits).sum(axis=1), 1.0)
    assert (softmax(logits, 0.3).argmax(1) == softmax(logits, 7.0).argmax(1)).all()


def _synthetic(scale: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z), logits reported as scale * z: overconfident by exactly `scale` if > 1."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 5)) * 1.5
    p = softmax(z)
    labels = np.array([rng.choice(5, p=row) for row in p])
    return z * scale, labels


def test_temperature_recovers_the_overconfidence_and_lowers_ece():
    val_logits, val_labels = _synthetic(scale=3.0, n=4000, seed=1)
    fit = fit_temperature(val_logits, val_labels)
    assert fit.temperature == pytest.approx(3.0, rel=0.1)
    assert fit.nll_after < fit.nll_before
    assert fit.nll_after == pytest.approx(nll(val_logits, val_labels, fit.temperature))

    test_logits, test_labels = _synthetic(scale=3.0, n=4000, seed=2)
    before = expected_calibration_error(softmax(test_logits), test_labels, 15)
    after = expected_calibration_error(softmax(test_logits, fit.temperature), test_labels, 15)
    assert after < before / 2


def test_underconfident_logits_get_a_temperature_below_one():
    logits, labels = _synthetic(scale=0.4, n=3000, seed=3)
    fit = fit_temperature(logits, labels)
    assert 0 < fit.temperature < 1
    assert fit.temperature == pytest.approx(0.4, rel=0.15)


def test_fit_is_deterministic():
    logits, labels = _synthetic(scale=2.0, n=500, seed=4)
    assert fit_temperature(logits, labels) == fit_temperature(logits, labels)


def test_nll_reads_a_memory_mapped_split_a_block_at_a_time(tmp_path, monkeypatch):
    """evaluate's val logits are a memory-mapped file (600 MB at a million images of 1,000 classes), read some
    40 times by the temperature search: never converted whole to float64; memory bounded by the block."""
    import tracemalloc

    from pipeline import calibration

    monkeypatch.setattr(calibration, "BLOCK_ROWS", 512)
    rng = np.random.default_rng(0)
    logits = np.lib.format.open_memmap(tmp_path / "logits.npy", "w+", np.float32, (20_000, 500))
    logits[:] = rng.normal(0, 3, size=logits.shape)
    labels = rng.integers(0, 500, size=20_000)
    whole = np.asarray(logits, dtype=np.float64)  # the reference, all rows at once
    tracemalloc.start()
    blocked = nll(logits, labels, 1.7)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    reference = -np.mean(np.log(softmax(whole, 1.7))[np.arange(20_000), labels])
    assert blocked == pytest.approx(reference, rel=1e-12)
    assert peak < whole.nbytes / 2, peak / 2**20  # the whole float64 copy alone was 80 MB
