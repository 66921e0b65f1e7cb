"""Unknown-input detectors on generated features: the val threshold keeps its share of in-distribution images,
and images from another distribution are flagged."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.serving import unknown
from pipeline.serving.unknown import Detector

K, C = 4, 32


def _features(n: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits (n, K), features (n, C), labels (n,)): features around one centre per class (the first K
    axes), a linear head on them; `shift` moves the images to centres on other axes, a distribution unlike
    train's."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, n)
    centres = np.eye(C)[K : 2 * K] if shift else np.eye(C)[:K]
    features = 3.0 * centres[labels] + rng.normal(scale=0.5, size=(n, C))
    head = np.eye(C)[:K].T * 2.0  # (C, K): class k reads feature k
    return features @ head, features, labels


@pytest.mark.parametrize(("kind", "dims"), [(kind, 0) for kind in unknown.DETECTORS] + [("knn", 8)])
def test_threshold_keeps_the_target_share_and_flags_another_distribution(kind, dims):
    _, train_features, _ = _features(2000, 0)
    val_logits, val_features, _ = _features(1000, 1)
    detector = unknown.fit(kind, (val_logits, val_features), train_features, 1.0, tpr=0.95, k=10, dims=dims)
    test_logits, test_features, _ = _features(4000, 2)
    kept = 1 - detector.unknown(detector.scores(test_logits, test_features, 1.0)).mean()
    # binomial sd of the val quantile (n = 1000) and the test share (n = 4000): ~0.008; 4 sd either way
    assert abs(kept - 0.95) < 0.035
    far_logits, far_features, _ = _features(1000, 3, shift=1.0)
    assert detector.unknown(detector.scores(far_logits, far_features, 1.0)).mean() > 0.9


def test_threshold_at_tpr_by_hand():
    scores = np.arange(1.0, 21.0)  # 20 scores: keep >= 95% -> at most one below the threshold
    assert unknown.threshold_at_tpr(scores, 0.95) == 2.0
    assert unknown.threshold_at_tpr(scores, 1.0) == 1.0


def test_knn_score_is_minus_the_kth_distance():
    bank = unknown.normalize(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])).astype(np.float16)
    query = np.array([[2.0, 0.0]])  # unit: (1, 0); distances 0, sqrt(2), 2
    assert unknown.knn_scores(query, bank, 1) == pytest.approx([0.0], abs=1e-6)
    assert unknown.knn_scores(query, bank, 2) == pytest.approx([-np.sqrt(2)], abs=1e-3)
    assert unknown.knn_scores(query, bank, 9) == pytest.approx([-2.0], abs=1e-3)  # k capped at the bank


def test_the_blocked_search_matches_brute_force_over_every_bank_row():
    rng = np.random.default_rng(0)
    bank = unknown.normalize(rng.normal(size=(2500, 6)))  # three blocks of bank rows: 1024, 1024, 452
    queries = rng.normal(size=(300, 6))  # two chunks of queries: 256, 44
    queries[-1] = bank[-1] * 3.0  # its nearest row is in the last block: distance 0
    distances = np.linalg.norm(unknown.normalize(queries)[:, None, :] - bank[None], axis=2)
    expected = -np.sort(distances, axis=1)[:, 4]
    np.testing.assert_allclose(unknown.knn_scores(queries, bank, 5), expected, atol=1e-5)
    assert unknown.knn_scores(queries[-1:], bank, 1) == pytest.approx([0.0], abs=1e-3)


def test_principal_axes_span_the_banks_subspace_and_are_capped_at_its_rank():
    rng = np.random.default_rng(1)
    plane = np.linalg.qr(rng.normal(size=(C, 2)))[0]  # (C, 2) orthonormal: the bank lies in this plane
    bank = unknown.normalize(rng.normal(size=(50, 2)) @ plane.T).astype(np.float16)
    axes = unknown.principal_axes(bank, 2)
    assert axes.shape == (C, 2) and axes.dtype == np.float32
    np.testing.assert_allclose(axes @ (axes.T @ plane), plane, atol=1e-3)  # the same plane
    assert unknown.principal_axes(bank[:3], 16).shape == (C, 2)  # its rank: 2 axes, not 16 arbitrary ones
    assert unknown.principal_axes(bank[:1], 16).shape == (C, 1)
    assert unknown.principal_axes(bank, 0) is None and unknown.principal_axes(bank, C) is None
    # On the axes, a query's score is the distance to its k-th nearest bank row in the plane, by hand:
    query = np.zeros((1, C))
    query[0, :] = plane[:, 0] + 0.5 * rng.normal(size=C)  # off the plane: its projection is what counts
    flat = unknown.normalize(query @ plane) @ plane.T
    by_hand = -np.sort(np.linalg.norm(bank.astype(np.float32) - flat, axis=1))[2]
    assert unknown.knn_scores(query, bank, 3, dims=2) == pytest.approx([by_hand], abs=2e-3)
    assert unknown.knn_scores(query, bank, 3) != pytest.approx([by_hand], abs=2e-3)  # all features: farther


def test_evaluate_and_predict_derive_the_same_search_from_the_shipped_bank():
    _, train_features, _ = _features(300, 4)
    val_logits, val_features, _ = _features(200, 5)
    fitted = unknown.fit("knn", (val_logits, val_features), train_features, 1.0, 0.95, 5, dims=6)
    loaded = Detector.from_settings(fitted.settings(), fitted.bank.copy(), "model.onnx")  # as predict loads
    assert loaded.settings() == fitted.settings() and fitted.settings()["dims"] == 6
    test_logits, test_features, _ = _features(100, 6)
    np.testing.assert_array_equal(
        loaded.scores(test_logits, test_features, 1.0), fitted.scores(test_logits, test_features, 1.0)
    )
    before = {key: value for key, value in fitted.settings().items() if key != "dims"}
    assert Detector.from_settings(before, fitted.bank, "old export").dims == 0  # searched all features


def test_fitting_the_threshold_keeps_the_search_it_was_scored_with(monkeypatch):
    """evaluate scores val a block at a time with the unfitted detector, then fits its threshold: the kNN
    index (the bank's principal axes, an eigendecomposition) comes along, not derived again."""
    _, train_features, _ = _features(300, 4)
    val_logits, val_features, _ = _features(200, 5)
    detector = unknown.unfitted("knn", train_features, 0.95, 5, dims=6)
    scores = detector.scores(val_logits, val_features, 1.0)
    monkeypatch.setattr(unknown.KnnIndex, "build", lambda *args: pytest.fail("the index was built again"))
    fitted = detector.fitted(scores)
    assert fitted._index is detector._index and detector.threshold == 0.0
    assert fitted.threshold == unknown.threshold_at_tpr(scores, 0.95)
    assert fitted.unknown(scores).mean() == pytest.approx(0.05, abs=0.01)


def test_settings_round_trip_and_bad_settings():
    detector = Detector("energy", 1.5, 0.95, 10)
    assert Detector.from_settings(detector.settings(), None, "test") == detector
    with pytest.raises(PipelineError, match="out of range"):
        Detector.from_settings({**detector.settings(), "dims": -1}, None, "model.onnx")
    with pytest.raises(PipelineError, match="not what evaluate writes"):
        Detector.from_settings({"detector": "knn"}, None, "model.onnx")
    with pytest.raises(PipelineError, match="out of range"):
        Detector.from_settings({**detector.settings(), "detector": "mahalanobis"}, None, "model.onnx")
    with pytest.raises(PipelineError, match="use one of knn, energy, msp"):
        unknown.fit("odin", (np.zeros((2, 2)), np.zeros((2, 2))), np.zeros((2, 2)), 1.0, 0.95, 1)
