"""Model factory, weight sources and preprocessing: the bundled weights are real ImageNet weights."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from pipeline.config import ModelParams
from pipeline.errors import PipelineError
from pipeline.models import build_model, load_trained, resolve_data_config, save_trained
from pipeline.preprocess import preprocess

TINY = ModelParams(backbone="test_efficientnet", weights="none", image_size=32)


def _top5_names(model: torch.nn.Module, image: Image.Image, data_config: dict) -> list[str]:
    info = timm.data.ImageNetInfo()
    batch = torch.from_numpy(preprocess(image, data_config)).unsqueeze(0)
    with torch.inference_mode():
        top = model(batch).softmax(-1)[0].topk(5).indices.tolist()
    return [info.index_to_description(i).lower() for i in top]


@pytest.fixture(scope="module")
def imagenet_model():
    params = ModelParams(image_size=None)  # the default backbone at its pretrained 224 px
    model = build_model(params, num_classes=None).eval()
    return model, resolve_data_config(params)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("photo", "expected_words"),
    [
        ("skimage:chelsea", ("cat",)),
        ("skimage:coffee", ("espresso", "cup", "coffee")),
        ("sklearn:flower.jpg", ("daisy",)),
        ("sklearn:china.jpg", ("palace", "monastery", "temple", "pagoda")),
    ],
)
def test_bundled_weights_classify_real_photos(imagenet_model, photo, expected_words):
    """Through our own factory and preprocessing, real photos land in the ImageNet classes they show."""
    source, name = photo.split(":")
    if source == "skimage":
        import skimage.data

        array = getattr(skimage.data, name)()
    else:
        from sklearn.datasets import load_sample_image

        array = load_sample_image(name)
    model, data_config = imagenet_model
    top1 = _top5_names(model, Image.fromarray(array), data_config)[0]
    assert any(word in top1 for word in expected_words), f"{photo}: top-1 was {top1!r}"


def test_preprocessing_comes_from_the_backbone_config():
    config = resolve_data_config(ModelParams(image_size=None))
    # EfficientNet-Lite's TF weights use mean = std = 0.5, not the usual ImageNet statistics.
    assert config["mean"] == [0.5, 0.5, 0.5] and config["std"] == [0.5, 0.5, 0.5]
    assert config["input_size"] == [3, 224, 224] and config["interpolation"] == "bicubic"
    assert resolve_data_config(ModelParams(image_size=96))["input_size"] == [3, 96, 96]


def test_crop_pct_overrides_the_backbone_and_one_keeps_the_border():
    """model.crop_pct replaces the backbone's eval crop; at 1.0 a stripe on the image's edge is still seen."""
    default = resolve_data_config(ModelParams(image_size=32))
    whole = resolve_data_config(ModelParams(image_size=32, crop_pct=1.0))
    assert default["crop_pct"] == 0.875 and whole["crop_pct"] == 1.0
    array = np.zeros((28, 28, 3), dtype=np.uint8)
    array[:, :2] = 255  # a white stripe along the left edge, as a garment's sleeve in Fashion-MNIST
    image = Image.fromarray(array)
    # Normalised with mean = std = 0.5: white is 1.0, black -1.0; the default crop keeps only the blur.
    assert preprocess(image, whole)[0, :, 0].min() > 0.9
    assert preprocess(image, default)[0, :, 0].max() < 0.5


def test_preprocess_matches_timm_eval_transform():
    config = resolve_data_config(TINY)
    transform = timm.data.create_transform(
        input_size=tuple(config["input_size"]),
        interpolation=config["interpolation"],
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        crop_pct=config["crop_pct"],
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    np.testing.assert_allclose(preprocess(image, config), transform(image).numpy(), atol=1e-6)


@pytest.mark.parametrize("head", ["linear", "mlp", "se_mlp"])
def test_build_model_head_shapes(head):
    model = build_model(TINY.model_copy(update={"head": head, "head_hidden": 16}), num_classes=4)
    features = model.forward_features(torch.zeros(2, 3, 32, 32))
    assert features.shape == (2, model.backbone.head_hidden_size)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


def test_se_mlp_head_gates_the_pooled_features_and_its_gate_learns(tmp_path):
    from pipeline.serving import onnx_runtime as rt

    params = TINY.model_copy(update={"head": "se_mlp", "head_hidden": 16, "se_reduction": 4})
    torch.manual_seed(0)
    model = build_model(params, num_classes=4)
    gate = model.head[0].gate
    width = model.backbone.head_hidden_size
    assert [m.weight.shape for m in gate if isinstance(m, torch.nn.Linear)] == [
        (width // 4, width),
        (width, width // 4),
    ]
    features = torch.rand(3, width)
    model.eval()  # no dropout
    expected = model.head[1:](features * torch.sigmoid(gate[2](torch.relu(gate[0](features)))))
    torch.testing.assert_close(model.head(features), expected)  # gate, then the MLP
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())
    onnx_path = rt.export_onnx(model, tmp_path / "se.onnx", [3, 32, 32], opset=18)
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    with torch.inference_mode():
        np.testing.assert_allclose(
            rt.logits(rt.session(onnx_path), x), model(torch.from_numpy(x)).numpy(), atol=1e-4
        )


def test_file_weights_round_trip_and_mismatch(tmp_path):
    donor = timm.create_model("test_efficientnet", num_classes=1000)
    path = tmp_path / "weights.pth"
    torch.save(donor.state_dict(), path)
    model = build_model(TINY.model_copy(update={"weights": f"file:{path}"}), num_classes=3)
    torch.testing.assert_close(model.backbone.conv_stem.weight, donor.conv_stem.weight)

    broken = {k: v for k, v in donor.state_dict().items() if not k.startswith("conv_stem")}
    broken["extra.weight"] = torch.zeros(1)
    torch.save(broken, path)
    with pytest.raises(
        PipelineError, match=r"missing keys \['conv_stem.weight'\].*unexpected keys \['extra.weight'\]"
    ):
        build_model(TINY.model_copy(update={"weights": f"file:{path}"}), num_classes=3)


def test_weight_source_errors_say_what_to_do(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        build_model(TINY.model_copy(update={"weights": f"file:{tmp_path / 'nope.pth'}"}), num_classes=3)
    with pytest.raises(PipelineError, match="no bundled weights for 'test_efficientnet'"):
        build_model(TINY.model_copy(update={"weights": "bundled"}), num_classes=3)
    with pytest.raises(PipelineError, match="model.backbone"):
        build_model(TINY.model_copy(update={"backbone": "no_such_net"}), num_classes=3)


def test_hub_offline_fails_fast_with_file_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError, match="file:<path"):
        build_model(TINY.model_copy(update={"weights": "hub"}), num_classes=3)


def test_trained_artifact_round_trip(tmp_path):
    model = build_model(TINY, num_classes=3).eval()
    path = tmp_path / "model.pt"
    save_trained(
        path, model, ["a", "b", "c"], resolve_data_config(TINY), {"model": TINY.model_dump(mode="json")}
    )
    loaded = load_trained(path)
    assert loaded.class_names == ["a", "b", "c"]
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x), model(x))
    # Only tensors and plain containers inside: loadable without unpickling arbitrary objects.
    torch.load(path, weights_only=True)
