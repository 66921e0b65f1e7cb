"""Adversarial input: tampered export folders, hostile params, unparsable overrides, a full disk, unsafe
pickles, temp folders left by killed runs. Each ends with a non-zero exit and one line naming the file or key
and a fix, never a traceback."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import PROJECT_ROOT, make_image, make_image_folder
from typer.testing import CliRunner

from pipeline.__main__ import app
from pipeline.config import Params
from pipeline.errors import ParamsError, PipelineError


def _one_line(message: str) -> str:
    """The single line of an error message (fails when there are more, or a traceback)."""
    assert "Traceback" not in message, message
    lines = message.strip().splitlines()
    assert len(lines) == 1, message
    return lines[0]


def _cli_failure(args: list[str], cwd: Path) -> str:
    """`python -m pipeline ARGS` in a real process: its one stderr line, once it has exited non-zero."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0, proc.stdout + proc.stderr
    return _one_line(proc.stderr)


def _runner_failure(args: list[str]) -> str:
    """The CLI in this process (for monkeypatched faults): non-zero exit, no uncaught exception, one line."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    return _one_line(result.output)


# --- params -------------------------------------------------------------------------------------------------


def _params_file(folder: Path, text: str) -> Path:
    path = folder / "params.yaml"
    path.write_text(text)
    return path


def test_empty_params_file_is_refused_naming_the_file(tmp_path):
    path = _params_file(tmp_path, "# everything commented out\n")
    line = _runner_failure(["split", "--params", str(path)])
    assert (
        line
        == f"split: {path}: empty; copy the shipped params.yaml (git checkout -- params.yaml) and edit it"
    )


def test_params_file_that_is_no_mapping_says_to_copy_the_shipped_one(tmp_path):
    with pytest.raises(ParamsError, match="expected a mapping of sections.*copy the shipped params.yaml"):
        Params.load(_params_file(tmp_path, "just a string\n"))


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"train": {"lr": float("inf")}}, "train.lr: expected a finite number, got inf"),
        ({"train": {"lr": float("nan")}}, "train.lr: expected a finite number, got nan"),
        (
            {"validate": {"max_imbalance_ratio": float("-inf")}},
            "validate.max_imbalance_ratio: expected a finite",
        ),
    ],
)
def test_non_finite_numbers_are_refused(tmp_path, section, expected):
    path = _params_file(tmp_path, yaml.safe_dump(section))
    assert ".inf" in path.read_text() or ".nan" in path.read_text()  # what a user would write
    with pytest.raises(ParamsError) as info:
        Params.load(path)
    assert expected in _one_line(str(info.value))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train:\n  epochs: true\n", "train.epochs: expected an integer, got True"),
        ("train:\n  lr: false\n", "train.lr: expected a number, got False"),
        ("model:\n  image_size: true\n", "model.image_size: expected an integer, got True"),
    ],
)
def test_booleans_where_numbers_belong_are_refused(tmp_path, text, expected):
    with pytest.raises(ParamsError) as info:
        Params.load(_params_file(tmp_path, text))
    assert expected in _one_line(str(info.value))


def test_booleans_still_fill_boolean_keys_and_yaml_exponents_still_read_as_numbers(tmp_path):
    params = Params.load(_params_file(tmp_path, "train:\n  compile: true\n  lr: 3e-4\n"))
    assert params.train.compile is True and params.train.lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    "value", ["/etc/pipeline-model.pt", "../outside/model.pt", "models/../../model.pt", "."]
)
def test_output_paths_outside_the_project_are_refused_naming_the_key(tmp_path, value):
    project = tmp_path / "project"
    project.mkdir()
    with pytest.raises(ParamsError) as info:
        Params.load(_params_file(project, yaml.safe_dump({"paths": {"model": value}})))
    line = _one_line(str(info.value))
    assert f"paths.model: {value} is not inside the project folder {project}" in line
    assert "relative to it and without `..`" in line


def test_output_paths_inside_the_project_and_inputs_and_the_cache_anywhere_are_accepted(tmp_path):
    paths = {
        "model": str(tmp_path / "models" / "m.pt"),
        "export_dir": "models/./export",
        "data_root": "/data",
        "cache_dir": "/var/cache/shared",  # not an output: experiments run at once may share it
    }
    params = Params.load(_params_file(tmp_path, yaml.safe_dump({"paths": paths})))
    assert params.paths.model == tmp_path / "models" / "m.pt"
    assert params.paths.cache_dir == Path("/var/cache/shared")
    assert Params.load(PROJECT_ROOT / "params.yaml").paths.export_dir == Path("models/export")


def test_an_override_cannot_move_an_output_out_of_the_project(tmp_path):
    with pytest.raises(ParamsError, match="paths.export_dir: /tmp is not inside the project folder"):
        Params.load(_params_file(tmp_path, "base:\n  seed: 1\n"), {"paths.export_dir": "/tmp"})


# --- overrides ----------------------------------------------------------------------------------------------


def test_override_whose_value_is_not_yaml_names_the_override(tmp_path):
    line = _cli_failure(["flow", "-S", "train.lr=[", "--project", str(tmp_path)], cwd=tmp_path)
    assert line.startswith("flow: --set 'train.lr=[': the value is not valid YAML"), line
    assert "quote it as a string" in line


# --- a full disk --------------------------------------------------------------------------------------------


def test_full_disk_during_a_stage_is_one_line_naming_the_artifact(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "images", classes=2, per_class=3)
    params = _params_file(tmp_path, "paths:\n  data_root: images\ningest:\n  num_workers: 0\n")
    write_text = Path.write_text

    def disk_full(path: Path, *args, **kwargs):  # what write() raises on a full disk: no file name
        if path.is_relative_to(tmp_path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text(path, *args, **kwargs)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Path, "write_text", disk_full)
    line = _runner_failure(["ingest", "--params", str(params)])
    details = Params.load(params).paths.details("ingest")
    assert line == (
        f"ingest: no space left on device while writing {details}: free space or point paths.* elsewhere"
    )
    assert not [p for p in details.parent.iterdir() if p.name.startswith(".")], "a temp file was left"


# --- unsafe or corrupt torch files --------------------------------------------------------------------------


class Payload:
    """Any class: unpickling it means importing and running code named by the file."""


def _torch_file(path: Path, kind: str) -> Path:
    import torch

    if kind == "pickled object":
        torch.save({"state_dict": {}, "extra": Payload()}, path)
    elif kind == "text":
        path.write_text("a model, honestly\n")
    elif kind == "truncated zip":
        torch.save({"weight": torch.zeros(64)}, path)
        path.write_bytes(path.read_bytes()[:200])
    else:  # tensors, but not what the reader expects
        torch.save({"weight": torch.zeros(2)}, path)
    return path


def _assert_safe_refusal(line: str, path: Path, fix: str) -> None:
    assert str(path) in line and fix in line, line
    assert "weights_only" not in line, f"the message points at unsafe loading: {line}"


def test_model_artifact_holding_a_pickled_object_fails_in_the_cli_with_one_safe_line(tmp_path):
    _torch_file(tmp_path / "model.pt", "pickled object")
    params = _params_file(tmp_path, "paths:\n  model: model.pt\n")
    line = _cli_failure(["evaluate", "--params", str(params)], cwd=tmp_path)
    assert line.startswith("evaluate: model.pt: not plain tensors that load without running code"), line
    _assert_safe_refusal(line, Path("model.pt"), "re-run the train stage (dvc repro train)")


@pytest.mark.parametrize("kind", ["text", "truncated zip", "other tensors"])
def test_model_artifact_that_is_no_artifact_is_refused_with_one_line(tmp_path, kind):
    from pipeline.models import load_trained

    path = _torch_file(tmp_path / "model.pt", kind)
    with pytest.raises(PipelineError) as info:
        load_trained(path)
    _assert_safe_refusal(_one_line(str(info.value)), path, "re-run the train stage (dvc repro train)")


@pytest.mark.parametrize("kind", ["pickled object", "text", "truncated zip"])
def test_weights_file_that_is_no_safe_state_dict_is_refused_naming_the_key(tmp_path, kind):
    from pipeline.config import ModelParams
    from pipeline.models import build_model

    path = _torch_file(tmp_path / "weights.pth", kind)
    params = ModelParams(backbone="test_efficientnet", weights=f"file:{path}")
    with pytest.raises(PipelineError) as info:
        build_model(params, num_classes=3)
    line = _one_line(str(info.value))
    assert line.startswith(f"model.weights: {path}: "), line
    _assert_safe_refusal(line, path, "save a plain state dict (torch.save(model.state_dict(), path))")


def test_corrupt_safetensors_weights_are_refused_with_one_line(tmp_path):
    from pipeline.config import ModelParams
    from pipeline.models import build_model

    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(PipelineError) as info:
        build_model(ModelParams(backbone="test_efficientnet", weights=f"file:{path}"), num_classes=3)
    assert _one_line(str(info.value)).startswith(f"model.weights: {path}: not a readable .safetensors file")


# --- temp files of killed runs ------------------------------------------------------------------------------

# A writer in the middle of replacing a folder and a file: it prints both temp paths, then waits to be killed.
_WRITER = """
import sys, time
from pipeline.io import atomic_dir, atomic_path
with atomic_dir(sys.argv[1]) as folder, atomic_path(sys.argv[2]) as file:
    (folder / "model.onnx").write_bytes(b"half a model")
    file.write_text("half a file")
    print(folder, file, sep="\\n", flush=True)
    time.sleep(600)
