"""Params: params.yaml is the complete reference of `Params`; bad values fail naming the dotted key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from helpers import PROJECT_ROOT
from typer.testing import CliRunner

from pipeline.__main__ import app
from pipeline.config import NO_CSV_MANIFEST, Params, TrainParams
from pipeline.errors import ParamsError, PipelineError

PARAMS_FILE = PROJECT_ROOT / "params.yaml"

# Keys whose value in params.yaml deliberately differs from the code default, and why.
PROJECT_CHOICES = {
    # Code default None = the backbone's pretrained input size (224 for lite0), right for any backbone.
    # The project runs on CPU with 28 px Fashion-MNIST images: a resolution below lite0's native 224 trains
    # several times faster (shared/FACTS.md) and is still well above the source resolution.
    "model.image_size",
}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train.augment.hflip': 0.5, ...}; mappings are walked, lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _error(overrides: dict[str, Any]) -> str:
    with pytest.raises(ParamsError) as info:
        Params.load(PARAMS_FILE, overrides=overrides)
    return str(info.value)


def test_params_yaml_loads():
    params = Params.load(PARAMS_FILE)
    assert 28 < params.model.image_size < 224
    assert params.paths.data_root == Path("data/sample")


def test_params_yaml_lists_every_key_of_params():
    in_file = set(_flatten(yaml.safe_load(PARAMS_FILE.read_text())))
    in_code = set(_flatten(Params().to_dict()))
    assert in_code - in_file == set(), "keys of Params missing from params.yaml"
    assert in_file - in_code == set(), "keys in params.yaml that Params does not have"


def test_params_yaml_values_are_the_code_defaults_except_project_choices():
    in_file = _flatten(yaml.safe_load(PARAMS_FILE.read_text()))
    defaults = _flatten(Params().to_dict())
    differing = {key for key in defaults if in_file.get(key) != defaults[key]}
    assert differing == PROJECT_CHOICES


def test_unknown_key_is_named_with_its_dotted_path(tmp_path):
    bad = tmp_path / "params.yaml"
    raw = yaml.safe_load(PARAMS_FILE.read_text())
    raw["train"]["lrr"] = 0.01
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError) as info:
        Params.load(bad)
    message = str(info.value)
    assert str(bad) in message
    assert "train.lrr: unknown key" in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"train.lr": "abc"}, "train.lr: expected a positive number, got 'abc'"),
        ({"train.lr": -1}, "train.lr: expected a positive number, got -1"),
        ({"train.epochs": 0}, "train.epochs: expected a positive integer, got 0"),
        ({"train.augment.hflip": 2}, "train.augment.hflip: expected a number >= 0.0 and <= 1.0, got 2"),
        ({"export.opset": 11}, "export.opset: expected an integer >= 13, got 11"),
        ({"model.crop_pct": 1.5}, "model.crop_pct: expected a number >= 0.5 and <= 1.0, got 1.5"),
        ({"train.pin_memory": "maybe"}, "train.pin_memory: expected true or false, got 'maybe'"),
        ({"train": 3}, "train: expected a section (a mapping of keys), got 3"),
        ({"augment.hflip": 0.5}, "augment: unknown key"),
    ],
)
def test_wrong_value_names_dotted_key_and_what_is_valid(overrides, expected):
    assert expected in _error(overrides)


def test_wrong_choice_lists_every_allowed_value():
    message = _error({"train.strategy": "foo"})
    allowed = get_args(TrainParams.model_fields["strategy"].annotation)
    assert "train.strategy: expected one of" in message and "got 'foo'" in message
    assert all(f"'{choice}'" in message for choice in allowed)


def test_bad_severity_names_rule_and_choices():
    message = _error({"validate.severity.min_side": "loud"})
    assert "validate.severity.min_side: expected one of 'error', 'warning' or 'off', got 'loud'" in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"train.lrr": 0.01}, "train.lrr: unknown key; did you mean train.lr?"),
        ({"trian.lr": 0.01}, "trian: unknown key; did you mean train?"),
        ({"train.augment.hfip": 0.5}, "train.augment.hfip: unknown key; did you mean train.augment.hflip?"),
    ],
)
def test_unknown_key_suggests_the_closest_valid_one(overrides, expected):
    message = _error(overrides)
    assert expected in message
    assert "\n" not in message, "one problem is one line"


def test_unknown_key_far_from_every_valid_one_gets_no_suggestion():
    assert "zzz: unknown key (see docs/params.md)" in _error({"zzz": 1})


def test_csv_manifest_null_names_the_placeholder():
    message = _error({"paths.csv_manifest": None})
    assert "paths.csv_manifest: expected a path: your CSV, or pipeline/data/no_csv_manifest.csv" in message
    assert (PROJECT_ROOT / NO_CSV_MANIFEST).is_file(), "the placeholder ships with the code"
    assert Params().paths.csv_listing is None
    assert Params.load(PARAMS_FILE, {"paths.csv_manifest": "lists/a.csv"}).paths.csv_listing == Path(
        "lists/a.csv"
    )


def test_every_bad_key_is_reported_at_once():
    message = _error({"train.lr": "abc", "evaluate.top_k": 0, "model.hed": "mlp"})
    assert "train.lr:" in message and "evaluate.top_k:" in message and "model.hed: unknown key" in message


@pytest.mark.parametrize("fractions", [(0.8, 0.15, 0.15), (0.5, 0.2, 0.2)])
def test_split_fractions_must_sum_to_one(fractions):
    train, val, test = fractions
    message = _error({"split.train": train, "split.val": val, "split.test": test})
    assert f"split: train + val + test must be 1.0, got {train + val + test:g}" in message
    assert "{" not in message, "the message should not dump the whole section"


def test_split_fractions_tolerate_float_rounding():
    params = Params.load(PARAMS_FILE, overrides={"split.train": 0.7, "split.val": 0.2, "split.test": 0.1})
    assert (params.split.train, params.split.val, params.split.test) == (0.7, 0.2, 0.1)


def test_overrides_apply_without_touching_the_file():
    before = PARAMS_FILE.read_bytes()
    params = Params.load(PARAMS_FILE, overrides={"train.lr": 0.001, "train.augment.hflip": 0.0})
    assert params.train.lr == 0.001
    assert params.train.augment.hflip == 0.0
    assert params.train.epochs == Params.load(PARAMS_FILE).train.epochs
    assert PARAMS_FILE.read_bytes() == before


def test_override_below_a_scalar_is_refused():
    with pytest.raises(ParamsError, match=r"train\.lr\.x: lr is not a section"):
        Params.load(PARAMS_FILE, overrides={"train.lr.x": 1})


def test_to_dict_round_trips_through_json():
    params = Params.load(
        PARAMS_FILE,
        overrides={
            "paths.csv_manifest": "labels.csv",
            "model.weights": "file:weights/backbone.pth",
            "train.strategy": "full",
            "quantize.exclude_nodes": ["/head/Gemm"],
            "validate.severity.min_side": "off",
        },
    )
    as_json = json.loads(json.dumps(params.to_dict()))
    restored = Params.from_dict(as_json)
    assert restored == params
    assert restored.paths.csv_manifest == Path("labels.csv")
    assert Params.from_dict(Params().to_dict()) == Params()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "params file not found"),
        ("train: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping of sections"),
    ],
)
def test_unusable_params_file_names_the_file(tmp_path, content, expected):
    path = tmp_path / "params.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ParamsError) as info:
        Params.load(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_cli_prints_params_error_and_exits_1(tmp_path):
    """A bad params file reaches the user as one clear message, not a traceback."""
    assert issubclass(ParamsError, PipelineError)
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  lr: abc\n")
    result = CliRunner().invoke(app, ["split", "--params", str(bad)])
    assert result.exit_code == 1
    assert "train.lr: expected a positive number, got 'abc'" in result.output
    assert "Traceback" not in result.output


def test_progressive_resizing_must_grow():
    message = _error({"train.resize_start": 0.9, "train.resize_end": 0.6})
    assert "train: resize_start 0.9 is above resize_end 0.6" in message and "swap them" in message
    assert Params.from_dict({"train": {"resize_start": 0.5, "resize_end": 0.85}}).train.resize_end == 0.85
