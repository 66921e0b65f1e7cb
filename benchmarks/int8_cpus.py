"""int8_cpus: each INT8 option's top-1 agreement with FP32 on the val+test images, on this CPU and as on an
AVX2-only CPU without VNNI (`qemu-x86_64 -cpu Haswell`, Debian's qemu-user), and its speed-up over FP32 at
batch 1 on this CPU.

Full mode measures a reproduced project (`--project DIR`: its params.yaml, trained model and splits, e.g. a
fresh clone after `./run.sh pipeline`); smoke mode trains a tiny one. The options: each format with the
stage's defaults (64 calibration images, minmax) but no quantization-aware fine-tune (QAT) and no search,
`u8s8_portable` with 4x the calibration images, with entropy and percentile calibration, with the sensitivity
search, with QAT, and with both (the stage's default). Under qemu the INT8 models
run on every val+test image; FP32 runs there on a few only (about 9 s an image emulated), to show that FP32's
answers do not depend on the CPU, so the agreement under qemu is counted against FP32's answers here.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import (
    SMOKE_PARAMS,
    Options,
    listed_params,
    machine,
    median,
    prepare_splits,
    result,
    target,
    workdir,
)
from benchmarks.inference import _ort_runner
from pipeline import stats, timing
from pipeline.config import Params, QuantizeParams
from pipeline.data.labels import SINGLE
from pipeline.models import load_trained
from pipeline.serving import onnx_runtime as rt
from pipeline.stages import quantize, train
from pipeline.stages.quantize import int8, search

NAME = "int8_cpus"
# option -> (format, quantize params changed, sensitivity search); QAT where qat_epochs is not 0
_PTQ = {"qat_epochs": 0}
OPTIONS = {
    "u8s8": ("u8s8", _PTQ, False),
    "u8s8_reduce_range": ("u8s8_reduce_range", _PTQ, False),
    "u8s8_portable": ("u8s8_portable", _PTQ, False),
    "u8s8_portable, 256 calibration images": ("u8s8_portable", {**_PTQ, "calibration_images": 256}, False),
    "u8s8_portable, entropy calibration": ("u8s8_portable", {**_PTQ, "calibration_method": "entropy"}, False),
    "u8s8_portable, percentile calibration": (
        "u8s8_portable",
        {**_PTQ, "calibration_method": "percentile"},
        False,
    ),
    "u8s8_portable + sensitivity search": ("u8s8_portable", _PTQ, True),
    "u8s8_portable + QAT": ("u8s8_portable", {}, False),
    "u8s8_portable + QAT + sensitivity search (default)": ("u8s8_portable", {}, True),
}
SHIPPED = "u8s8_portable + QAT + sensitivity search (default)"
SETTINGS = {
    "full": {"repeats": 9, "inner_repeats": 50, "fp32_on_haswell": 8, "haswell_images": None, "params": {}},
    "smoke": {
        "repeats": 1,
        "inner_repeats": 3,
        "fp32_on_haswell": 2,
        "haswell_images": 4,
        "listing": {"train_per_class": 6, "val_per_class": 2, "test_per_class": 4},
        "params": {**SMOKE_PARAMS, "train.epochs": 1, "quantize.calibration_images": 8},
    },
}
# Runs in the emulated CPU: each model's logits on the saved inputs, in batches of 32.
_RUN = """
import sys, numpy as np, onnxruntime as ort
inputs = np.load(sys.argv[1])
for model in sys.argv[2:]:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    n = len(np.load(model + ".rows.npy"))
    rows = [sess.run(["logits"], {"input": inputs[i : min(i + 32, n)]})[0] for i in range(0, n, 32)]
    np.save(model + ".haswell.npy", np.concatenate(rows))
