"""Command line: `python -m pipeline <command>`. One command per stage plus predict, flow and deploy.

Commands only load params, call the stage's `run`, and turn `PipelineError` into a clear message and exit 1.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.config import DEFAULT_PARAMS_FILE, Params
from pipeline.errors import PipelineError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="Params file.")]


def _run_stage(name: str, params_file: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = Params.load(params_file)
        stage = importlib.import_module(f"pipeline.stages.{name}")
        summary = stage.run(params)
    except PipelineError as exc:
        typer.secho(f"{name}: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None
    typer.echo(f"{name}: done " + json.dumps(summary or {}, sort_keys=True, default=str)[:400])


@app.command()
def ingest(params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """Scan the data source, hash and fully decode every image, write the manifest."""
    _run_stage("ingest", params)


@app.command()
def validate(params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """Check the manifest (pandera schema + Great Expectations rules); quarantine unusable files."""
    _run_stage("validate", params)


@app.command()
def split(params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """Stratified train/val/test split that keeps exact duplicates together."""
    _run_stage("split", params)


@app.command()
def train(params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """Fine-tune the pretrained backbone (resumes from the last complete epoch)."""
    _run_stage("train", params)


@app.command()
def evaluate(params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """Test-split metrics, calibration, plots and report.html."""
    _run_stage("evaluate", params)


@app.command()
def quantize(params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """ONNX export and static INT8 quantization, with accuracy and latency measured."""
    _run_stage("quantize", params)


@app.command()
def export(params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """Assemble the self-contained export folder and check ONNX/PyTorch parity."""
    _run_stage("export", params)


@app.command()
def outputs(params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """List where the pipeline's outputs are and which exist."""
    p = Params.load(params).paths
    entries = {
        "manifest": p.manifest,
        "quarantine": p.quarantine,
        "splits": p.splits,
        "model": p.model,
        "report": p.reports_dir / "evaluate" / "report.html",
        "data docs": p.reports_dir / "validate" / "data_docs",
        "export": p.export_dir,
        "metrics": p.metrics_dir,
    }
    for label, path in entries.items():
        mark = "ok " if Path(path).exists() else "-- "
        typer.echo(f"{mark}{label:<11} {path}")


def main() -> None:
    try:
        app()
    except PipelineError as exc:  # raised outside a stage (e.g. params loading in a helper command)
        typer.secho(str(exc), err=True, fg=typer.colors.RED)
        sys.exit(1)


if __name__ == "__main__":
    main()