"""


def test_temps_of_a_killed_writer_are_removed_by_the_next_write_and_a_live_writers_are_not(tmp_path):
    from pipeline.io import atomic_dir, write_text

    folder, file = tmp_path / "models" / "onnx", tmp_path / "models" / "model.pt"
    legacy = tmp_path / "models" / ".onnx.k3j2_x9"  # a temp named before temps carried their owner
    legacy.mkdir(parents=True)
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(folder), str(file)],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        temps = [Path(writer.stdout.readline().strip()) for _ in range(2)]
        assert all(temp.exists() and temp.parent == folder.parent for temp in temps), temps
        with atomic_dir(folder) as out:  # a concurrent write while the writer is alive: its temps stay
            (out / "model.onnx").write_bytes(b"a whole model")
        write_text(file, "a whole file")
        assert all(temp.exists() for temp in temps), "a live writer's temp was removed"
    finally:
        writer.kill()
        writer.wait()
    assert all(temp.exists() for temp in temps), "SIGKILL runs no clean-up: the temps are left behind"

    with atomic_dir(folder) as out:
        (out / "model.onnx").write_bytes(b"the next model")
    assert not temps[0].exists(), "the killed run's temp folder was not removed"
    assert temps[1].exists(), "a file's temp goes with the next write of that file, not of the folder"
    write_text(file, "the next file")
    assert not temps[1].exists()
    assert legacy.is_dir(), "a temp without an owner in its name cannot be judged and must stay"
    assert (folder / "model.onnx").read_bytes() == b"the next model"
    assert sorted(p.name for p in folder.parent.iterdir()) == [legacy.name, "model.pt", "onnx"]


_SCRATCH_USER = """
import sys, time
from pipeline.io import scratch_dir
with scratch_dir(sys.argv[1]) as folder:
    (folder / "logits.npy").write_bytes(bytes(1000))
    print(folder, flush=True)
    time.sleep(600)
