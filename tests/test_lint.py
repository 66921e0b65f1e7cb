"""The code passes the project's ruff settings (pyproject.toml), so style never drifts between sessions."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from helpers import PROJECT_ROOT

CHECKED = ["pipeline", "benchmarks", "tests", "scripts", "docs"]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    ruff = shutil.which("ruff", path=str(PROJECT_ROOT / ".venv" / "bin")) or shutil.which("ruff")
    command = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    return subprocess.run([*command, *args, *CHECKED], cwd=PROJECT_ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("args", [("check",), ("format", "--check")], ids=["lint", "format"])
def test_ruff(args):
    proc = _ruff(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
