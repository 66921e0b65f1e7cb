"""The export folder's model card: what the model is, its files and preprocessing, the data and training
behind it, its test figures, INT8 against FP32, and its limits, as markdown from the stages' JSON files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pipeline.config import PathsParams
from pipeline.io import read_optional_json
from pipeline.models import TrainedModel
from pipeline.pages.page import esc
from pipeline.serving import onnx_runtime as rt

# Backslash-escaped so that a class name shows as written: `|` would end a table cell, a trailing `\` escape
# the next `|`, brackets make links and images, the rest formatting. An `_` between two letters or digits
# never starts emphasis in CommonMark, so snake_case names are left readable.
_MARKDOWN_SYNTAX = re.compile(r"[\\`*\[\]|~]|(?<![^\W_])_|_(?![^\W_])")

_USE_AND_LIMITS = [
    "## Intended use",
    "Offline or batch classification of images like the training data (same kind of subject, framing "
    "and source), with `python -m pipeline predict` or `pipeline.serving.predict.Predictor` (no torch "
    "needed).",
    "",
    "## Limits",
    "- It only knows the classes above: any input gets one of them, even if it shows none; the unknown flag "
    "catches many such inputs, not all.",
    "- Accuracy was measured on a held-out split of the same source; other cameras, backgrounds, "
    "resolutions or class balance can lower it. Check on your own data before relying on it.",
    "- Probabilities are calibrated by the evaluate stage with one temperature; treat them as estimates.",
    "- Latency figures are from the machine that ran the pipeline.",
]


def model_card(
    trained: TrainedModel, export: dict, meta: dict[str, str], paths: PathsParams, quantized: dict[str, Any]
) -> str:
    """Markdown model card from the stages' metrics and details files (those present), the quantize report,
    the export's parity figures and metadata, and the training params."""
    figures = {
        name: read_optional_json(paths.metrics(name)) or {} for name in ("validate", "split", "evaluate")
    }
    names = trained.class_names
    sections = [
        [
            f"# Model card: {trained.params.get('model', {}).get('backbone', '?')} image classifier",
            "",
            f"Classifies an image into one of {len(names)} classes: " + ", ".join(map(_text, names)) + ".",
        ],
        _files(export, meta, quantized),
        _preprocessing(trained.data_config),
        [
            "## Data",
            *_section(figures["validate"], "validate"),
            *_section(figures["split"], "split"),
            *_class_table((read_optional_json(paths.details("split")) or {}).get("per_class", {})),
        ],
        _training(trained.params),
        ["## Test metrics (PyTorch, evaluate stage)", *_section(figures["evaluate"], "evaluate")],
        ["## Prediction sets and unknown inputs", *_trust(meta, figures["evaluate"], export)],
        ["## INT8 vs FP32 (quantize stage, this machine)", *_quantize_section(quantized)],
        [
            "## Export check",
            f"ONNX Runtime FP32 vs PyTorch on {export['n']} test images: top-1 agreement "
            f"{export['top1_agreement']:.2%}, max |logit difference| {export['max_abs_logit_diff']:.2g}.",
        ],
        _USE_AND_LIMITS,
    ]
    return "\n".join(line for section in sections for line in [*section, ""])


def _files(export: dict, meta: dict[str, str], quantized: dict[str, Any]) -> list[str]:
    int8 = (
        f"- `{rt.INT8_FILE}`: static INT8 (QDQ, {meta['int8_format']}) ONNX, "
        f"{quantized.get('int8', {}).get('mb', 0):.1f} MB"
        if meta["served"] == "int8"
        else f"- no `{rt.INT8_FILE}`: FP32 only"
    )
    return [
        "## Files",
        f"- `{rt.FP32_FILE}`: FP32 ONNX (opset {export['opset']}, dynamic batch), {export['fp32_mb']:.1f} MB",
        int8,
        f"- served by default (`predict`): **{meta['served'].upper()}**, because {meta['served_reason']}",
        f"- `{rt.LABELS_FILE}`: class names in logit order; `{rt.PREPROCESS_FILE}`: preprocessing",
        "- both ONNX files carry the same in their metadata_props, plus the calibration temperature "
        f"({meta['temperature']}: probabilities are softmax(logits / temperature))",
    ]