"""


def test_a_scratch_folder_goes_when_its_run_ends_and_a_killed_runs_with_the_next(tmp_path):
    """evaluate's memory-mapped outputs (2.7 GB at a million images) live in a scratch folder: gone when the
    stage ends, even by an error; a SIGKILL'd run's is removed by the next run, a live one's is not."""
    from pipeline.io import scratch_dir

    target = tmp_path / "cache" / "evaluate"
    with pytest.raises(RuntimeError), scratch_dir(target) as folder:
        (folder / "logits.npy").write_bytes(b"x")
        raise RuntimeError("the stage failed")
    assert not folder.exists()
    user = subprocess.Popen(
        [sys.executable, "-c", _SCRATCH_USER, str(target)],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        killed = Path(user.stdout.readline().strip())
        with scratch_dir(target) as folder:
            assert killed.is_dir(), "a live run's scratch folder was removed"
    finally:
        user.kill()
        user.wait()
    with scratch_dir(target) as folder:
        assert not killed.exists(), "the killed run's scratch folder was left behind"
        assert folder.is_dir() and folder.parent == target.parent
    assert list(target.parent.iterdir()) == []


# --- a tampered export folder -------------------------------------------------------------------------------

CLASSES = ["cat", "dog", "fox"]
PREPROCESS = {
    "input_size": [3, 32, 32],
    "interpolation": "bilinear",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "crop_pct": 0.875,
    "crop_mode": "center",
}


def _onnx_classifier(path: Path, classes: int, size: int) -> Path:
    """A real ONNX model taking (N, 3, size, size) and giving (N, classes): mean colour x a fixed matrix."""
    import json

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(3 * classes, dtype=np.float32).reshape(3, classes), "weight")
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["colour"]),
            helper.make_node("MatMul", ["colour", "weight"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    # What the export stage writes into the model, and predict checks labels.json and preprocess.json against.
    meta = {key: value if isinstance(value, str) else json.dumps(value) for key, value in PREPROCESS.items()}
    helper.set_model_props(model, {"class_names": json.dumps(CLASSES), **meta})
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture
def export_folder(tmp_path):
    """A working export folder (model.onnx, labels.json, preprocess.json) and an image to classify."""
    import json

    folder = tmp_path / "export"
    folder.mkdir()
    _onnx_classifier(folder / "model.onnx", len(CLASSES), 32)
    (folder / "labels.json").write_text(json.dumps(CLASSES))
    (folder / "preprocess.json").write_text(json.dumps(PREPROCESS))
    return folder, make_image(tmp_path / "photo.png", 1)


def test_the_untampered_export_folder_predicts(export_folder):
    from pipeline.serving.predict import Predictor

    folder, image = export_folder
    (prediction,) = Predictor(folder).predict([image])
    assert prediction.ok and prediction.labels[0][0] in CLASSES


def _tamper(folder: Path, name: str, content) -> None:
    import json

    (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("labels.json", '["cat", "dog",', "labels.json: not valid JSON"),
        ("preprocess.json", "{input_size: 32}", "preprocess.json: not valid JSON"),
        ("labels.json", {"0": "cat"}, "labels.json: expected a JSON list of class names"),
        ("labels.json", ["cat", "dog"], "labels.json: 2 class names but model.onnx outputs 3 scores"),
        ("labels.json", ["cat", "dog", "fox", "owl"], "labels.json: 4 class names but model.onnx outputs 3"),
        ("labels.json", ["cat", "cat", "fox"], "labels.json: a class name appears twice"),
        ("preprocess.json", {**PREPROCESS, "crop_pct": None}, "preprocess.json: crop_pct must be"),
        (
            "preprocess.json",
            {k: v for k, v in PREPROCESS.items() if k != "mean"},
            "preprocess.json: missing keys ['mean']",
        ),
        (
            "preprocess.json",
            {**PREPROCESS, "input_size": [3, 64, 64]},
            "preprocess.json: input_size [3, 64, 64] but model.onnx takes [3, 32, 32]",
        ),
        ("preprocess.json", {**PREPROCESS, "input_size": [3, 99999, 99999]}, "sides of 8 to 4096 px"),
        ("preprocess.json", {**PREPROCESS, "input_size": [3, 4, 4]}, "sides of 8 to 4096 px"),
        ("preprocess.json", {**PREPROCESS, "crop_pct": 0}, "crop_pct must be a number in (0, 2], got 0"),
        ("preprocess.json", {**PREPROCESS, "crop_pct": 50}, "crop_pct must be a number in (0, 2], got 50"),
        ("preprocess.json", {**PREPROCESS, "std": [0.5, 0, 0.5]}, "std must be 3 positive numbers"),
        ("preprocess.json", {**PREPROCESS, "mean": [0.5, 0.5]}, "mean must be 3 numbers"),
        ("preprocess.json", {**PREPROCESS, "interpolation": "magic"}, "interpolation must be one of"),
        ("model.onnx", "not a model, but a note", "model.onnx: not an ONNX model ONNX Runtime can load"),
    ],
)
def test_tampered_export_folder_fails_predict_with_one_line(export_folder, name, content, expected):
    folder, image = export_folder
    _tamper(folder, name, content)
    line = _runner_failure(["predict", str(image), "--model", str(folder), "--precision", "fp32"])
    assert line.startswith(f"predict: {folder}/"), line
    assert expected in line, line
    assert line.endswith("re-run the export stage (dvc repro export) or copy the whole export folder again")


# --- a data folder DVC cannot hash --------------------------------------------------------------------------


def test_flow_stops_before_prefect_on_a_data_folder_dvc_cannot_hash(tmp_path):
    project = tmp_path / "project"
    make_image_folder(project / "images", classes=2, per_class=1)
    for i in range(7):
        os.symlink(f"gone_{i}.png", project / "images" / "class_0" / f"link_{i}.png")
    (project / "pipeline" / "data").mkdir(parents=True)
    (project / "pipeline" / "data" / "no_csv_manifest.csv").write_text("")
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw["paths"]["data_root"] = "images"
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    line = _cli_failure(["flow", "--project", str(project), "-S", "train.lr=0.5"], tmp_path)
    assert line == (
        f"flow: paths.data_root: 7 dangling symbolic link(s) under {project / 'images'}, which DVC cannot "
        "hash: 'class_0/link_0.png', 'class_0/link_1.png', 'class_0/link_2.png', 'class_0/link_3.png', "
        f"'class_0/link_4.png', ... and 2 more; delete them (find {project / 'images'} -xtype l -delete) or "
        "replace each with a copy of its target"
    )
    assert yaml.safe_load((project / "params.yaml").read_text()) == raw, "the override was written"
