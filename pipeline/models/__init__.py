"""Model factory: any timm backbone + our head, initialised from the chosen weight source.

The model is `ImageClassifier(backbone, head)`: the backbone returns pooled features (B, C), the head maps
them to logits (B, K). Keeping them apart is what lets linear probing cache features and train only the head.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from pipeline.config import ModelParams
from pipeline.errors import PipelineError
from pipeline.models.weights import (
    BUNDLED_CHECKPOINTS,
    fit_position_embedding,
    load_pretrained_state,
    load_tensors,
)

IMAGENET_CLASSES = 1000


class ImageClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)  # (B, C) pooled

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))  # (B, K) logits


class SEGate(nn.Module):
    """Squeeze-and-excitation over pooled features (Hu et al. 2018): each of the C features is scaled by a
    gate in (0, 1) computed from all of them through a C/r bottleneck. (B, C) -> (B, C)."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels), nn.Sigmoid()
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features * self.gate(features)


def _mlp(params: ModelParams, in_features: int, num_classes: int) -> list[nn.Module]:
    """Linear -> ReLU -> Dropout -> Linear."""
    return [
        nn.Linear(in_features, params.head_hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(params.drop_rate),
        nn.Linear(params.head_hidden, num_classes),
    ]


def build_head(params: ModelParams, in_features: int, num_classes: int) -> nn.Module:
    """Linear head, the classic MLP head, or the MLP behind a squeeze-and-excitation gate (`se_mlp`)."""
    heads = {
        "linear": lambda: [nn.Dropout(params.drop_rate), nn.Linear(in_features, num_classes)],
        "mlp": lambda: _mlp(params, in_features, num_classes),
        "se_mlp": lambda: [SEGate(in_features, params.se_reduction), *_mlp(params, in_features, num_classes)],
    }
    return nn.Sequential(*heads[params.head]())


def build_model(params: ModelParams, num_classes: int | None, pretrained: bool = True) -> ImageClassifier:
    """Backbone `params.backbone` with weights from `params.weights` and a fresh head for `num_classes`.

    num_classes=None keeps the pretrained ImageNet classifier as the head (to prove the weights are real).
    pretrained=False skips loading weights (e.g. before a checkpoint's own state dict is loaded).
    """
    try:
        network = timm.create_model(
            params.backbone, pretrained=False, num_classes=IMAGENET_CLASSES, **_size_kwargs(params)
        )
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise PipelineError(f"model.backbone: {exc}; list names with `timm.list_models()`") from None
    if pretrained:
        state = load_pretrained_state(params.backbone, params.weights, network)
        if state is not None:
            _load_strict(network, state, params.weights)
    if num_classes is None:
        imagenet_head = network.get_classifier()
        network.reset_classifier(0)
        return ImageClassifier(network, nn.Sequential(nn.Identity(), imagenet_head))
    network.reset_classifier(0)
    # MobileNetV3's pooled features pass its head conv: head_hidden_size (1280), not num_features (960).
    width = getattr(network, "head_hidden_size", network.num_features)
    return ImageClassifier(network, build_head(params, width, num_classes))


def _size_kwargs(params: ModelParams) -> dict[str, Any]:
    """Backbones built for one input size (ViTs: their position embeddings) are built for `image_size`."""
    cfg = timm.get_pretrained_cfg(params.backbone)
    fixed = cfg is not None and cfg.fixed_input_size
    return {"img_size": params.image_size} if fixed and params.image_size is not None else {}


def _load_strict(network: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load all backbone weights; a classifier of another size is expected and left as initialised."""
    own = network.state_dict()
    state = fit_position_embedding(state, network)
    classifier = {k for k in state if k.startswith(_classifier_prefix(network))}
    if any(state[k].shape != own.get(k, state[k]).shape for k in classifier):
        state = {k: v for k, v in state.items() if k not in classifier}
    result = network.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(_classifier_prefix(network))]
    if missing or result.unexpected_keys:
        raise PipelineError(
            f"model.weights ({source}): state dict does not fit {type(network).__name__}: "
            f"missing keys {_first(missing)}, unexpected keys {_first(result.unexpected_keys)}"
        )


def _first(keys: list[str], shown: int = 10) -> str:
    """A readable excerpt of a long key list."""
    return f"{keys[:shown]}{'...' if len(keys) > shown else ''}"


def _classifier_prefix(network: nn.Module) -> str:
    return network.pretrained_cfg.get("classifier", "classifier")


def resolve_data_config(params: ModelParams) -> dict[str, Any]:
    """Preprocessing from the backbone's pretrained config (size, mean/std, interpolation, crop).

    `model.image_size` changes the resolution and `model.crop_pct` the share of the resized image the
    center crop keeps (1.0: all of it); normalisation stays the backbone's.
    """
    cfg = timm.get_pretrained_cfg(params.backbone)
    if cfg is None:
        raise PipelineError(f"model.backbone: timm has no pretrained config for {params.backbone!r}")
    config = timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict())
    if params.image_size is not None:
        config["input_size"] = (config["input_size"][0], params.image_size, params.image_size)
    return {
        "input_size": list(config["input_size"]),
        "interpolation": config["interpolation"],
        "mean": list(config["mean"]),
        "std": list(config["std"]),
        "crop_pct": float(params.crop_pct if params.crop_pct is not None else config["crop_pct"]),
        "crop_mode": config.get("crop_mode", "center"),
    }


def check_backbone(params: ModelParams, project: Path = Path(".")) -> None:
    """Raise a PipelineError, one line naming the key, when `params` cannot give a model: a backbone timm does
    not know (with the closest names) or has no pretrained config for (the preprocessing comes from it), or
    weights that are not there. Reads timm's registry only, so nothing is built or downloaded; a `file:` path
    is relative to `project`."""
    name = params.backbone
    try:
        known = timm.is_model(name) and timm.get_pretrained_cfg(name) is not None
    except RuntimeError:  # timm: "Invalid pretrained tag (x) for resnet50."
        known = False
    if not known:
        names = timm.list_models(pretrained="." in name)  # with their pretrained tags, when `name` has one
        close = difflib.get_close_matches(name.lower(), names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise PipelineError(
            f"model.backbone: timm has no pretrained backbone {name!r}; {hint}(every name: python -c "
            f"'import timm; print(timm.list_models(pretrained=True))')"
        )
    if params.weights == "bundled" and name not in BUNDLED_CHECKPOINTS:
        raise PipelineError(
            f"model.weights: no bundled weights for {name!r}, only for {sorted(BUNDLED_CHECKPOINTS)}; use "
            "weights: file:<path>, hub (needs network) or none"
        )
    weights_file = Path(project, params.weights.removeprefix("file:"))
    if params.weights.startswith("file:") and not weights_file.is_file():
        raise PipelineError(
            f"model.weights: file {weights_file} not found; give a .pth or .safetensors state dict"
        )


@dataclass
class TrainedModel:
    """A trained model with everything needed to use it: class names, preprocessing, params."""

    model: ImageClassifier
    class_names: list[str]
    data_config: dict[str, Any]
    params: dict[str, Any]


def save_trained(
    path: Path, model: ImageClassifier, class_names: list[str], data_config: dict, params: dict
) -> None:
    """Write the model artifact: tensors and JSON-safe metadata only, so it loads with weights_only=True."""
    from pipeline.io import atomic_path

    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "class_names": list(class_names),
        "data_config": data_config,
        "params": params,
        "format_version": 1,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_trained(path: Path) -> TrainedModel:
    """Rebuild the model from its artifact (architecture from the params inside it)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: model artifact not found; run the train stage first (dvc repro train)")
    fix = "re-run the train stage (dvc repro train)"
    payload = load_tensors(path, fix)
    if not _is_artifact(payload):
        raise PipelineError(
            f"{path}: not a model artifact of this pipeline (it needs the keys {sorted(_ARTIFACT_KEYS)}, "
            f"params.model among them); {fix}"
        )
    model_params = ModelParams.model_validate(payload["params"]["model"])
    model = build_model(model_params, num_classes=len(payload["class_names"]), pretrained=False)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError:  # torch lists every mismatched tensor, over many lines
        raise PipelineError(f"{path}: its state dict does not fit its own model.params; {fix}") from None
    model.eval()
    return TrainedModel(model, payload["class_names"], payload["data_config"], payload["params"])


_ARTIFACT_KEYS = {"state_dict", "class_names", "data_config", "params"}


def _is_artifact(payload: object) -> bool:
    """What `save_trained` writes: the four keys, with the model section among the params."""
    return (
        isinstance(payload, dict)
        and _ARTIFACT_KEYS <= set(payload)
        and isinstance(payload["params"], dict)
        and "model" in payload["params"]
    )
