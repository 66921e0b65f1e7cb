"""Stage: export. Assemble a folder that is usable on its own (ONNX models carrying their metadata, labels,
preprocessing, model card, the unknown-input detector's feature bank) and check, every time, that ONNX Runtime
reproduces PyTorch on the test split, logits and penultimate features both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from pipeline.calibration import label_thresholds
from pipeline.config import Params
from pipeline.data.labels import LabelSets
from pipeline.data.splits import read_split
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, read_optional_json, write_json, write_text
from pipeline.models import TrainedModel, load_trained
from pipeline.pages.export_page import write_export_page
from pipeline.pages.model_card import model_card
from pipeline.serving import onnx_runtime as rt
from pipeline.stages import Stage

STAGE = Stage(
    summary="Assemble the self-contained export folder and check ONNX/PyTorch parity.",
    params=("export", "base.task", "base.label_separator"),
    deps=(
        "model",
        "onnx_dir",
        "calibration",
        "feature_bank",
        "splits",
        "metrics:validate",
        "metrics:split",
        "metrics:evaluate",
        "metrics:quantize",
        "details:split",
    ),
    outs=("export_dir", "reports:export"),
    page="index.html",
)

CARD_FILE = "model_card.md"
# ONNX Runtime FP32 against PyTorch features, relative to the largest feature: float rounding stays ~1e-6.
_FEATURE_TOLERANCE = 1e-3


def run(params: Params) -> dict:
    paths = params.paths
    trained = load_trained(paths.model)
    fp32 = Path(paths.onnx_dir) / rt.FP32_FILE
    if not fp32.is_file():
        raise PipelineError(f"{fp32}: not found; run the quantize stage first (dvc repro quantize)")
    int8 = Path(paths.onnx_dir) / rt.INT8_FILE
    has_int8 = int8.is_file()
    sets = LabelSets.of(params.base.task, params.base.label_separator)
    test_paths, _ = read_split(paths.splits, paths.data_root, "test", trained.class_names, sets)
    inputs = rt.load_inputs(test_paths, trained.data_config)
    opset = _opset(fp32)
    quantized = read_optional_json(Path(paths.onnx_dir) / rt.QUANTIZE_REPORT) or {}
    calibration = read_optional_json(paths.calibration) or {}
    meta = model_metadata(
        trained, float(calibration.get("temperature", 1.0)), opset, serving(has_int8, quantized)
    )
    meta.update(trust_metadata(calibration))
    meta.update(label_set_metadata(trained.class_names, calibration, sets, paths.calibration))

    with atomic_dir(paths.export_dir) as out:
        write_metadata(fp32, out / rt.FP32_FILE, meta)
        if has_int8:
            write_metadata(int8, out / rt.INT8_FILE, meta)
        if params.export.fp16:
            write_metadata(rt.to_float16(fp32, out / rt.FP16_FILE), out / rt.FP16_FILE, meta)
        write_json(out / rt.LABELS_FILE, trained.class_names)
        write_json(out / rt.PREPROCESS_FILE, trained.data_config)
        reference, reference_features = torch_outputs(trained.model, inputs)
        onnx_logits, features = rt.outputs(rt.session(out / rt.FP32_FILE), inputs)
        metrics = agreement(reference, onnx_logits)
        metrics.update(opset=opset, fp32_mb=rt.file_mb(out / rt.FP32_FILE), served=meta["served"])
        metrics.update(feature_parity(reference_features, features, out / rt.FP32_FILE))
        metrics.update(_copy_bank(calibration, paths.feature_bank, out / rt.FEATURE_BANK_FILE))
        if params.export.fp16:  # checked on the CPU here; GPUs compute FP16 with their own rounding
            fp16 = parity(reference, out / rt.FP16_FILE, inputs)
            metrics.update(fp16_top1_agreement=fp16["top1_agreement"], fp16_mb=rt.file_mb(out / rt.FP16_FILE))
        write_json(paths.metrics("export"), metrics)
        if metrics["top1_agreement"] < params.export.min_top1_agreement:
            raise PipelineError(
                f"ONNX Runtime and PyTorch agree on top-1 for only {metrics['top1_agreement']:.2%} of "
                f"{metrics['n']} test images (max |logit diff| {metrics['max_abs_logit_diff']:.3g}), below "
                f"export.min_top1_agreement = {params.export.min_top1_agreement:g}; the export is not "
                f"written. Re-run quantize (dvc repro quantize) or try another export.opset"
            )
        write_text(out / CARD_FILE, model_card(trained, metrics, meta, paths, quantized))
    write_export_page(paths, paths.reports("export") / STAGE.page, paths.export_dir / CARD_FILE)
    return metrics


def torch_logits(model: torch.nn.Module, inputs: np.ndarray) -> np.ndarray:
    """The PyTorch model's logits on `inputs` (N, 3, S, S), in eval mode, 32 at a time."""
    return torch_outputs(model, inputs)[0]


