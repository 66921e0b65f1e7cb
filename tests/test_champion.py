"""Promotion gate: the decision rule, and promote() scoring the champion's export and the new one on the same
current test images with ONNX Runtime (real, hand-built ONNX classifiers), then copying (or not)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from helpers import make_image
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from pipeline.config import Params
from pipeline.errors import PipelineError
from pipeline.orchestration import champion
from pipeline.orchestration.champion import (
    CHAMPION_METRICS,
    GATE_PREDICTIONS,
    decide,
    drift_and_unknown,
    drift_table,
    promote,
)
from pipeline.stats import PairedMap, compare, mcnemar_p

PERFECT = (0, 1, 2)  # class k scored by the mean of input channel k: right on every `make_image` image
BLIND_TO_2 = (0, 1, None)  # class_2 never wins: wrong on every class_2 image
CONFUSES_2 = (0, 1, 0)  # class_2 scored as class_0: its images ranked last for class_2 (a low AP)


def _comparison(worse: int, better: int, same: int):
    """A paired comparison with `worse` images only the champion gets right, `better` only the new model."""
    labels = np.zeros(worse + better + same, dtype=int)
    champion = np.r_[np.zeros(worse), np.ones(better), np.zeros(same)]
    new = np.r_[np.ones(worse), np.zeros(better), np.zeros(same)]
    return compare(champion, new, labels)


@pytest.mark.parametrize(
    ("comparison", "promoted", "reason"),
    [
        (None, True, "no champion yet"),
        (_comparison(0, 0, 0), True, "cannot be scored"),
        (_comparison(3, 3, 194), True, "McNemar p"),  # equal
        (_comparison(2, 1, 197), True, "McNemar p"),  # 0.5 point worse: within the margin
        (_comparison(3, 1, 196), False, "< champion"),  # 1 point worse: beyond the margin
        (_comparison(60, 20, 9920), False, "McNemar: the new model is less accurate"),  # within, but sure
        (_comparison(0, 5, 10), True, "McNemar p 1 >= 0.05"),  # better
        (PairedMap(90, 4, 0.80, 0.79, 0.20, -0.02, 0.0, 2000), False, "new mAP 0.7900 < champion 0.8000"),
        (PairedMap(90, 4, 0.80, 0.797, 0.01, -0.005, -0.001, 2000), False, "paired bootstrap: the new"),
        (PairedMap(90, 4, 0.80, 0.797, 0.30, -0.01, 0.004, 2000), True, "and paired bootstrap p 0.3 >="),
    ],
)
def test_decide(comparison, promoted, reason):
    verdict, why = decide(comparison, margin=0.005, alpha=0.05)
    assert verdict is promoted and reason in why, why


def _onnx_classifier(
    folder: Path, class_names: list[str], channels: tuple, unknown: dict | None = None
) -> Path:
    """An export folder whose real ONNX model scores class k by the mean of input channel `channels[k]`
    (None: a constant -1, so that class never wins): GlobalAveragePool, Flatten, MatMul, Add; with
    `unknown`, the unknown-input detector's settings in its metadata, as export writes them."""
    weights = np.zeros((3, len(class_names)), dtype=np.float32)
    bias = np.zeros(len(class_names), dtype=np.float32)
    for k, channel in enumerate(channels):
        if channel is None:
            bias[k] = -10.0
        else:
            weights[channel, k] = 1.0
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weights"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(class_names)])],
        [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")],
    )
    folder.mkdir(parents=True, exist_ok=True)
    config = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}
    config["crop_pct"] = 1.0
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    # What the export stage writes into the model, and predict checks labels.json and preprocess.json against.
    meta = {key: value if isinstance(value, str) else json.dumps(value) for key, value in config.items()}
    if unknown:
        meta["unknown"] = json.dumps(unknown)
    helper.set_model_props(model, {"class_names": json.dumps(class_names), **meta})
    onnx.save(model, folder / "model.onnx")
    (folder / "labels.json").write_text(json.dumps(class_names))
    (folder / "preprocess.json").write_text(json.dumps(config))
    return folder


def _project(root: Path, **orchestrate) -> Params:
    paths = {"data_root": "images", "splits": "splits.csv", "model": "model.pt", "export_dir": "export"}
    return Params.from_dict({"paths": paths, "orchestrate": orchestrate})


