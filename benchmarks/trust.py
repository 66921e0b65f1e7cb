"""trust: conformal prediction sets and unknown-input detectors on Fashion-MNIST, with the pipeline's own code
(`pipeline.serving.conformal`, `pipeline.serving.unknown`, ONNX export with features, temperature scaling).

In-distribution: the classes but the last `held_out` in name order (no choosing the easy ones); the model is
the default backbone (bundled ImageNet weights, frozen) exported to ONNX FP32, with a linear probe
(multinomial logistic regression, what `train.strategy: linear_probe` trains) on its pooled features of
`train` images per class. Temperature, conformal thresholds and detector thresholds (TPR 95%) come from
`val` images per class drawn from the official train split; everything is measured on the
official test images:
- coverage, mean set size and worst-class coverage at alpha 0.1 and 0.05 for every conformal method (and
  MAPIE's LAC sets compared with ours where MAPIE is installed);
- AUROC and FPR at 95% TPR of every detector, near-OOD = the held-out Fashion-MNIST classes' test images,
  far-OOD = scikit-learn's 8x8 digits upscaled to 28 px;
- the knn detector's options side by side (all features or the bank's principal axes, bank size, k; and,
  measured only, knn plus energy): AUROC near and far and the median ms each adds at batch 1 after the ONNX
  model (model, then detector, on one image, as predict runs them), with the CPU, precision and load average;
- the default detector's share of predict's latency at batch 1.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from benchmarks._common import (
    Options,
    class_files,
    ensure_fashion_mnist,
    machine,
    median,
    project_params,
    result,
    target,
    workdir,
)
from pipeline.calibration import fit_temperature, softmax
from pipeline.data.sampling import stratified_sample
from pipeline.models import build_model, resolve_data_config
from pipeline.preprocess import preprocess, preprocess_file
from pipeline.serving import conformal, unknown
from pipeline.serving import onnx_runtime as rt

NAME = "trust"
ALPHAS = (0.1, 0.05)
_MODEL = {"model.image_size": 128, "model.crop_pct": 1.0}  # 28 px images: the whole of each, upscaled
SETTINGS = {
    "full": {
        "repeats": 100,  # batch-1 latency runs per detector option
        "per_class": {"train": 300, "val": 200, "test": 300},
        "held_out": 2,
        "far_ood": 600,
        "params": _MODEL,
    },
    "smoke": {
        "repeats": 3,
        "per_class": {"train": 6, "val": 4, "test": 4},
        "held_out": 1,
        "far_ood": 8,
        "params": {"model.backbone": "test_efficientnet", "model.weights": "none", "model.image_size": 32},
    },
}


def run(opts: Options) -> dict[str, Any]:
    started, settings = machine(), opts.settings(SETTINGS)
    data = Path(opts.data if opts.smoke else ensure_fashion_mnist(opts.data))
    with workdir(opts, NAME) as root:
        params = project_params(root, settings["params"])
        known, held, files = _draw(data, settings["per_class"], settings["held_out"], params.base.seed)
        model = build_model(params.model, len(known)).eval()
        data_config = resolve_data_config(params.model)
        session = rt.session(rt.export_onnx(model, root / rt.FP32_FILE, data_config["input_size"], 18))
        features = {name: _features(session, paths, data_config) for name, (paths, _) in files.items()}
        features["far"] = _features(session, _digits(settings["far_ood"], params.base.seed), data_config)
        labels = {name: y for name, (_, y) in files.items()}
        probe = LogisticRegression(max_iter=2000).fit(features["train"], labels["train"])
        logits = {name: _logits(probe, f) for name, f in features.items()}
        temperature = fit_temperature(logits["val"], labels["val"]).temperature
        accuracy = float(np.mean(logits["test"].argmax(axis=1) == labels["test"]))
        sets = _conformal(logits, labels, temperature, known, params.evaluate.conformal)
        scored = (logits, features, labels, temperature, params.evaluate.unknown, params.base.seed)
        detectors, options = _detectors(*scored), _knn_options(*scored)
        one = preprocess_file(files["test"][0][0], data_config)[None]
        timed = {**options.pop("fitted"), "default": detectors["fitted"][params.evaluate.unknown.detector]}
        latency = _latency(session, one, timed, temperature, settings["repeats"])
    default, method = params.evaluate.unknown.detector, params.evaluate.conformal.method
    for name, figures in options.items():
        figures.update(latency["detectors"].get(name, {}))
    results = {
        "precision": "fp32 (ONNX Runtime features; probe, temperature and scores in float64/float32 numpy)",
        "classes": {"in_distribution": known, "held_out_near_ood": held},
        "images": {name: len(f) for name, f in features.items()},
        "test_accuracy": accuracy,
        "temperature": temperature,
        "conformal": sets,
        "detectors": detectors["figures"],
        "default_detector": default,
        "default_conformal_method": method,
        "latency_batch1_ms": latency,
        "knn_options": options,
        "feature_bank": {
            "images": len(timed["default"].bank) if timed["default"].bank is not None else 0,
            "float16_mb": timed["default"].bank.nbytes / 1e6 if timed["default"].bank is not None else 0.0,
            "knn_dims": params.evaluate.unknown.knn_dims,
            "knn_k": params.evaluate.unknown.knn_k,
        },
    }
    ratios = {
        f"{name}_near_auroc_vs_msp": figures["near"]["auroc"] / detectors["figures"]["msp"]["near"]["auroc"]
        for name, figures in detectors["figures"].items()
    }
    targets = _targets(sets[method], method, detectors["figures"][default], default, latency)
    return result(NAME, opts, started, settings, results, ratios, targets)


def _targets(
    sets: dict[str, Any], method: str, detector: dict[str, Any], default: str, latency: dict[str, Any]
) -> dict[str, Any]:
    """The issue's targets: coverage of the default conformal method within 1 point of 1 - alpha, the default
    detector's AUROC near and far, and its share of predict's latency at batch 1."""
    return {
        **{
            f"coverage_gap_{method}_alpha_{alpha:g}": target(
                abs(sets[str(alpha)]["coverage"] - (1 - alpha)), "<=", 0.01
            )
            for alpha in ALPHAS
        },
        f"near_ood_auroc_{default}": target(detector["near"]["auroc"], ">=", 0.90),
        f"far_ood_auroc_{default}": target(detector["far"]["auroc"], ">=", 0.98),
        "detector_latency_share": target(latency["detectors"]["default"]["share"], "<=", 0.10),
    }


def _logits(probe: LogisticRegression, features: np.ndarray) -> np.ndarray:
    """(N, K) float32 logits of the probe; with two classes scikit-learn gives one column, class 1's log-odds,
    which is the logits (0, log-odds)."""
    scores = probe.decision_function(features).astype(np.float32)
    return np.c_[np.zeros_like(scores), scores] if scores.ndim == 1 else scores


def _draw(
    data: Path, per_class: dict[str, int], held_out: int, seed: int
) -> tuple[list[str], list[str], dict[str, tuple[list[Path], np.ndarray]]]:
    """(known classes, held-out classes, {split: (files, labels)}): train and val drawn without overlap from
    the official train split, test and near-OOD ("near", label -1) from the official test split."""
    rng = np.random.default_rng(seed)
    train_files, test_files = class_files(data / "train"), class_files(data / "test")
    classes = sorted(train_files)
    known, held = classes[:-held_out], classes[-held_out:]
    split: dict[str, tuple[list[Path], list[int]]] = {s: ([], []) for s in ("train", "val", "test", "near")}
    for k, name in enumerate(known):
        order = rng.permutation(len(train_files[name]))
        picks = {"train": order[: per_class["train"]], "val": order[per_class["train"] :][: per_class["val"]]}
        for part, chosen in picks.items():
            split[part][0].extend(data / "train" / name / train_files[name][i] for i in chosen)
            split[part][1].extend([k] * len(chosen))
        chosen = rng.permutation(len(test_files[name]))[: per_class["test"]]
        split["test"][0].extend(data / "test" / name / test_files[name][i] for i in chosen)
        split["test"][1].extend([k] * len(chosen))
    for name in held:
        chosen = rng.permutation(len(test_files[name]))[: per_class["test"]]
        split["near"][0].extend(data / "test" / name / test_files[name][i] for i in chosen)
        split["near"][1].extend([-1] * len(chosen))
    return known, held, {part: (paths, np.array(y)) for part, (paths, y) in split.items()}


def _digits(count: int, seed: int) -> list[Image.Image]:
    """`count` of scikit-learn's 8x8 handwritten digits (0-16 grey levels) as 28 px grey images, the size and
    polarity of Fashion-MNIST (light object on black)."""
    digits = load_digits().images
    chosen = np.random.default_rng(seed).permutation(len(digits))[:count]
    return [
        Image.fromarray((digits[i] * 255 / 16).astype(np.uint8)).resize((28, 28), Image.BILINEAR)
        for i in chosen
    ]


def _features(session: Any, items: list, data_config: dict[str, Any], batch: int = 64) -> np.ndarray:
    """(N, C) pooled features of image files or PIL images, preprocessed as predict does, run in ONNX
    Runtime."""
    out = []
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        inputs = np.stack(
            [preprocess(i, data_config) if isinstance(i, Image.Image) else preprocess_file(i, data_config)
             for i in chunk]
        )  # fmt: skip
        out.append(rt.outputs(session, inputs, batch)[1])
    return np.concatenate(out)


def _conformal(
    logits: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    temperature: float,
    known: list[str],
    cfg: Any,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per method and alpha: test coverage (overall, worst class), mean set size, singleton share."""
    val_probs, test_probs = (softmax(logits[s], temperature) for s in ("val", "test"))
    figures: dict[str, dict[str, dict[str, Any]]] = {}
    for method in conformal.METHODS:
        figures[method] = {}
        for alpha in ALPHAS:
            fitted = conformal.calibrate(
                val_probs, labels["val"], method, alpha, cfg.raps_k_reg, cfg.raps_lambda
            )
            sets = conformal.set_figures(conformal.prediction_sets(test_probs, fitted), labels["test"], known)
            figures[method][str(alpha)] = {
                key: sets[key]
                for key in (
                    "coverage",
                    "set_size_mean",
                    "singleton_share",
                    "worst_class",
                    "worst_class_coverage",
                )
            }
            if method == "lac":
                agreement = _mapie_agreement(val_probs, test_probs, labels["val"], alpha)
                figures[method][str(alpha)]["mapie_identical_sets"] = agreement
    return figures


