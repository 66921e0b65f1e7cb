"""openvino_vs_ort: OpenVINO's CPU runtime against ONNX Runtime on the exported model, FP32 and INT8: latency
at batch 1 and throughput at batch 32, with each runtime's test accuracy and the precision it really ran in.

The model is the `inference` benchmark's (default recipe, trained, quantized and exported by the real stages
on a Fashion-MNIST subset); OpenVINO reads the same ONNX files (`model.onnx`, and the QDQ `model.int8.onnx`,
which it runs as INT8). On CPUs with bf16, OpenVINO computes FP32 models in bf16 unless told otherwise, so it
runs twice on FP32: as it comes (`openvino_default`) and held to f32 (`openvino_fp32`). Runtimes take turns in
each of `repeats` rounds (`pipeline.timing.speed`: median of `inner_repeats` calls after a warm-up).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from benchmarks._common import Options, machine, median, result, summary, workdir
from benchmarks.inference import SETTINGS as INFERENCE_SETTINGS
from benchmarks.inference import exported_model
from pipeline import timing
from pipeline.serving import onnx_runtime as rt

NAME = "openvino_vs_ort"
SETTINGS = INFERENCE_SETTINGS  # the same model, data and repeats as `inference`
# runtime -> (exported file, OpenVINO inference precision hint; None: ONNX Runtime, "" for OpenVINO's default)
RUNTIMES = {
    "ort_fp32": (rt.FP32_FILE, None),
    "ort_int8": (rt.INT8_FILE, None),
    "openvino_fp32": (rt.FP32_FILE, "f32"),
    "openvino_default": (rt.FP32_FILE, ""),
    "openvino_int8": (rt.INT8_FILE, ""),
}


def run(opts: Options) -> dict[str, Any]:
    started, settings = machine(), opts.settings(SETTINGS)
    with workdir(opts, NAME) as root:
        params, trained, inputs, labels = exported_model(opts, root, settings)
        runners, precisions = {}, {}
        for name, (file, hint) in RUNTIMES.items():
            path = params.paths.export_dir / file
            runners[name], precisions[name] = _ort(path) if hint is None else _openvino(path, hint)
        speeds: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
        for _ in range(settings["repeats"]):
            for name, runner in runners.items():
                speeds[name].append(timing.speed(runner, inputs, settings["inner_repeats"]))
        accuracy = {name: _accuracy(runner, inputs, labels) for name, runner in runners.items()}

    results: dict[str, Any] = {
        name: {
            "batch1_ms": summary([s["batch1_ms"] for s in runs]),
            "batch32_img_per_s": summary([s["batch32_img_per_s"] for s in runs]),
            "test_accuracy": accuracy[name],
            "precision": precisions[name],
        }
        for name, runs in speeds.items()
    }
    ms = {name: median([s["batch1_ms"] for s in runs]) for name, runs in speeds.items()}
    ips = {name: median([s["batch32_img_per_s"] for s in runs]) for name, runs in speeds.items()}
    results.update(
        test_images=len(labels),
        fastest_batch1=min(ms, key=ms.get),
        fastest_batch32=max(ips, key=ips.get),
    )
    ratios = {
        f"{ov}_vs_{ort}_{batch}_speedup": value
        for ov, ort in (
            ("openvino_fp32", "ort_fp32"),
            ("openvino_default", "ort_fp32"),
            ("openvino_int8", "ort_int8"),
        )
        for batch, value in (("batch1", ms[ort] / ms[ov]), ("batch32", ips[ov] / ips[ort]))
    }
    settings.update(model=params.to_dict()["model"], input_size=trained.data_config["input_size"])
    return result(NAME, opts, started, settings, results, ratios, {})


def _ort(path) -> tuple[Any, str]:
    sess = rt.session(path)
    name = sess.get_inputs()[0].name
    return (lambda batch: sess.run(None, {name: batch})[0]), "int8" if path.name == rt.INT8_FILE else "fp32"


def _openvino(path, hint: str) -> tuple[Any, str]:
    """A compiled OpenVINO CPU model on every core (latency hint) and the precision it computes in."""
    import openvino as ov

    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": os.cpu_count() or 2}
    if hint:
        config["INFERENCE_PRECISION_HINT"] = hint
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # e.g. f32, bf16
    if path.name == rt.INT8_FILE:
        precision = f"int8 (QDQ), other layers {precision}"
    return (lambda batch: request.infer({0: batch})[0]), precision


def _accuracy(runner, inputs: np.ndarray, labels: np.ndarray, batch_size: int = 32) -> float:
    logits = np.concatenate([runner(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])
    return float(np.mean(logits.argmax(1) == labels))
