"""The command line's own behaviour: a stage's closing line and what happens on the way out."""

from __future__ import annotations

import gc
import re
import sys

import pytest
import yaml
from helpers import data_stage_params, make_image_folder
from typer.testing import CliRunner

from pipeline.__main__ import app, main


def test_a_stage_ends_with_its_seconds_and_summary(tmp_path):
    params = data_stage_params(tmp_path, make_image_folder(tmp_path / "images"), ingest={"num_workers": 0})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.to_dict()))
    result = CliRunner().invoke(app, ["ingest", "--params", str(params_file)])
    assert result.exit_code == 0, result.output
    done = re.search(r"^ingest: done in ([0-9.]+) s (\{.*\})$", result.output, flags=re.MULTILINE)
    assert done and 0 < float(done.group(1)) and '"ok": 36' in done.group(2)


def test_the_command_line_freezes_the_collector_on_the_way_out(monkeypatch, capsys):
    """Python's last collection at exit walks every object the imports made (up to 2 s a command)."""
    gc.unfreeze()
    monkeypatch.setattr(sys, "argv", ["pipeline", "outputs", "--help"])
    try:
        with pytest.raises(SystemExit):
            main()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