def _mapie_agreement(val_probs: np.ndarray, test_probs: np.ndarray, y_val: np.ndarray, alpha: float) -> Any:
    """Share of test images whose LAC set MAPIE's SplitConformalClassifier makes the same; None without
    MAPIE, or with fewer val images than it accepts (1 / alpha: the smoke mode's)."""
    if len(y_val) <= 1 / alpha:
        return None
    try:
        from mapie.classification import SplitConformalClassifier
        from sklearn.dummy import DummyClassifier
    except ImportError:
        return None

    class _Given(DummyClassifier):  # a prefit "model" whose inputs are already its probabilities
        def predict_proba(self, probs):
            return probs

    given = _Given().fit(val_probs, y_val)
    mapie = SplitConformalClassifier(given, confidence_level=1 - alpha, conformity_score="lac", prefit=True)
    mapie.conformalize(val_probs, y_val)
    theirs = mapie.predict_set(test_probs)[1][:, :, 0]
    ours = conformal.prediction_sets(test_probs, conformal.calibrate(val_probs, y_val, "lac", alpha))
    return float(np.mean((theirs == ours).all(axis=1)))


def _detectors(
    logits: dict[str, np.ndarray],
    features: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    temperature: float,
    cfg: Any,
    seed: int,
) -> dict[str, Any]:
    """Every detector fitted as evaluate fits it (bank: up to `bank_size` train images; threshold: TPR on
    val), scored on the test images against near- and far-OOD: AUROC, FPR at 95% TPR (on test), and what the
    val threshold does (test TPR, OOD share flagged)."""
    figures, fitted = {}, {}
    bank = stratified_sample(labels["train"], cfg.bank_size, seed)  # as evaluate draws it
    for kind in unknown.DETECTORS:
        val = (logits["val"], features["val"])
        detector = unknown.fit(
            kind, val, features["train"][bank], temperature, cfg.tpr, cfg.knn_k, cfg.knn_dims
        )
        fitted[kind] = detector
        score = {s: detector.scores(logits[s], features[s], temperature) for s in ("test", "near", "far")}
        figures[kind] = {
            "val_threshold": detector.threshold,
            "test_tpr_at_val_threshold": float(1 - detector.unknown(score["test"]).mean()),
            **{
                ood: {
                    **_separation(score, ood),
                    "flagged_at_val_threshold": float(detector.unknown(score[ood]).mean()),
                }
                for ood in ("near", "far")
            },
        }
    return {"figures": figures, "fitted": fitted}


