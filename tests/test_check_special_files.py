"""`python -m pipeline check` refuses FIFOs, sockets and devices in the data folder (or links to them): DVC
opens every file there to hash it and would wait forever on a FIFO or /dev/zero, while ingest skips them."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import yaml
from helpers import PROJECT_ROOT, make_image_folder
from typer.testing import CliRunner

from pipeline.__main__ import app
from pipeline.config import NO_CSV_MANIFEST

FIX = "; remove it or move it out of paths.data_root"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder: this project's params.yaml over `images/` (2 classes x 2 images) and the no-CSV
    placeholder."""
    make_image_folder(tmp_path / "images", classes=2, per_class=2)
    (tmp_path / NO_CSV_MANIFEST).parent.mkdir(parents=True)
    shutil.copy2(PROJECT_ROOT / NO_CSV_MANIFEST, tmp_path / NO_CSV_MANIFEST)
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw["paths"]["data_root"] = "images"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _socket(path: Path) -> None:
    """A unix socket file at `path` (bound by a relative name: absolute temp paths may pass the 108-byte
    limit), left on disk once closed, as a crashed server leaves it."""
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(path.name)
    finally:
        os.chdir(cwd)


def _make(kind: str, project: Path) -> None:
    target = project / "images" / "class_0" / "p.png"
    if kind == "FIFO":
        os.mkfifo(target)
    elif kind == "socket":
        _socket(target)
    elif kind == "link to a character device":
        os.symlink("/dev/zero", target)  # reading it never ends
    else:  # a link to a FIFO outside the data folder: DVC follows links to files
        os.mkfifo(project / "pipe")
        os.symlink(project / "pipe", target)


@pytest.mark.timeout(120)  # opening the FIFO to look at it would hang the check itself
@pytest.mark.parametrize("kind", ["FIFO", "socket", "link to a character device", "link to a FIFO"])
def test_check_refuses_a_special_file_in_the_data_folder_in_one_line(project, kind):
    _make(kind, project)
    result = CliRunner().invoke(app, ["check"])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == (
        "check: paths.data_root: 1 FIFO(s), socket(s) or device(s) under images, which DVC cannot hash "
        f"(reading a FIFO or a device never ends): 'class_0/p.png' ({kind}){FIX}"
    )
    (project / "images" / "class_0" / "p.png").unlink()  # the fix the line gives
    assert CliRunner().invoke(app, ["check"]).exit_code == 0


@pytest.mark.timeout(120)
def test_several_special_files_are_one_line_and_links_to_folders_are_not_followed(project):
    os.mkfifo(project / "images" / "class_1" / "b.png")
    os.mkfifo(project / "images" / "a.fifo")
    os.mkfifo(project / "elsewhere")
    os.symlink(project, project / "images" / "class_0" / "up")  # a link to a folder that holds a FIFO
    result = CliRunner().invoke(app, ["check"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "check: paths.data_root: 2 FIFO(s), socket(s) or device(s) under images, which DVC cannot hash "
        "(reading a FIFO or a device never ends): 'a.fifo' (FIFO), 'class_1/b.png' (FIFO); remove them or "
        "move them out of paths.data_root"
    )