def _write_splits(root: Path, params: Params, per_class: dict[str, int], test_every: int = 4) -> None:
    """class_k/img_i.png for the counts given (made if missing); every `test_every`-th image is test."""
    rows = []
    for label, n in per_class.items():
        for i in range(n):
            path = root / params.paths.data_root / label / f"img_{i:03d}.png"
            if not path.is_file():
                make_image(path, int(label.split("_")[1]), seed=1000 * int(label.split("_")[1]) + i)
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            split = "test" if i % test_every == 0 else "train"
            rows.append({"path": f"{label}/{path.name}", "label": label, "split": split, "sha256": sha})
    with (root / params.paths.splits).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "split", "sha256"])
        writer.writeheader()
        writer.writerows(rows)


def _candidate(
    root: Path, params: Params, classes: int, channels: tuple, name: bytes, unknown: dict | None = None
) -> None:
    """What the pipeline leaves behind: a trained model, an export folder and the stages' metrics."""
    paths = params.paths
    (root / paths.model).write_bytes(name)
    _onnx_classifier(root / paths.export_dir, [f"class_{k}" for k in range(classes)], channels, unknown)
    for stage in ("evaluate", "quantize", "export"):
        (root / paths.metrics(stage)).parent.mkdir(parents=True, exist_ok=True)
        (root / paths.metrics(stage)).write_text(json.dumps({"accuracy": 0.5} if stage == "evaluate" else {}))


def _record(root: Path, params: Params) -> dict:
    return json.loads((root / params.paths.champion_dir / CHAMPION_METRICS).read_text())


def _gate_rows(root: Path, params: Params) -> pd.DataFrame:
    return pd.read_csv(root / params.paths.reports_dir / "promote" / GATE_PREDICTIONS, dtype=str)


def _test_split(root: Path, params: Params) -> pd.DataFrame:
    table = pd.read_csv(root / params.paths.splits, dtype=str)
    return table[table["split"] == "test"].sort_values("path").reset_index(drop=True)


def test_the_gate_scores_champion_and_new_model_on_the_same_current_test_images(tmp_path):
    params = _project(tmp_path)
    _write_splits(tmp_path, params, {"class_0": 20, "class_1": 20, "class_2": 20})
    _candidate(tmp_path, params, 3, PERFECT, b"first")
    first = promote(params.paths, params.orchestrate, tmp_path)
    assert first["promoted"] and first["reason"] == "no champion yet" and first["champion"] is None
    assert first["new"] == 1.0 and first["images"] == 15
    assert _record(tmp_path, params)["gate"] == first

    # The data grows by 10% and a retrained model blind to class_2 arrives: both are scored on today's test
    # split, including the new test images the champion has never seen.
    _write_splits(tmp_path, params, {"class_0": 22, "class_1": 22, "class_2": 22})
    _candidate(tmp_path, params, 3, BLIND_TO_2, b"second")
    second = promote(params.paths, params.orchestrate, tmp_path)

    test, scored = _test_split(tmp_path, params), _gate_rows(tmp_path, params)
    assert list(scored["path"]) == list(test["path"]) and second["images"] == len(test) == 18
    assert (scored["champion"] == scored["label"]).all()  # the champion's export really ran on them
    assert list(scored["new"] == scored["label"]) == list(scored["label"] != "class_2")
    expected_fingerprint = hashlib.sha256("\n".join(sorted(test["sha256"])).encode()).hexdigest()
    assert second["test_sha256"] == expected_fingerprint
    assert (second["champion"], second["new"]) == (1.0, pytest.approx(12 / 18))
    assert (second["worse"], second["better"]) == (6, 0) and second["p_value"] == mcnemar_p(6, 0)
    assert not second["promoted"] and "< champion 1.0000" in second["reason"]
    assert (tmp_path / params.paths.champion_dir / params.paths.model.name).read_bytes() == b"first"

    again = promote(params.paths, params.orchestrate, tmp_path)  # the same gate twice: same figures
    assert again == second


def _energy_detector(threshold: float) -> dict:
    return {"detector": "energy", "threshold": threshold, "tpr": 0.95, "k": 1}


