"""Edits of params.yaml that keep its comments and layout: dotted overrides (what `dvc exp run -S` does) and
the paths catalogue's keys that the file does not have yet.

The catalogue (`PathsParams` in pipeline/config.py) is the one hand-kept list of paths and their defaults.
params.yaml repeats them because dvc.yaml templates every path from it (`${paths.model}`) and DVC reads only
the file; `python -m pipeline dvc-yaml` writes a path added to the catalogue into it, and a value a user set
there is never changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ruamel.yaml import YAML, RoundTripRepresenter

from pipeline.config import PathsParams, set_dotted
from pipeline.io import atomic_path


class _NullKeepingRepresenter(RoundTripRepresenter):
    """Writes None as `null` (ruamel's default is an empty value), so untouched keys read as before."""


_NullKeepingRepresenter.add_representer(
    type(None), lambda dumper, _: dumper.represent_scalar("tag:yaml.org,2002:null", "null")
)


def _yaml() -> YAML:
    yaml = YAML()
    yaml.Representer = _NullKeepingRepresenter
    return yaml


def set_values(path: Path, overrides: dict[str, Any]) -> None:
    """Write dotted overrides such as {"train.lr": 0.001} into the params file."""
    yaml = _yaml()
    document = yaml.load(path)
    for dotted, value in overrides.items():
        set_dotted(document, dotted, value)
    with atomic_path(path) as tmp:
        yaml.dump(document, tmp)


def add_missing_paths(path: Path, write: bool = True) -> list[str]:
    """Add each catalogue path the file's `paths` section lacks, with its default; the keys (to be) added."""
    yaml = _yaml()
    document = yaml.load(path)
    present = document.get("paths") or {}
    catalogue = PathsParams().model_dump(mode="json")
    missing = {f"paths.{key}": value for key, value in catalogue.items() if key not in present}
    if missing and write:
        set_values(path, missing)
    return sorted(missing)