def _trust(meta: dict[str, str], evaluated: dict[str, Any], export: dict) -> list[str]:
    """The conformal guarantee in one plain sentence, and what the unknown flag means, from the thresholds
    in the export's metadata and the test figures of the evaluate stage."""
    if "conformal" not in meta or "unknown" not in meta:
        return ["(none: the evaluate stage calibrated no prediction sets or unknown-input detector)"]
    sets, flagged = json.loads(meta["conformal"]), json.loads(meta["unknown"])
    target = 1 - sets["alpha"]
    lines = [
        f"With `predict --sets`, each image's set of classes contains its true class for at least "
        f"{target:.0%} of images that come from the same source as the training data (on average over "
        f"images, not for every image or class; calibrated on {sets['n_calibration']} validation images, "
        f"method {sets['method']}).",
    ]
    if "coverage" in evaluated:
        lines[0] += (
            f" On the test split: coverage {evaluated['coverage']:.1%}, mean set size "
            f"{evaluated['set_size_mean']:.2f}, {evaluated['singleton_share']:.0%} single-class sets."
        )
    bank = (
        f", {export['feature_bank_mb']:.2f} MB feature bank `{rt.FEATURE_BANK_FILE}`"
        if flagged["detector"] == "knn"
        else ""
    )
    lines += [
        "",
        f"`predict` marks an image `unknown` when its {flagged['detector']} score is below "
        f"{flagged['threshold']:.4g}{bank}: the threshold keeps {flagged['tpr']:.0%} of validation images, "
        f"so about {1 - flagged['tpr']:.0%} of ordinary images are marked too, and an unusual image is not "
        "always caught.",
    ]
    return lines


def _preprocessing(cfg: dict[str, Any]) -> list[str]:
    size = cfg["input_size"][-1]
    return [
        "## Preprocessing",
        f"RGB; shorter side resized to floor({size} / {cfg['crop_pct']}) with {cfg['interpolation']} "
        f"interpolation; centre crop {size}x{size}; scaled to [0, 1]; "
        f"normalised with mean {cfg['mean']} and std {cfg['std']}; NCHW float32.",
    ]


def _training(params: dict[str, Any]) -> list[str]:
    model_params, train_params = dict(params.get("model", {})), params.get("train", {})
    weights = str(model_params.get("weights", ""))
    if weights.startswith("file:"):  # the file's name only: its folder is the build machine's (a user name)
        model_params["weights"] = f"file:{Path(weights.removeprefix('file:')).name}"
    return [
        "## Training",
        *_bullets({f"model.{k}": v for k, v in model_params.items()}),
        *_bullets({f"train.{k}": v for k, v in train_params.items() if not isinstance(v, dict)}),
    ]


def _section(figures: dict[str, Any], stage: str) -> list[str]:
    if not figures:
        return [f"(no metrics/{stage}.json)"]
    return _bullets(_flatten(figures))


def _class_table(per_class: dict[str, dict[str, int]]) -> list[str]:
    """Images per class (rows) and split (columns), from split's {split: {class: images}}."""
    splits = [split for split in ("train", "val", "test") if split in per_class]
    if not splits:
        return []
    header = ["", "| class | " + " | ".join(splits) + " |", "| --- |" + " ---: |" * len(splits)]
    rows = [
        f"| {_text(label)} | " + " | ".join(str(per_class[s][label]) for s in splits) + " |"
        for label in per_class[splits[0]]
    ]
    return header + rows


def _text(value: Any) -> str:
    """`value` as literal Markdown text on one line: Markdown syntax backslash-escaped, then HTML-escaped as
    the HTML pages do, so that a name such as `<img src=x onerror=...>` is shown, not run."""
    line = re.sub(r"[\r\n]+", " ", str(value))
    return esc(_MARKDOWN_SYNTAX.sub(lambda match: "\\" + match.group(), line))


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
            "| format | agreement with FP32 | accuracy | worse / better | McNemar p | speed-up "
            "| same on every x86 CPU | left in FP32 | verdict |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *(
                f"| {c['format']} | {c['agreement']:.1%} | {c['candidate_accuracy']:.1%} | {c['worse']} / "
                f"{c['better']} | {c['p_worse']:.3g} | {c['speedup_batch1']:.2f}x | "
                f"{'yes' if c.get('portable') else 'no'} | {', '.join(c.get('fp32_nodes', [])) or '-'} | "
                f"{'passed' if c['passed'] else 'rejected: ' + '; '.join(c['rejected_because'])} |"
                for c in q["candidates"]
            ),
        ]
    decision = q.get("decision", {})
    lines += ["", f"Decision: {decision.get('reason', 'unknown')}."]
    if decision.get("checked_for"):
        lines += ["", f"CPUs: {decision['checked_for']}."]
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
