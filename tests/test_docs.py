"""The documentation: the site builds strictly and offline, every page opens in a real browser without asking
the network, and the generated parts (params reference, stage table) match the code they come from."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PROJECT_ROOT
from test_pages import browser, load  # noqa: F401  (browser is a fixture)

from pipeline.config import Params

MKDOCS = PROJECT_ROOT / "mkdocs.yml"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", PROJECT_ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _leaves(model, prefix: str) -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        nested = field.annotation if isinstance(field.annotation, type) else None
        if nested is not None and hasattr(nested, "model_fields") and not field.description:
            keys += _leaves(nested, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(MKDOCS), "-d", str(out)],
        cwd=PROJECT_ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_the_readme_stage_block_is_generated_from_the_contracts():
    readme = (PROJECT_ROOT / "README.md").read_text()
    block = re.search(r"<!-- stages:start[^>]*-->\n(.*)\n<!-- stages:end -->", readme, re.S)
    assert block, "README.md lost its stages:start/stages:end markers"
    assert block.group(1) == _hooks().readme_block(), (
        "README stage block is stale: paste hooks.readme_block()"
    )


def test_the_readme_fits_a_few_screens():
    assert len((PROJECT_ROOT / "README.md").read_text().splitlines()) <= 150


def test_every_param_is_documented_in_the_generated_reference(site):
    page = (site / "params.html").read_text()
    missing = [key for key in _leaves(Params, "") if f"<code>{key}" not in page]
    assert not missing, f"not in the params reference: {missing}"


def test_an_undocumented_param_fails_the_build(monkeypatch):
    hooks = _hooks()
    field = Params.model_fields["base"].annotation.model_fields["seed"]
    monkeypatch.setattr(field, "description", None)
    with pytest.raises(ValueError, match="docstring"):
        hooks.params_table("base")


def test_no_page_loads_anything_from_the_network(site):
    pages = sorted(site.glob("*.html"))
    assert len(pages) >= 10
    for page in pages:
        html = page.read_text()
        external = re.findall(r'(?:src|<link[^>]*href)="(https?://[^"]+)"', html)
        assert external == [], f"{page.name} loads {external}"


@pytest.mark.parametrize(
    "name",
    [
        "index",
        "getting-started",
        "own-data",
        "experiments",
        "orchestration",
        "teams",
        "params",
        "recipes",
        "architecture",
        "benchmarks",
        "development",
    ],
)
def test_every_page_opens_offline_in_chromium(browser, site, name):  # noqa: F811
    seen = load(browser, site / f"{name}.html")
    assert seen.external == [], f"{name} asked the network for {seen.external}"
    assert seen.errors == []
    assert seen.title, f"{name} has no h1"
    for image in seen.images:
        assert image["complete"] and image["width"] > 0, f"{name}: image {image['alt']!r} did not decode"
