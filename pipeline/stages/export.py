"""Stage: export. Assemble a folder that is usable on its own (ONNX models carrying their metadata, labels,
preprocessing, model card) and check, every time, that ONNX Runtime reproduces PyTorch on the test split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from pipeline import onnx_runtime as rt
from pipeline.config import Params
from pipeline.data.splits import read_split
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, read_json, write_json, write_text
from pipeline.models import TrainedModel, load_trained

LABELS_FILE = "labels.json"
PREPROCESS_FILE = "preprocess.json"
CARD_FILE = "model_card.md"


def run(params: Params) -> dict:
    paths = params.paths
    trained = load_trained(paths.model)
    fp32 = Path(paths.onnx_dir) / rt.FP32_FILE
    if not fp32.is_file():
        raise PipelineError(f"{fp32}: not found; run the quantize stage first (dvc repro quantize)")
    int8 = Path(paths.onnx_dir) / rt.INT8_FILE
    has_int8 = int8.is_file()
    test_paths, _ = read_split(paths.splits, paths.data_root, "test", trained.class_names)
    inputs = rt.load_inputs(test_paths, trained.data_config)
    opset = _opset(fp32)
    quantized = _read_optional(Path(paths.onnx_dir) / rt.QUANTIZE_REPORT)
    meta = model_metadata(trained, _temperature(paths.calibration), opset, serving(has_int8, quantized))

    with atomic_dir(paths.export_dir) as out:
        write_metadata(fp32, out / rt.FP32_FILE, meta)
        if has_int8:
            write_metadata(int8, out / rt.INT8_FILE, meta)
        write_json(out / LABELS_FILE, trained.class_names)
        write_json(out / PREPROCESS_FILE, trained.data_config)
        metrics = parity(trained.model, out / rt.FP32_FILE, inputs)
        metrics.update(opset=opset, fp32_mb=rt.file_mb(out / rt.FP32_FILE), served=meta["served"])
        write_json(paths.metrics("export"), metrics)
        if metrics["top1_agreement"] < params.export.min_top1_agreement:
            raise PipelineError(
                f"ONNX Runtime and PyTorch agree on top-1 for only {metrics['top1_agreement']:.2%} of "
                f"{metrics['n']} test images (max |logit diff| {metrics['max_abs_logit_diff']:.3g}), below "
                f"export.min_top1_agreement = {params.export.min_top1_agreement:g}; the export is not "
                f"written. Re-run quantize (dvc repro quantize) or try another export.opset"
            )
        write_text(out / CARD_FILE, model_card(trained, metrics, meta, paths.metrics_dir, quantized))
    return metrics


def parity(model: torch.nn.Module, onnx_path: Path, inputs: np.ndarray) -> dict[str, Any]:
    """Max |logit difference| and top-1 agreement of ONNX Runtime vs PyTorch on `inputs` (N, 3, S, S)."""
    model.eval()
    with torch.inference_mode():
        batches = [model(torch.from_numpy(inputs[i : i + 32])).numpy() for i in range(0, len(inputs), 32)]
    reference = np.concatenate(batches)
    onnx_logits = rt.logits(rt.session(onnx_path), inputs)
    return {
        "n": len(inputs),
        "max_abs_logit_diff": float(np.abs(onnx_logits - reference).max()),
        "top1_agreement": float(np.mean(onnx_logits.argmax(1) == reference.argmax(1))),
    }


def serving(has_int8: bool, quantized: dict[str, Any]) -> dict[str, str]:
    """Which model the export serves and why, from the quantize stage's decision (its report)."""
    decision = quantized.get("decision", {})
    if not has_int8:
        reason = decision.get("reason") or "the quantize stage shipped no INT8 model"
        return {"served": "fp32", "served_reason": reason, "int8_format": "none"}
    cpu = quantized.get("cpu", {})
    return {
        "served": "int8",
        "served_reason": decision.get("reason", "INT8 model present"),
        "int8_format": decision.get("format", "unknown"),
        "int8_checked_on": f"{cpu.get('model', 'unknown CPU')} (VNNI: {cpu.get('vnni')})",
    }


def model_metadata(
    trained: TrainedModel, temperature: float, opset: int, served: dict[str, str]
) -> dict[str, str]:
    """What a consumer of the ONNX file alone needs: classes, preprocessing, calibration temperature, and
    which of the two files the export serves (and why)."""
    cfg = trained.data_config
    return {
        "class_names": json.dumps(trained.class_names),
        "input_size": json.dumps(list(cfg["input_size"])),
        "mean": json.dumps(list(cfg["mean"])),
        "std": json.dumps(list(cfg["std"])),
        "interpolation": str(cfg["interpolation"]),
        "crop_pct": repr(float(cfg["crop_pct"])),
        "crop_mode": str(cfg.get("crop_mode", "center")),
        "temperature": repr(float(temperature)),
        "opset": str(opset),
        "backbone": str(trained.params["model"]["backbone"]),
        **served,
    }


def write_metadata(source: Path, target: Path, meta: dict[str, str]) -> Path:
    """Copy an ONNX model, replacing its metadata_props with `meta`."""
    model = onnx.load(str(source))
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(target))
    return target