def torch_outputs(model: torch.nn.Module, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The PyTorch model's (N, K) logits and (N, C) pooled features (the head's input) on `inputs`
    (N, 3, S, S), in eval mode, 32 at a time: what the ONNX export's two outputs must match."""
    model.eval()
    logits, features = [], []
    with torch.inference_mode():
        for i in range(0, len(inputs), 32):
            pooled = model.forward_features(torch.from_numpy(inputs[i : i + 32]))
            features.append(pooled.numpy())
            logits.append(model.head(pooled).numpy())
    return np.concatenate(logits), np.concatenate(features)


def parity(reference: np.ndarray, onnx_path: Path, inputs: np.ndarray) -> dict[str, Any]:
    """Max |logit difference| and top-1 agreement of ONNX Runtime on `inputs` vs PyTorch's `reference`
    logits on them (torch_logits)."""
    return agreement(reference, rt.logits(rt.session(onnx_path), inputs))


def agreement(reference: np.ndarray, onnx_logits: np.ndarray) -> dict[str, Any]:
    """Max |logit difference| and top-1 agreement of ONNX Runtime's logits with PyTorch's `reference`."""
    return {
        "n": len(reference),
        "max_abs_logit_diff": float(np.abs(onnx_logits - reference).max()),
        "top1_agreement": float(np.mean(onnx_logits.argmax(1) == reference.argmax(1))),
    }


def feature_parity(reference: np.ndarray, features: np.ndarray | None, onnx_path: Path) -> dict[str, float]:
    """Max |difference| of the ONNX model's `features` output (None: it has none) from PyTorch's pooled
    features `reference` on the same inputs: the unknown-input detector was fitted on the latter, so the
    export must output the same layer."""
    if features is None:
        raise PipelineError(
            f"{onnx_path}: the model outputs no features for the unknown-input detector; re-run quantize "
            "(dvc repro quantize), which exports them"
        )
    if features.shape != reference.shape:
        raise PipelineError(
            f"{onnx_path}: features {features.shape[1:]} but the model's penultimate layer is "
            f"{reference.shape[1:]}; re-run quantize (dvc repro quantize)"
        )
    worst = float(np.abs(features - reference).max())
    if worst > _FEATURE_TOLERANCE * max(float(np.abs(reference).max()), 1e-12):
        raise PipelineError(
            f"{onnx_path}: its features differ from PyTorch's penultimate layer by up to {worst:.3g} (more "
            f"than {_FEATURE_TOLERANCE:g} of their range), so the unknown-input detector fitted on those "
            "would not apply; re-run quantize (dvc repro quantize)"
        )
    return {"features_max_abs_diff": worst}


def trust_metadata(calibration: dict[str, Any]) -> dict[str, str]:
    """The conformal threshold and the unknown-input detector's settings that evaluate calibrated on val, as
    JSON metadata (none when evaluate wrote none: predict then offers neither)."""
    return {key: json.dumps(calibration[key]) for key in ("conformal", "unknown") if key in calibration}


def label_set_metadata(
    names: list[str], calibration: dict[str, Any], sets: LabelSets, where: Path
) -> dict[str, str]:
    """A multilabel task's decision rule for predict: `task` and each label's probability threshold (in the
    order of the class names), tuned by evaluate (`calibration`, read from `where`); nothing for one label
    per image.

    Raises:
        PipelineError: label sets without evaluate's thresholds for every label.
    """
    if not sets.multilabel:
        return {}
    return {
        "task": "multilabel",
        "thresholds": json.dumps(label_thresholds(calibration, names, where).tolist()),
        "label_separator": sets.separator,  # how a set is written in one cell (the champion gate reads it)
    }


def _copy_bank(calibration: dict[str, Any], bank: Path, target: Path) -> dict[str, Any]:
    """Copy the knn detector's feature bank into the export; its size for the metrics."""
    if calibration.get("unknown", {}).get("detector") != "knn":
        return {"feature_bank_mb": 0.0}
    if not bank.is_file():
        raise PipelineError(f"{bank}: the knn feature bank is missing; re-run evaluate (dvc repro evaluate)")
    shutil.copyfile(bank, target)
    return {"feature_bank_mb": rt.file_mb(target), "feature_bank_images": int(np.load(target).shape[0])}


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
        "int8_checked_for": decision.get("checked_for", "the CPU it was measured on"),
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


def _opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
