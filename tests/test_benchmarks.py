"""Every benchmark's --smoke mode runs on tiny data and writes a complete result JSON to the folder it is
given (never to benchmarks/results/)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import make_image
from PIL import Image

from benchmarks.__main__ import BENCHMARKS, main, run
from benchmarks._common import RESULTS_DIR, Options
from pipeline.config import Params

pytestmark = pytest.mark.slow  # a few minutes for all of them on 2 cores

CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 3, 10, 4


@pytest.fixture(scope="module")
def fashion_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for the Fashion-MNIST export: <root>/{train,test}/<class>/<n>.png, 28 px."""
    root = tmp_path_factory.mktemp("fashion")
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for k in range(CLASSES):
            for i in range(count):
                make_image(
                    root / split / f"class_{k}" / f"{i:05d}.png",
                    k,
                    size=28,
                    seed=(k * 100 + i) * 2 + len(split),
                )
    return root


@pytest.fixture(scope="module")
def results(
    tmp_path_factory: pytest.TempPathFactory, fashion_data: Path, request: pytest.FixtureRequest
) -> Iterator[_Results]:
    """Each benchmark's smoke result file, made on first use (ingest through the command line)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # the smoke runs check that the code works; one thread is robust on a busy CI box
    yield _Results(tmp_path_factory.mktemp("results"), fashion_data, request)
    torch.set_num_threads(threads)


class _Results:
    def __init__(self, out: Path, data: Path, request: pytest.FixtureRequest):
        self.out, self.data, self.request, self.files = out, data, request, {}

    def __getitem__(self, name: str) -> Path:
        if name not in self.files:
            before = _snapshot(RESULTS_DIR)
            if name == "ingest":
                main([name, "--smoke", "--out", str(self.out), "--data", str(self.data)])
                self.files[name] = self.out / f"{name}.json"
            else:
                # pipeline_overhead measures a copy of the session's reproduced tiny project (conftest).
                project = (
                    self.request.getfixturevalue("built_project") if name == "pipeline_overhead" else None
                )
                opts = Options(smoke=True, out_dir=self.out, data=self.data, project=project)
                self.files[name] = run(name, opts)
            assert _snapshot(RESULTS_DIR) == before, "a smoke run touched benchmarks/results/"
        return self.files[name]


def _snapshot(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*")} if folder.is_dir() else {}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_smoke_result_is_complete(results: _Results, name: str) -> None:
    path = results[name]
    assert path == path.parent / f"{name}.json" and path.parent != RESULTS_DIR
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == name
    assert payload["smoke"] is True
    machine = payload["machine"]
    assert machine["logical_cores"] >= 1 and machine["memory_gib"] > 0
    assert machine["cpu"] and machine["versions"]["torch"] and len(machine["load_average"]) == 3
    assert isinstance(payload["settings"]["params"], dict)
    assert payload["results"]
    for key, ratio in payload["ratios"].items():
        assert isinstance(ratio, float) and math.isfinite(ratio), key
    for key, goal in payload["targets"].items():
        assert set(goal) == {"target", "value", "met"} and isinstance(goal["met"], bool), key
        op, threshold = goal["target"].split()
        assert goal["met"] == (
            goal["value"] >= float(threshold) if op == ">=" else goal["value"] <= float(threshold)
        )


def _load(results: _Results, name: str) -> dict:
    return json.loads(results[name].read_text())


def test_ingest_counts_every_file_with_both_worker_counts(results: _Results) -> None:
    payload = _load(results, "ingest")
    files = CLASSES * (TRAIN_PER_CLASS + TEST_PER_CLASS)
    assert payload["results"]["files"] == files
    for workers in (1, 2):
        figures = payload["results"][f"workers_{workers}"]
        assert figures["ok"] == files
        assert figures["images_per_s"] == pytest.approx(files / figures["seconds"]["median"])
        assert 0 < figures["peak_pss_mib"] <= figures["peak_rss_mib"]
    speedup = (
        payload["results"]["workers_2"]["images_per_s"] / payload["results"]["workers_1"]["images_per_s"]
    )
    assert payload["ratios"]["speedup_ingest_validate"] == pytest.approx(speedup)


def test_train_throughput_compares_the_stage_with_both_baselines(results: _Results) -> None:
    payload = _load(results, "train_throughput")
    figures = payload["results"]
    assert figures["train_images"] == CLASSES * 6
    medians = {key: figures[key]["median"] for key in ("stage", "compute_limit", "classic")}
    assert all(value > 0 for value in medians.values())
    assert payload["ratios"]["stage_vs_compute_limit"] == pytest.approx(
        medians["stage"] / medians["compute_limit"]
    )
    assert payload["ratios"]["stage_vs_classic"] == pytest.approx(medians["stage"] / medians["classic"])


def test_linear_probe_reports_time_and_accuracy_of_both_ways(results: _Results) -> None:
    figures = _load(results, "linear_probe")["results"]
    for key in ("cached_features", "cached_features_warm", "backbone_every_epoch"):
        assert figures[key]["seconds"]["median"] > 0
        assert 0.0 <= figures[key]["val_acc"] <= 1.0


def test_inference_measures_three_runtimes_on_the_test_split(results: _Results) -> None:
    figures = _load(results, "inference")["results"]
    assert figures["test_images"] == CLASSES * TEST_PER_CLASS
    for runtime in ("torch_fp32", "ort_fp32", "ort_int8"):
        assert figures[runtime]["batch1_ms"]["median"] > 0
        assert figures[runtime]["batch32_img_per_s"]["median"] > 0
    assert figures["ort_int8"]["file_mb"] < figures["ort_fp32"]["file_mb"]


def test_fashion_mnist_records_the_recipe_and_the_official_test_split(results: _Results) -> None:
    payload = _load(results, "fashion_mnist")
    assert payload["results"]["test_images"] == CLASSES * TEST_PER_CLASS
    assert (
        payload["results"]["train_images"] == CLASSES * 6 and payload["results"]["val_images"] == CLASSES * 2
    )
    assert payload["recipe"]["model"]["backbone"] == "test_efficientnet"
    assert payload["recipe"]["train"]["epochs"] == 1
    assert len(payload["results"]["val_acc_by_epoch"]) == payload["results"]["epochs_run"] == 1
    assert 0 < payload["results"]["epochs_seconds"] < 60 * payload["results"]["wall_minutes"]
    assert set(payload["anchors"]) == {"svc_rbf", "two_conv_cnn", "resnet18"}


def test_transfer_vs_scratch_has_a_table_and_a_plot(results: _Results) -> None:
    payload = _load(results, "transfer_vs_scratch")
    rows = payload["results"]["table"]
    assert [row["fraction"] for row in rows] == [0.1, 1.0]
    assert [row["train_images"] for row in rows] == [CLASSES, CLASSES * 6]  # at least one image per class
    assert all(0.0 <= row[arm] <= 1.0 for row in rows for arm in ("pretrained", "scratch"))
    plot = results["transfer_vs_scratch"].parent / payload["plot"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pipeline_overhead_times_noop_repro_and_the_flow(results: _Results) -> None:
    figures = _load(results, "pipeline_overhead")["results"]
    assert figures["noop_dvc_repro_seconds"]["median"] > 0
    assert figures["noop"]["flow_seconds"]["median"] > figures["noop"]["flow_task_seconds"]["median"] > 0
    (forced,) = figures["forced"]["runs"]  # every stage ran in the flow; each command's own seconds came back
    assert forced["flow_seconds"] > forced["flow_task_seconds"] > forced["flow_command_seconds"] > 0
    for stage, times in forced["per_stage"].items():
        assert 0 < times["flow_command"] < times["flow_task"], stage


def test_ingest_photos_compares_both_decodes_and_catches_the_cut_photo(results: _Results) -> None:
    payload = _load(results, "ingest_photos")
    figures = payload["results"]
    assert figures["images"] == 12  # the cut photo is quarantined, the 12 whole ones reach the cache
    for arm in ("reduced", "full_resolution"):
        assert figures[arm]["images_per_s"] == pytest.approx(12 / figures[arm]["seconds"]["median"])
        assert figures[arm]["cache_seconds"]["median"] > 0
    assert 0 < figures["reduced"]["ingest_worker_peak_rss_mib"] < 1024
    assert figures["reduced"]["squares_cached_by_ingest"] == 12  # each whole photo decoded once, by ingest
    assert figures["decode_floor"]["images_per_s"] > figures["reduced"]["images_per_s"]  # decoding alone
    assert payload["targets"]["truncated_caught"]["met"] is True


def test_openvino_vs_ort_times_both_runtimes_in_both_precisions(results: _Results) -> None:
    payload = _load(results, "openvino_vs_ort")
    figures = payload["results"]
    assert figures["test_images"] == CLASSES * TEST_PER_CLASS
    for runtime in ("ort_fp32", "ort_int8", "openvino_fp32", "openvino_default", "openvino_int8"):
        assert (
            figures[runtime]["batch1_ms"]["median"] > 0
            and figures[runtime]["batch32_img_per_s"]["median"] > 0
        )
        assert 0.0 <= figures[runtime]["test_accuracy"] <= 1.0
    assert figures["openvino_fp32"]["precision"] == "f32" and figures["ort_int8"]["precision"] == "int8"
    assert figures["openvino_int8"]["precision"].startswith("int8")
    # OpenVINO held to f32 computes what ONNX Runtime FP32 does (a near-tie of the tiny model may flip one).
    gap = abs(figures["openvino_fp32"]["test_accuracy"] - figures["ort_fp32"]["test_accuracy"])
    assert gap <= 1 / figures["test_images"] + 1e-9
    assert figures["fastest_batch1"] in figures
    expected = figures["ort_fp32"]["batch1_ms"]["median"] / figures["openvino_fp32"]["batch1_ms"]["median"]
    assert payload["ratios"]["openvino_fp32_vs_ort_fp32_batch1_speedup"] == pytest.approx(expected)


def test_distill_runs_teacher_student_and_both_baselines(results: _Results) -> None:
    payload = _load(results, "distill")
    arms = payload["results"]
    assert set(arms) == {"teacher", "alone", "distilled", "alone_same_time"}
    assert arms["teacher"]["image_size"] == 48 and arms["alone"]["image_size"] == 32
    assert arms["distilled"]["teacher"] == arms["teacher"]["model"] and arms["alone"]["teacher"] == "none"
    assert arms["alone_same_time"]["epochs"] >= arms["alone"]["epochs"] == arms["distilled"]["epochs"] == 2
    assert all(0.0 <= arm["test_accuracy"] <= 1.0 and arm["train_seconds"] > 0 for arm in arms.values())
    ratio = arms["distilled"]["train_seconds"] / arms["alone"]["train_seconds"]
    assert payload["ratios"]["distilled_train_time_ratio"] == pytest.approx(ratio)


def test_audit_label_noise_scores_the_flagged_against_the_flipped_labels(results: _Results) -> None:
    pooled = _load(results, "audit_label_noise")["results"]
    (figures,) = pooled["by_seed"].values()
    assert figures["images"] == CLASSES * TRAIN_PER_CLASS
    assert figures["flipped"] == round(0.05 * CLASSES * TRAIN_PER_CLASS)
    assert 0 <= figures["true_positives"] <= min(figures["flagged"], figures["flipped"])
    assert figures["recall"] == pytest.approx(figures["true_positives"] / figures["flipped"])
    assert figures["audit_seconds"] > 0
    assert {key: pooled[key] for key in ("precision", "recall", "f1")} == pytest.approx(
        {key: figures[key] for key in ("precision", "recall", "f1")}
    )  # one draw in smoke mode: the pooled figures are its own
    tuned = figures["fine_tuned"]  # the same cleanlab call on k fine-tuned models' out-of-fold probabilities
    assert tuned["images_scored"] == figures["images"]  # every image was in exactly one fold's test split
    assert 0 <= tuned["true_positives"] <= min(tuned["flagged"], figures["flipped"])
    assert tuned["recall"] == pytest.approx(tuned["true_positives"] / figures["flipped"])
    assert 0.0 <= tuned["out_of_fold_accuracy_on_given_labels"] <= 1.0 and tuned["seconds"] > 0


def test_audit_near_duplicates_injects_copies_and_times_a_cold_and_a_warm_cache(results: _Results) -> None:
    payload = _load(results, "audit_near_duplicates")
    figures = payload["results"]
    (seed,) = figures["by_seed"].values()
    assert seed["injected_pairs"] == 5 and seed["images"] == CLASSES * (6 + 4) + 5
    assert seed["classes"] == CLASSES and seed["given_splits"] == ["train", "val"]  # copies vs originals
    assert set(seed["recall_by_alteration"]) == {"jpeg", "resize", "crop", "brightness", "flip"}
    assert 0.0 <= seed["recall"] <= 1.0 and seed["extra_pairs"] <= seed["flagged_pairs"]
    assert figures["recall"] == seed["recall"]  # one seed in smoke mode: the pooled figures are its own
    extra = figures["extra_pairs_per_1000_images"]
    assert extra == pytest.approx(1000 * seed["extra_pairs"] / seed["images"])
    assert figures["seconds"]["cold"]["median"] > 0 and figures["seconds"]["warm"]["median"] > 0
    approximate = seed["approximate_search"]  # the same data by the search sets above checks.ANN_ABOVE get
    assert 0.0 <= approximate["recall"] <= 1.0 and approximate["injected_pairs"] == 5
    assert figures["approximate_search"]["recall"] == approximate["recall"]


def test_trust_scores_every_detector_and_conformal_method_and_times_the_knn_options(
    results: _Results,
) -> None:
    payload = _load(results, "trust")
    figures = payload["results"]
    known = [f"class_{k}" for k in range(CLASSES - 1)]  # the last class held out as near-OOD
    assert figures["classes"] == {"in_distribution": known, "held_out_near_ood": [f"class_{CLASSES - 1}"]}
    assert figures["images"] == {"train": 12, "val": 8, "test": 4 * len(known), "near": 4, "far": 8}
    for method in ("aps", "raps", "lac"):
        for alpha in ("0.1", "0.05"):
            sets = figures["conformal"][method][alpha]
            assert 0.0 <= sets["coverage"] <= 1.0 and 0.0 <= sets["set_size_mean"] <= len(known)
    assert set(figures["detectors"]) == {"knn", "energy", "msp"}
    for detector in figures["detectors"].values():
        for ood in ("near", "far"):
            assert 0.0 <= detector[ood]["auroc"] <= 1.0 and 0.0 <= detector[ood]["fpr_at_95_tpr"] <= 1.0
    options = figures["knn_options"]  # fitted as evaluate fits them: the default's figures are the knn's
    shipped = next(o for o in options.values() if (o["dims"], o["k"]) == (128, 5) and o["bank_images"] == 12)
    assert shipped["val_threshold"] == figures["detectors"]["knn"]["val_threshold"]
    assert shipped["near_auroc"] == figures["detectors"]["knn"]["near"]["auroc"]
    assert options["pca128_plus_energy"]["shipped"] is False and "ms" not in options["pca128_plus_energy"]
    latency = figures["latency_batch1_ms"]
    assert latency["model"] > 0 and latency["conditions"]["cpu"] == payload["machine"]["cpu"]
    assert latency["conditions"]["load_average_1min"] >= 0 and "fp32" in latency["conditions"]["precision"]
    for name, timed in latency["detectors"].items():
        assert timed["ms"] > 0 and timed["share"] == pytest.approx(timed["ms"] / latency["model"]), name
        assert name == "default" or options[name]["ms"] == timed["ms"]
    assert payload["targets"]["detector_latency_share"]["value"] == latency["detectors"]["default"]["share"]
    assert set(payload["targets"]) >= {
        "near_ood_auroc_knn",
        "far_ood_auroc_knn",
        f"coverage_gap_{Params().evaluate.conformal.method}_alpha_0.1",  # the default method's
    }


def test_audit_scale_times_both_searches_and_fits_the_exponent(results: _Results) -> None:
    payload = _load(results, "audit_scale")
    assert payload["benchmark"] == "audit_scale" and payload["smoke"] is True
    figures, ratios = payload["results"], payload["ratios"]
    for path in ("approximate", "exact"):
        for n, size_run in figures[path].items():
            assert size_run["seconds"] > 0 and size_run["candidates"] >= int(n)  # each image: a nearest other
            assert 0 < size_run["peak_anonymous_mib"] <= size_run["peak_rss_mib"]
            kinds = ("similarity", "neighbours", "pixel_nearest")  # the planted copies: all found
            assert [size_run[f"recall_{kind}"] for kind in kinds] == [1.0, 1.0, 1.0]
    sizes = sorted(figures["approximate"], key=int)
    seconds = [figures["approximate"][n]["seconds"] for n in sizes]
    assert ratios["search_exponent"] == pytest.approx(math.log(seconds[1] / seconds[0]) / math.log(2))
    assert figures["pixel_check"]["seconds_per_candidate_pair"] > 0
    assert all(
        set(run["seconds"]) == {"k_fold_probe", "cleanlab", "drift"} for run in figures["labels"].values()
    )
    for goal in payload["targets"].values():
        assert set(goal) == {"target", "value", "met"} and isinstance(goal["met"], bool)


def test_scale_runs_every_stage_as_a_command_and_plots_seconds_against_images(results: _Results) -> None:
    payload = _load(results, "scale")
    (size,) = payload["results"]["sizes"].values()
    assert (size["images"], size["classes"]) == (2000, 10)
    assert set(size["stages"]) == {"ingest", "validate", "audit", "split", "train", "evaluate"}
    for stage, figures in size["stages"].items():
        assert figures["returncode"] == 0 and not figures["timed_out"], (stage, figures.get("error"))
        assert figures["seconds"] >= figures["stage_seconds"] > 0, stage  # wall time includes start-up
        assert figures["peak_rss_mib"] > 0 and figures["processes"] >= 1 and figures["output_bytes"] > 0
    assert size["stages"]["audit"]["cache_bytes_added"] > 0  # the image cache and the features
    assert payload["results"]["backbone"]["images_per_s"] > 0
    assert payload["results"]["growth"] == {"exponents": {}}  # one size: nothing to fit
    largest = payload["results"]["largest"]
    assert largest["minutes"] * 60 == pytest.approx(sum(f["seconds"] for f in size["stages"].values()))
    assert 0 < largest["minutes_without_network_passes"] <= largest["minutes"]
    assert set(payload["targets"]) == {"largest_peak_rss_gib", "largest_minutes_without_network_passes"}
    assert payload["settings"]["disk"]["size_gib"] > 0
    plot = results["scale"].parent / payload["plot"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scale_draws_every_class_at_its_own_period() -> None:
    """Classes that share a shape and texture differ by their period, plain fills included (168 of the
    million's classes were one plain shape and chained into a near-duplicate group of 163,092 images)."""
    from benchmarks import scale

    for texture in range(6):
        label = 6 * texture  # shape 0; the next period is 36 labels on
        drawn = [scale._motif(label + 36 * step, np.random.default_rng(7)) for step in (0, 1, 27)]
        assert all((drawn[0] != other).any(axis=2).mean() > 0.02 for other in drawn[1:]), texture


def test_scale_fits_the_exponent_and_reuses_the_images_it_made(tmp_path: Path) -> None:
    from benchmarks import scale

    assert scale.exponent(2.0, 200.0, 1_000, 10_000) == pytest.approx(2.0)
    log = (
        "INFO pipeline.progress: backbone features 1/1: 9000/9000 img (100%), 15 img/s, done in 1 min 04 s\n"
        "INFO pipeline.progress: audit thumbnails: 9000/9000 img (100%), 4073 img/s, done in 4 min 06 s\n"
        "INFO pipeline.progress: evaluate test: 9000/9000 img (100%), 2 img/s, done in 1 h 02 min\n"
    )
    assert scale._network_pass_seconds(log) == 64 + 3720  # the audit's own passes are not the network's
    ran = {
        "returncode": 0,
        "timed_out": False,
        "seconds": 60.0,
        "network_pass_seconds": 30.0,
        "peak_rss_mib": 512,
    }
    stages = {stage: dict(ran) for stage in scale.STAGES}
    assert scale._largest(stages) == {
        "complete": True,
        "peak_rss_gib": 0.5,
        "minutes": 6.0,
        "minutes_without_network_passes": 3.0,
    }
    stages["train"]["returncode"] = 1  # failed: evaluate never ran, so the minutes are short
    del stages["evaluate"]
    assert not scale._largest(stages)["complete"]
    assert scale.exponent(0.0, 5.0, 1_000, 10_000) is None
    spec = scale.make_images(tmp_path, 40, workers=1)
    files = sorted(tmp_path.rglob("*.png"))
    assert spec["classes"] == 10 and len(files) == 40
    lost = tmp_path / scale.image_path(11, 40)  # a folder left half-made is completed, the rest is kept
    lost.unlink()
    (tmp_path / "spec.json").unlink()
    before = files[0].stat().st_mtime_ns
    assert scale.make_images(tmp_path, 40, workers=1) == spec
    assert lost.read_bytes() == scale.png_bytes(scale.render(11, 40))
    assert files[0].stat().st_mtime_ns == before


def test_multilabel_trains_both_arms_with_the_same_seeds_and_judges_gaps_by_their_spread(
    results: _Results,
) -> None:
    payload = json.loads(results["multilabel"].read_text())
    runs, ratios = payload["results"]["runs"], payload["ratios"]
    assert [r["seed"] for r in runs["fine_tune"]] == [r["seed"] for r in runs["linear_probe"]] == [42, 7]
    assert all(
        0 <= r["map_macro"] <= 1 and 0 <= r["f1_macro_at_0_5"] <= 1 for rows in runs.values() for r in rows
    )
    fine, probe = ([r["map_macro"] for r in runs[arm]] for arm in ("fine_tune", "linear_probe"))
    assert ratios["fine_tune_minus_probe_map"] == pytest.approx(np.median(fine) - np.median(probe))
    spread = max(max(fine) - min(fine), max(probe) - min(probe))
    assert payload["results"]["noise"]["map_macro_spread"] == pytest.approx(spread)
    judged = payload["targets"]["fine_tune_beats_probe_map_beyond_noise"]
    assert judged["value"] == pytest.approx(ratios["fine_tune_minus_probe_map"] / max(spread, 1e-9))


def test_multilabel_mosaics_carry_the_classes_of_their_tiles(tmp_path: Path, fashion_data: Path) -> None:
    from benchmarks import multilabel

    figures = multilabel.make_mosaics(fashion_data, tmp_path, {"train": 12, "test": 6}, 0.5, seed=3)

    rows = list(csv.DictReader((tmp_path / "labels.csv").open()))
    assert [(r["split"], len(r["path"]) > 0) for r in rows].count(("train", True)) == 12
    contents = set()
    for row in rows:
        pixels = np.asarray(Image.open(tmp_path / row["path"]))
        tiles = [pixels[y : y + 28, x : x + 28] for y in (0, 28) for x in (0, 28)]
        holding = sum(tile.max() > 3 for tile in tiles)  # blank tiles hold noise of 0-3 grey levels only
        assert all(tile.max() > 0 for tile in tiles)  # the noise: no blank mosaic is all zeros
        labels = [label for label in row["labels"].split(";") if label]
        assert len(labels) <= holding and (holding == 0) == (not labels)
        contents.add(pixels.tobytes())
    assert len(contents) == len(rows)  # no two mosaics share their bytes, blank ones included
    for split in ("train", "test"):  # every class in every split, however few mosaics
        seen = {lb for r in rows if r["split"] == split for lb in r["labels"].split(";") if lb}
        assert seen == {f"class_{k}" for k in range(CLASSES)}
    assert figures["train"]["images"] == 12


def test_colour_recipe_pairs_each_arm_with_the_default_by_seed(results: _Results) -> None:
    from benchmarks._common import ARM_FIGURES as FIGURES
    from benchmarks.colour_recipe import ARMS

    payload = json.loads(results["colour_recipe"].read_text())
    judged = payload["results"]["smoke"]
    runs = judged["runs"]
    assert set(runs) == set(ARMS) and [r["seed"] for r in runs["default"]] == [42, 7]
    assert judged["split"]["classes"] == CLASSES and judged["split"]["train"] > 0
    for arm, rows in runs.items():
        assert [r["seed"] for r in rows] == [42, 7], arm
        assert all(1 <= r["best_epoch"] <= r["epochs_run"] <= 3 for r in rows)
        assert all(r["largest_gap"] >= r["gap_at_best"] for r in rows)
        if arm == "default":
            continue
        for key in FIGURES:
            paired = [r[key] - d[key] for r, d in zip(rows, runs["default"], strict=True)]
            gain = judged["gains"][arm][key]
            assert gain["runs"] == pytest.approx(paired)
            assert gain["median"] == pytest.approx(np.median(paired))
            assert gain["beyond_noise"] == (gain["median"] > judged["noise"][key] and min(paired) > 0)
            assert payload["ratios"][f"smoke: {arm} minus default, {key}"] == pytest.approx(gain["median"])


def test_budget_recipe_gives_every_arm_the_same_time_limit_and_pairs_it_by_seed(results: _Results) -> None:
    from benchmarks._common import ARM_FIGURES
    from benchmarks.budget_recipe import ARMS

    payload = json.loads(results["budget_recipe"].read_text())
    judged = payload["results"]
    runs = judged["runs"]
    assert set(runs) == set(ARMS) and judged["split"]["train"] > 0
    assert payload["settings"]["params"]["train.time_limit_min"] == judged["time_limit_min"]
    for arm, rows in runs.items():
        assert [r["seed"] for r in rows] == [42, 7], arm
        assert all(len(r["val_acc_by_epoch"]) == r["epochs_run"] == 4 for r in rows)  # every epoch fit
        if arm == "default":
            continue
        for key in ARM_FIGURES:
            paired = [r[key] - d[key] for r, d in zip(rows, runs["default"], strict=True)]
            assert judged["gains"][arm][key]["runs"] == pytest.approx(paired)
    assert payload["recipe"]["arms"]["linear + resizing 0.5-0.875"]["train.resize_end"] == 0.875


def test_emoji_groups_keep_fully_qualified_emoji_without_skin_tones(tmp_path: Path) -> None:
    from benchmarks.colour_recipe import emoji_groups

    test_file = tmp_path / "emoji-test.txt"
    test_file.write_text(
        "# group: Smileys & Emotion\n"
        "1F600 ; fully-qualified # grinning face\n"
        "263A ; unqualified # smiling face\n"
        "# group: People & Body\n"
        "1F44B ; fully-qualified # waving hand\n"
        "1F44B 1F3FD ; fully-qualified # waving hand: medium skin tone\n"
        "1F468 200D 1F373 ; fully-qualified # man cook\n",
        encoding="utf-8",
    )
    assert emoji_groups(test_file) == {
        "Smileys & Emotion": ["\U0001f600"],
        "People & Body": ["\U0001f44b", "\U0001f468\u200d\U0001f373"],
    }


def test_colour_recipe_runs_the_chosen_arms_beside_the_default(tmp_path: Path, fashion_data: Path) -> None:
    main(["colour_recipe", "--smoke", "--repeats", "1", "--arms", "crop_pct: 1.0", "--out", str(tmp_path),
          "--data", str(fashion_data)])  # fmt: skip
    payload = json.loads((tmp_path / "colour_recipe.json").read_text())
    assert set(payload["results"]["smoke"]["runs"]) == {"default", "crop_pct: 1.0"}
    assert payload["recipe"]["arms"] == {"default": {}, "crop_pct: 1.0": {"model.crop_pct": 1.0}}
    with pytest.raises(SystemExit):
        main(["colour_recipe", "--smoke", "--arms", "no such arm", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="arms of budget_recipe among default, linear to zero"):
        main(["budget_recipe", "--smoke", "--arms", "crop_pct: 1.0", "--out", str(tmp_path)])  # colour's arm
    with pytest.raises(SystemExit):
        main(["ingest", "--smoke", "--arms", "default", "--out", str(tmp_path)])