def model_card(
    trained: TrainedModel, export: dict, meta: dict[str, str], metrics_dir: Path, quantized: dict[str, Any]
) -> str:
    """Markdown model card from the stages' metrics files (those present) and the training params."""
    figures = {
        name: _read_optional(Path(metrics_dir) / f"{name}.json") for name in ("validate", "split", "evaluate")
    }
    cfg, size = trained.data_config, trained.data_config["input_size"][-1]
    model_params, train_params = trained.params.get("model", {}), trained.params.get("train", {})
    lines = [
        f"# Model card: {model_params.get('backbone', '?')} image classifier",
        "",
        f"Classifies an image into one of {len(trained.class_names)} classes: "
        + ", ".join(f"`{name}`" for name in trained.class_names)
        + ".",
        "",
        "## Files",
        f"- `{rt.FP32_FILE}`: FP32 ONNX (opset {export['opset']}, dynamic batch), {export['fp32_mb']:.1f} MB",
        (
            f"- `{rt.INT8_FILE}`: static INT8 (QDQ, {meta['int8_format']}) ONNX, "
            f"{quantized.get('int8', {}).get('mb', 0):.1f} MB"
            if meta["served"] == "int8"
            else f"- no `{rt.INT8_FILE}`: FP32 only"
        ),
        f"- served by default (`predict`): **{meta['served'].upper()}**, because {meta['served_reason']}",
        f"- `{LABELS_FILE}`: class names in logit order; `{PREPROCESS_FILE}`: preprocessing",
        "- both ONNX files carry the same in their metadata_props, plus the calibration temperature "
        f"({meta['temperature']}: probabilities are softmax(logits / temperature))",
        "",
        "## Preprocessing",
        f"RGB; shorter side resized to floor({size} / {cfg['crop_pct']}) with {cfg['interpolation']} "
        f"interpolation; centre crop {size}x{size}; scaled to [0, 1]; "
        f"normalised with mean {cfg['mean']} and std {cfg['std']}; NCHW float32.",
        "",
        "## Data",
        *_section(figures["validate"], "validate"),
        *_section(figures["split"], "split"),
        "",
        "## Training",
        *_bullets({f"model.{k}": v for k, v in model_params.items()}),
        *_bullets({f"train.{k}": v for k, v in train_params.items() if not isinstance(v, dict)}),
        "",
        "## Test metrics (PyTorch, evaluate stage)",
        *_section(figures["evaluate"], "evaluate"),
        "",
        "## INT8 vs FP32 (quantize stage, this machine)",
        *_quantize_section(quantized),
        "",
        "## Export check",
        f"ONNX Runtime FP32 vs PyTorch on {export['n']} test images: top-1 agreement "
        f"{export['top1_agreement']:.2%}, max |logit difference| {export['max_abs_logit_diff']:.2g}.",
        "",
        "## Intended use",
        "Offline or batch classification of images like the training data (same kind of subject, framing "
        "and source), with `python -m pipeline predict` or `pipeline.predict.Predictor` (no torch needed).",
        "",
        "## Limits",
        "- It only knows the classes above: any input gets one of them, even if it shows none.",
        "- Accuracy was measured on a held-out split of the same source; other cameras, backgrounds, "
        "resolutions or class balance can lower it. Check on your own data before relying on it.",
        "- Probabilities are calibrated by the evaluate stage with one temperature; treat them as estimates.",
        "- Latency figures are from the machine that ran the pipeline.",
        "",
    ]
    return "\n".join(lines)


def _opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def _temperature(path: Path) -> float:
    """The evaluate stage's calibration temperature; 1.0 (raw softmax) when it wrote none."""
    if not Path(path).is_file():
        return 1.0
    return float(read_json(path).get("temperature", 1.0))


def _read_optional(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def _section(figures: dict[str, Any], stage: str) -> list[str]:
    if not figures:
        return [f"(no metrics/{stage}.json)"]
    return _bullets(_flatten(figures))


def _quantize_section(q: dict[str, Any]) -> list[str]:
    """Speed and size of each runtime, then every INT8 candidate against FP32 on the same val+test images."""
    if not q:
        return [f"(no {rt.QUANTIZE_REPORT})"]
    cpu = q.get("cpu", {})
    lines = [
        f"Measured on {cpu.get('model', 'an unknown CPU')} "
        f"(VNNI: {cpu.get('vnni')}, AVX-512: {cpu.get('avx512')}).",
        "",
        "| runtime | size (MB) | batch 1 (ms) | batch 32 (img/s) |",
        "| --- | --- | --- | --- |",
    ]
    for label, key in (
        ("PyTorch eager", "torch"),
        ("ONNX Runtime FP32", "fp32"),
        ("ONNX Runtime INT8", "int8"),
    ):
        if key in q:
            figures = q[key]
            lines.append(
                f"| {label} | {_number(figures.get('mb'), '.1f')} | {figures['batch1_ms']:.1f} "
                f"| {figures['batch32_img_per_s']:.0f} |"
            )
    if q.get("candidates"):
        lines += [
            "",
            f"INT8 candidates on {q['compared']['n']} val+test images (FP32 accuracy "
            f"{q['candidates'][0]['reference_accuracy']:.1%}):",
            "",
            "| format | agreement with FP32 | accuracy | worse / better | McNemar p | speed-up | verdict |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *(
                f"| {c['format']} | {c['agreement']:.1%} | {c['candidate_accuracy']:.1%} | {c['worse']} / "
                f"{c['better']} | {c['p_worse']:.3g} | {c['speedup_batch1']:.2f}x | "
                f"{'passed' if c['passed'] else 'rejected: ' + '; '.join(c['rejected_because'])} |"
                for c in q["candidates"]
            ),
        ]
    lines += ["", f"Decision: {q.get('decision', {}).get('reason', 'unknown')}."]
    return lines


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _bullets(figures: dict[str, Any]) -> list[str]:
    def show(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        return text if len(text) <= 120 else text[:117] + "..."

    return [f"- {key}: {show(value)}" for key, value in figures.items()]