def test_the_gate_shows_the_audits_drift_next_to_the_share_of_new_images_marked_unknown(tmp_path):
    params = _project(tmp_path)
    _write_splits(tmp_path, params, {"class_0": 20, "class_1": 20, "class_2": 20})
    # Energy (logsumexp of the logits) of a make_image image under PERFECT: about 0.45; of a black one:
    # -1 + log 3 = 0.10. The champion marks images below 0.3 unknown, the new model none.
    _candidate(tmp_path, params, 3, PERFECT, b"first", _energy_detector(0.3))
    first = promote(params.paths, params.orchestrate, tmp_path)
    assert first["drift"]["new_test_images"] is None  # no champion yet: no image is new to it
    assert first["drift"]["champion_unknown_added_images"] is None

    for k in range(3):  # the data grows by images unlike the old ones: black (img_020 of each class is test)
        for i in (20, 21):
            path = tmp_path / params.paths.data_root / f"class_{k}" / f"img_{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32)).save(path)
    _write_splits(tmp_path, params, {"class_0": 22, "class_1": 22, "class_2": 22})
    audit = {"drifted": True, "drift_auc": 0.97, "prior_shift": 0.0, "label_issues": 0}
    (tmp_path / params.paths.metrics("audit")).write_text(json.dumps(audit))
    _candidate(tmp_path, params, 3, PERFECT, b"second", _energy_detector(-100.0))
    drift = promote(params.paths, params.orchestrate, tmp_path)["drift"]

    assert drift == {
        "drifted": True,
        "drift_auc": 0.97,
        "prior_shift": 0.0,
        "new_test_images": 3,  # img_020 of each class: not in the champion's splits record
        "champion_unknown_added_images": 1.0,
        "champion_unknown_other_images": 0.0,
        "new_unknown_added_images": 0.0,
        "new_unknown_other_images": 0.0,
    }
    table = drift_table(drift)
    assert "| True | 0.97 | 0.0 | 3 | champion model | 100.0% | 0.0% |" in table
    assert "| new model | 0.0% | 0.0% |" in table


def test_drift_and_unknown_splits_the_test_images_by_the_champions_record():
    test = pd.DataFrame(
        {
            "sha256": ["a", "b", "c", "d"],
            "champion_unknown": [False, True, True, True],
            "new_unknown": [None] * 4,  # an export without a detector
        }
    )
    drift = drift_and_unknown(test, {"a", "b", "z"}, {"drifted": False, "drift_auc": 0.51})
    assert drift["new_test_images"] == 2 and drift["prior_shift"] is None
    assert (drift["champion_unknown_added_images"], drift["champion_unknown_other_images"]) == (1.0, 0.5)
    assert drift["new_unknown_added_images"] is None and drift["new_unknown_other_images"] is None
    assert "| False | 0.51 | None | 2 | champion model | 100.0% | 50.0% |" in drift_table(drift)


def test_a_better_model_is_promoted_and_its_record_holds_the_gate(tmp_path):
    params = _project(tmp_path)
    _write_splits(tmp_path, params, {"class_0": 12, "class_1": 12, "class_2": 12})
    _candidate(tmp_path, params, 3, BLIND_TO_2, b"weak")
    promote(params.paths, params.orchestrate, tmp_path)
    _candidate(tmp_path, params, 3, PERFECT, b"strong")
    decision = promote(params.paths, params.orchestrate, tmp_path)
    assert decision["promoted"] and (decision["champion"], decision["new"]) == (pytest.approx(6 / 9), 1.0)
    assert (decision["worse"], decision["better"]) == (0, 3) and decision["p_value"] == 1.0
    record = _record(tmp_path, params)
    assert record["gate"] == decision and record["model_sha256"] == hashlib.sha256(b"strong").hexdigest()
    assert promote(params.paths, params.orchestrate, tmp_path)["reason"] == "already champion"


def test_by_map_a_loss_inside_the_margin_is_stopped_by_the_paired_bootstrap(tmp_path):
    params = _project(tmp_path, promote_metric="map", promote_margin=0.5)  # a margin the loss stays inside
    _write_splits(tmp_path, params, {"class_0": 24, "class_1": 24, "class_2": 24})
    _candidate(tmp_path, params, 3, PERFECT, b"strong")
    first = promote(params.paths, params.orchestrate, tmp_path)
    _candidate(tmp_path, params, 3, CONFUSES_2, b"weak")

    lost = promote(params.paths, params.orchestrate, tmp_path)

    assert first["metric"] == "mAP" and first["new"] == 1.0 and first["champion"] is None
    assert lost["metric"] == "mAP" and lost["champion"] == 1.0 and 0.5 < lost["new"] < 0.95
    assert not lost["promoted"] and lost["p_value"] < 0.05
    assert lost["reason"].startswith("paired bootstrap: the new model's mAP is lower"), lost["reason"]
    assert lost["worse"] > 0 and lost["better"] == 0  # the top-1 counts, reported beside it
    _candidate(tmp_path, params, 3, PERFECT, b"strong again")  # the champion's very export, retrained
    again = promote(params.paths, params.orchestrate, tmp_path)
    assert again["promoted"] and again["p_value"] == 1.0 and again["new"] == again["champion"] == 1.0