def _separation(score: dict[str, np.ndarray], ood: str) -> dict[str, float]:
    """AUROC of in-distribution test images against `ood`'s, and the share of `ood` kept at 95% test TPR."""
    at_95 = np.quantile(score["test"], 0.05)
    auroc = roc_auc_score(
        np.r_[np.ones(len(score["test"])), np.zeros(len(score[ood]))], np.r_[score["test"], score[ood]]
    )
    return {"auroc": float(auroc), "fpr_at_95_tpr": float(np.mean(score[ood] >= at_95))}


# (name, dims, bank images or None for `unknown.bank_size`, k or None for `unknown.knn_k`)
_KNN_OPTIONS = (
    ("all_features", 0, None, None),
    ("pca64", 64, None, None),
    ("pca128", 128, None, None),
    ("pca256", 256, None, None),
    ("pca128_bank1000", 128, 1000, None),
    ("pca128_k1", 128, None, 1),
    ("pca128_k10", 128, None, 10),
    ("all_features_k10", 0, None, 10),
)


def _knn_options(
    logits: dict[str, np.ndarray],
    features: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    temperature: float,
    cfg: Any,
    seed: int,
) -> dict[str, Any]:
    """Near and far AUROC of each knn option (fitted as evaluate fits it), the fitted detectors under
    "fitted" for the latency runs; and knn plus energy, each standardised on val, summed (measured, not
    shipped: it needs both scores' val statistics in the export)."""
    options: dict[str, Any] = {"fitted": {}}
    val = (logits["val"], features["val"])
    for name, dims, images, k in _KNN_OPTIONS:
        bank = stratified_sample(labels["train"], images or cfg.bank_size, seed)
        k = k or cfg.knn_k
        detector = unknown.fit("knn", val, features["train"][bank], temperature, cfg.tpr, k, dims)
        score = {s: detector.scores(logits[s], features[s], temperature) for s in ("test", "near", "far")}
        options["fitted"][name] = detector
        options[name] = {"dims": dims, "bank_images": len(bank), "k": k, "val_threshold": detector.threshold}
        options[name].update({f"{ood}_auroc": _separation(score, ood)["auroc"] for ood in ("near", "far")})
    knn = options["fitted"]["pca128"]
    combined = {}
    for kind in (knn, unknown.Detector("energy", 0.0, cfg.tpr)):
        raw = {s: kind.scores(logits[s], features[s], temperature) for s in ("val", "test", "near", "far")}
        for s in ("test", "near", "far"):
            combined[s] = combined.get(s, 0.0) + (raw[s] - raw["val"].mean()) / raw["val"].std()
    options["pca128_plus_energy"] = {
        "dims": 128, "bank_images": len(knn.bank), "k": knn.k, "shipped": False,
        **{f"{ood}_auroc": _separation(combined, ood)["auroc"] for ood in ("near", "far")},
    }  # fmt: skip
    return options