"""


def run(opts: Options) -> dict[str, Any]:
    started, settings = machine(), opts.settings(SETTINGS)
    with workdir(opts, NAME) as root, _project(opts, root, settings) as params:
        trained = load_trained(params.paths.model)
        inputs, labels, n_val = quantize.compared_images(
            params.paths, trained.class_names, trained.data_config
        )
        models = root / "models"
        models.mkdir(exist_ok=True)
        fp32 = rt.export_onnx(
            trained.model, models / "fp32.onnx", trained.data_config["input_size"], params.export.opset
        )
        fp32_logits = rt.logits(rt.session(fp32), inputs)
        val = slice(0, n_val)
        probe = search.search_probe(
            inputs[val], labels[val], fp32_logits[val], params.quantize, params.base.seed
        )
        tuner = quantize.qat_tuner(params, trained, quantize.Decisions(SINGLE))
        tuned = functools.cache(lambda fmt: tuner.prepared(fmt, models)[0])  # one fine-tune per format
        built = {
            option: _build(option, params, trained, probe, (fp32, tuned), models / f"{i}.onnx")
            for i, option in enumerate(OPTIONS)
        }
        haswell = _on_haswell({"fp32": fp32, **built}, inputs, settings, root)
        rows = {
            option: _figures(path, fp32, (inputs, labels, fp32_logits), haswell.get(str(path)), settings)
            for option, path in built.items()
        }
    fp32_check = _fp32_check(fp32_logits, haswell.get(str(fp32)))
    results = {
        "compared_images": len(labels),
        "val_images": n_val,
        "options": rows,
        "fp32_on_haswell": fp32_check,
    }
    shipped = rows[SHIPPED]
    ratios = {"shipped_speedup_batch1": shipped["speedup_batch1"]}
    targets = {"agreement_here": target(shipped["agreement_here"], ">=", 0.98)}
    if "agreement_haswell" in shipped:
        targets["agreement_haswell"] = target(shipped["agreement_haswell"], ">=", 0.98)
    targets["speedup_batch1"] = target(shipped["speedup_batch1"], ">=", 1.5)
    settings.update(quantize=params.quantize.model_dump(), input_size=trained.data_config["input_size"])
    return result(NAME, opts, started, settings, results, ratios, targets, qemu=shutil.which("qemu-x86_64"))


@contextlib.contextmanager
def _project(opts: Options, root: Path, settings: dict[str, Any]):
    """Params of the project measured: --project's (read in that folder, as its stages do), else a tiny
    trained one under `root`."""
    if opts.project is not None:
        with contextlib.chdir(opts.project):
            yield Params.load("params.yaml")
        return
    params = listed_params(opts, root, settings["listing"], settings["params"])
    prepare_splits(params)
    train.run(params)
    yield params


def _build(option: str, params: Params, trained, probe: tuple, sources: tuple, target_path: Path) -> Path:
    """The INT8 model of `option`, quantized as the stage does from one of the `sources`: the FP32 export,
    or where `qat_epochs` says, the prepared copy fine-tuned for the format (a function of the format); and
    searched on the `probe` (val inputs, FP32's logits) where the option says."""
    fp32, tuned = sources
    fmt, changed, searched = OPTIONS[option]
    q = QuantizeParams(**{**params.quantize.model_dump(), **changed, "formats": [fmt]})
    calibration = quantize.calibration_images(
        params.paths, trained.class_names, trained.data_config, q, params.base.seed
    )
    with tempfile.TemporaryDirectory(prefix="int8-") as scratch:
        if q.qat_epochs:
            prepared = tuned(fmt)
        else:
            prepared = int8.prepare(fp32, Path(scratch) / "prepared.onnx", q.exclude_nodes)
        cache = Path(scratch) / "calibration.json"
        nodes, _ = search.quantize_searched(
            prepared, target_path, calibration, fmt, q, probe, cache, searched
        )
    (target_path.parent / f"{target_path.name}.nodes").write_text("\n".join(nodes))
    return target_path


def _figures(path: Path, fp32: Path, compared: tuple, haswell: np.ndarray | None, settings: dict) -> dict:
    """Agreement, accuracy and the mean KL divergence from FP32 here, agreement and accuracy under qemu, and
    the median batch-1 speed-up of `repeats` rounds."""
    inputs, labels, fp32_logits = compared
    here = rt.logits(rt.session(path), inputs)
    reference = fp32_logits.argmax(1)
    comparison = stats.compare(reference, here.argmax(1), labels)
    fp32_run, int8_run = (_ort_runner(rt.session(p)) for p in (fp32, path))
    speedups = []
    for _ in range(settings["repeats"]):
        fp32_ms, int8_ms = timing.adjacent_batch1_ms(fp32_run, int8_run, inputs, settings["inner_repeats"])
        speedups.append(fp32_ms / int8_ms)
    nodes = (path.parent / f"{path.name}.nodes").read_text().split()
    figures = {
        "fp32_nodes": nodes,
        "agreement_here": comparison.agreement,
        "divergence_here": search.kl_divergence(
            fp32_logits, here
        ),  # finer than agreement: every image counts
        "accuracy_here": comparison.candidate_accuracy,
        "fp32_accuracy": comparison.reference_accuracy,
        "speedup_batch1": median(speedups),
        "speedup_batch1_all": speedups,
        "mb": rt.file_mb(path),
    }
    if haswell is not None:
        rows = len(haswell)
        figures.update(
            agreement_haswell=float(np.mean(haswell.argmax(1) == reference[:rows])),
            accuracy_haswell=float(np.mean(haswell.argmax(1) == labels[:rows])),
            haswell_images=rows,
            same_logits_as_here=bool(np.array_equal(haswell, here[:rows])),
            max_logit_difference_from_here=float(np.abs(haswell - here[:rows]).max()),
        )
    return figures


def _on_haswell(models: dict[str, Path], inputs: np.ndarray, settings: dict, root: Path) -> dict[str, Any]:
    """str(model path) -> its logits under `qemu-x86_64 -cpu Haswell` (FP32 on the first few images only);
    {} without qemu."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        return {}
    limit = settings["haswell_images"] or len(inputs)
    np.save(root / "inputs.npy", inputs[:limit])
    for name, path in models.items():
        rows = settings["fp32_on_haswell"] if name == "fp32" else limit
        np.save(f"{path}.rows.npy", np.arange(min(rows, limit)))
    (root / "run_haswell.py").write_text(_RUN)
    args = [qemu, "-cpu", "Haswell", sys.executable, str(root / "run_haswell.py"), str(root / "inputs.npy")]
    subprocess.run([*args, *map(str, models.values())], check=True, capture_output=True)
    return {str(path): np.load(f"{path}.haswell.npy") for path in models.values()}


def _fp32_check(here: np.ndarray, haswell: np.ndarray | None) -> dict[str, Any]:
    """FP32's logits under qemu against this CPU's on the same images, and the smallest top-1 margin here:
    a difference far below it cannot change FP32's answer on any image."""
    top2 = np.sort(here, axis=1)[:, -2:]
    check = {"smallest_top1_margin_here": float((top2[:, 1] - top2[:, 0]).min())}
    if haswell is not None:
        check.update(
            images=len(haswell),
            max_logit_difference=float(np.abs(haswell - here[: len(haswell)]).max()),
            same_top1=bool(np.array_equal(haswell.argmax(1), here[: len(haswell)].argmax(1))),
        )
    return check