def test_an_added_class_is_compared_on_the_shared_classes_and_reported(tmp_path):
    params = _project(tmp_path)
    _write_splits(tmp_path, params, {"class_0": 12, "class_1": 12})
    _candidate(tmp_path, params, 2, (0, 1), b"two classes")
    promote(params.paths, params.orchestrate, tmp_path)
    _write_splits(tmp_path, params, {"class_0": 12, "class_1": 12, "class_2": 12})
    _candidate(tmp_path, params, 3, PERFECT, b"three classes")

    decision = promote(params.paths, params.orchestrate, tmp_path)

    assert decision["classes_added"] == ["class_2"] and decision["classes_removed"] == []
    assert decision["images"] == 6 and decision["new_on_added"] == 1.0  # 3 test images per class
    assert decision["promoted"] and "classes added ['class_2']" in decision["reason"]
    assert set(_gate_rows(tmp_path, params)["label"]) == {"class_0", "class_1", "class_2"}


def test_a_removed_class_is_named_and_the_shared_classes_decide(tmp_path):
    params = _project(tmp_path)
    _write_splits(tmp_path, params, {"class_0": 12, "class_1": 12, "class_2": 12})
    _candidate(tmp_path, params, 3, PERFECT, b"three classes")
    promote(params.paths, params.orchestrate, tmp_path)
    _write_splits(tmp_path, params, {"class_0": 12, "class_1": 12})
    _candidate(tmp_path, params, 2, (0, 1), b"two classes")

    decision = promote(params.paths, params.orchestrate, tmp_path)

    assert decision["classes_removed"] == ["class_2"] and decision["classes_added"] == []
    assert decision["images"] == 6 and decision["promoted"]
    assert decision["champion"] == decision["new"] == 1.0


def test_a_champion_with_the_same_export_is_scored_once_and_a_different_one_again(tmp_path, monkeypatch):
    params = _project(tmp_path)
    _write_splits(tmp_path, params, {"class_0": 12, "class_1": 12, "class_2": 12})
    _candidate(tmp_path, params, 3, PERFECT, b"one")
    promote(params.paths, params.orchestrate, tmp_path)
    scored, score = [], champion._score
    monkeypatch.setattr(
        champion,
        "_score",
        lambda test, model, folder, *args: scored.append(folder) or score(test, model, folder, *args),
    )
    _candidate(tmp_path, params, 3, PERFECT, b"two")  # retrained to the very same export

    same = promote(params.paths, params.orchestrate, tmp_path)

    assert scored == [tmp_path / params.paths.export_dir]
    assert same["champion"] == same["new"] == 1.0 and same["p_value"] == 1.0 and same["images"] == 9
    # Other labels make other predictions from the same weights: that champion is scored on its own. (Its
    # model.onnx names the labels too, so both change: predict refuses a labels.json its model contradicts.)
    champion_export = tmp_path / params.paths.champion_dir / "export"
    _onnx_classifier(champion_export, ["class_1", "class_0", "class_2"], PERFECT)
    other = promote(params.paths, params.orchestrate, tmp_path)
    assert scored[1:] == [tmp_path / params.paths.export_dir, champion_export]
    assert other["champion"] == pytest.approx(3 / 9) and (other["worse"], other["better"]) == (0, 6)


def test_a_champion_without_its_export_says_how_to_recover(tmp_path):
    params = _project(tmp_path)
    _write_splits(tmp_path, params, {"class_0": 8, "class_1": 8})
    _candidate(tmp_path, params, 2, (0, 1), b"one")
    promote(params.paths, params.orchestrate, tmp_path)
    (tmp_path / params.paths.champion_dir / "export" / "model.onnx").unlink()
    _candidate(tmp_path, params, 2, (0, 1), b"two")
    with pytest.raises(
        PipelineError, match=r"champion/export: no exported model to score; restore it, or del"
    ):
        promote(params.paths, params.orchestrate, tmp_path)


def test_missing_metrics_say_to_run_the_pipeline(tmp_path):
    with pytest.raises(PipelineError, match=r"evaluate\.json: metrics missing; run the pipeline"):
        promote(Params().paths, Params().orchestrate, tmp_path)