def _latency(
    session: Any, one: np.ndarray, detectors: dict[str, unknown.Detector], temperature: float, repeats: int
) -> dict[str, Any]:
    """Median ms at batch 1 of the ONNX model and of each detector on its outputs, on one test image, the
    model run before each detector call as in predict (so the detector finds the caches as predict does); each
    detector's share is of the model's median over every loop. The detectors are the ones `Predictor` builds
    (the knn search index derived once, in float32)."""
    rt.outputs(session, one)  # warm-up
    model_ms: list[float] = []
    figures: dict[str, dict[str, float]] = {}
    for name, detector in detectors.items():
        detector_ms = []
        for _ in range(repeats):
            start = time.perf_counter()
            logits, features = rt.outputs(session, one)
            middle = time.perf_counter()
            detector.unknown(detector.scores(logits, features, temperature))
            model_ms.append((middle - start) * 1e3)
            detector_ms.append((time.perf_counter() - middle) * 1e3)
        figures[name] = {"ms": median(detector_ms), "p90_ms": float(np.percentile(detector_ms, 90))}
    model = median(model_ms)
    for figure in figures.values():
        figure["share"] = figure["ms"] / model
    return {
        "model": model,
        "detectors": figures,
        "conditions": {
            "cpu": machine()["cpu"],
            "precision": "model fp32 (ONNX Runtime, every core); detector float32 numpy",
            "load_average_1min": round(os.getloadavg()[0], 2),
        },
    }
