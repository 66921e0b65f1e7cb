"""Conformal prediction sets: hand-computed scores, the coverage guarantee on generated data across seeds, and
agreement with MAPIE where its method is the same deterministic one."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.calibration import softmax
from pipeline.errors import PipelineError
from pipeline.serving import conformal
from pipeline.serving.conformal import Conformal

K = 10


def _generated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, K) probabilities of a model about 60% accurate, and labels drawn from those probabilities, so the
    model is calibrated and the images exchangeable."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(n, K))
    probs = softmax(logits)
    labels = (probs.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return probs, labels


def test_scores_by_hand():
    probs = np.array([[0.5, 0.3, 0.2]])
    assert conformal.class_scores(probs, "lac")[0] == pytest.approx([0.5, 0.7, 0.8])
    assert conformal.class_scores(probs, "aps")[0] == pytest.approx([0.5, 0.8, 1.0])
    # raps, k_reg 1, lambda 0.1: ranks 1, 2, 3 pay 0, 0.1, 0.2
    assert conformal.class_scores(probs, "raps", k_reg=1, lam=0.1)[0] == pytest.approx([0.5, 0.9, 1.2])


def test_threshold_is_the_finite_sample_quantile():
    probs = np.tile([0.7, 0.3], (9, 1))
    labels = np.array([0] * 7 + [1] * 2)  # lac true-class scores: seven 0.3, two 0.7
    fit = conformal.calibrate(probs, labels, "lac", alpha=0.2)  # ceil(10 * 0.8) = 8th smallest
    assert fit.threshold == pytest.approx(0.7) and fit.n_calibration == 9
    sets = conformal.prediction_sets(np.array([[0.7, 0.3], [0.2, 0.8]]), fit)
    assert sets.tolist() == [[True, True], [False, True]]  # 1 - 0.2 = 0.8 > 0.7
    too_few = conformal.calibrate(probs[:3], labels[:3], "lac", alpha=0.2)  # ceil(4 * 0.8) = 4 > 3
    assert math.isinf(too_few.threshold)
    assert Conformal.from_json(too_few.to_json(), "test") == too_few


@pytest.mark.parametrize("method", conformal.METHODS)
def test_coverage_holds_across_seeds(method):
    """Split conformal gives E[coverage] in [1 - alpha, 1 - alpha + 1/(n + 1)] over calibration draws. With
    n = 500 calibration and 2000 test images one seed's coverage has sd ~0.015 (Beta(l, n + 1 - l) with
    l = ceil((n + 1)(1 - alpha)), plus binomial test noise), so the mean of 20 seeds has sd ~0.0034: it must
    lie within 4 sd of that interval, and no single seed more than 5 sd (0.075) from 1 - alpha."""
    alpha, n, seeds = 0.1, 500, 20
    coverages = []
    for seed in range(seeds):
        cal_probs, cal_labels = _generated(n, seed)
        test_probs, test_labels = _generated(2000, 1000 + seed)
        fit = conformal.calibrate(cal_probs, cal_labels, method, alpha, k_reg=1, lam=0.05)
        sets = conformal.prediction_sets(test_probs, fit)
        coverages.append(conformal.set_figures(sets, test_labels, [str(k) for k in range(K)])["coverage"])
    assert 1 - alpha - 4 * 0.0034 <= np.mean(coverages) <= 1 - alpha + 1 / (n + 1) + 4 * 0.0034
    assert max(abs(c - (1 - alpha)) for c in coverages) < 0.075


def test_aps_sets_adapt_and_lac_sets_are_smallest():
    cal_probs, cal_labels = _generated(2000, 1)
    test_probs, test_labels = _generated(4000, 2)
    sizes = {}
    for method in ("lac", "aps"):
        sets = conformal.prediction_sets(test_probs, conformal.calibrate(cal_probs, cal_labels, method, 0.1))
        sizes[method] = sets.sum(axis=1)
    assert sizes["lac"].mean() <= sizes["aps"].mean()
    confident = test_probs.max(axis=1) > 0.8
    assert sizes["aps"][confident].mean() < sizes["aps"][~confident].mean()


def test_set_figures_by_hand():
    sets = np.array([[True, False], [True, True], [False, True], [False, False]])
    figures = conformal.set_figures(sets, np.array([0, 1, 0, 1]), ["a", "b"])
    assert figures["coverage"] == 0.5 and figures["coverage_per_class"] == {"a": 0.5, "b": 0.5}
    assert figures["set_size_mean"] == 1.0 and figures["singleton_share"] == 0.5
    assert figures["empty_share"] == 0.25
    assert figures["coverage_by_size"] == {
        0: {"images": 1, "coverage": 0.0},
        1: {"images": 2, "coverage": 0.5},
        2: {"images": 1, "coverage": 1.0},
    }


def test_bad_settings_are_one_line_errors():
    with pytest.raises(PipelineError, match="use one of aps, raps, lac"):
        conformal.calibrate(np.eye(2), np.array([0, 1]), "top_k", 0.1)
    with pytest.raises(PipelineError, match="not what evaluate writes"):
        Conformal.from_json({"method": "aps"}, "model.onnx")
    with pytest.raises(PipelineError, match="out of range"):
        Conformal.from_json({**Conformal("aps", 0.1, 0.9, 100).to_json(), "alpha": 2.0}, "model.onnx")


def test_agrees_with_mapie():
    """MAPIE 1.x's LAC is the same method: identical sets. Its APS randomises the calibration scores
    (C_y - U p_y), so only its deterministic part, the true class's cumulated mass, is compared."""
    mapie_classification = pytest.importorskip("mapie.classification")
    from mapie.conformity_scores import APSConformityScore
    from sklearn.base import BaseEstimator, ClassifierMixin

    class Given(ClassifierMixin, BaseEstimator):
        """A prefit 'model' whose features are already its probabilities."""

        def fit(self, probs, labels):
            self.classes_ = np.arange(probs.shape[1])
            return self

        def predict_proba(self, probs):
            return probs

        def predict(self, probs):
            return probs.argmax(axis=1)

    cal_probs, cal_labels = _generated(1000, 3)
    test_probs, _ = _generated(2000, 4)
    mapie = mapie_classification.SplitConformalClassifier(
        estimator=Given().fit(cal_probs, cal_labels),
        confidence_level=0.9,
        conformity_score="lac",
        prefit=True,
    )
    mapie.conformalize(cal_probs, cal_labels)
    ours = conformal.prediction_sets(test_probs, conformal.calibrate(cal_probs, cal_labels, "lac", 0.1))
    assert np.array_equal(ours, mapie.predict_set(test_probs)[1][:, :, 0])

    cumulated, _ = APSConformityScore().get_true_label_cumsum_proba(cal_labels, cal_probs, np.arange(K))
    true = conformal.class_scores(cal_probs, "aps")[np.arange(len(cal_labels)), cal_labels]
    assert true == pytest.approx(cumulated.ravel(), abs=1e-12)


def test_scores_are_made_a_block_of_rows_at_a_time_with_the_same_sets_and_threshold(monkeypatch):
    """At a million images of 1,000 classes the test split's (295,000, 1,000) scores and their float64
    temporaries took 12 GB at once; a block of rows at a time they take a few blocks' worth."""
    import tracemalloc

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(400, 0.1), size=12_000)
    labels = rng.integers(0, 400, size=12_000)
    tracemalloc.start()
    calibrated = conformal.calibrate(probs, labels, "raps", 0.1, 2, 0.01)
    sets = conformal.prediction_sets(probs, calibrated)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    whole = conformal.class_scores(probs, "raps", 2, 0.01)  # all rows at once: the reference
    true = np.sort(whole[np.arange(len(labels)), labels])
    assert calibrated.threshold == true[math.ceil(12_001 * 0.9) - 1]
    assert np.array_equal(sets, whole <= calibrated.threshold)
    assert peak < 0.5 * whole.nbytes * 5, peak / 2**20  # five whole-size temporaries before: 192 MB
