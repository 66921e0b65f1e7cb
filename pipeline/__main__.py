"""Command line: `python -m pipeline <command>`. One command per stage plus check, predict, flow and deploy.

Commands only load params, call the stage's `run`, and turn `PipelineError` into a clear message and exit 1.
A stage's last line is `<stage>: done in <seconds> s {summary}`, the seconds counted from this module's start
(the interpreter's own start-up, about 10 ms, is not in them); the flow reads them to tell a stage command's
time from its own.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the imports below: they are part of what a stage command costs

import errno
import gc
import importlib
import json
import logging
import re
import sys
from pathlib import Path
from typing import Annotated, Literal, NoReturn

import typer

from pipeline.config import DEFAULT_PARAMS_FILE, ModelParams, Params, PathsParams
from pipeline.errors import PipelineError
from pipeline.io import write_text
from pipeline.stages import STAGES, SUMMARIES

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="Params file.")]


def _run_stage(name: str, params_file: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = Params.load(params_file)
        stage = importlib.import_module(f"pipeline.stages.{name}")
        summary = stage.run(params)
    except PipelineError as exc:
        _fail(name, str(exc))
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        where = exc.filename or "an output"
        _fail(name, f"no space left on device while writing {where}: free space or point paths.* elsewhere")
    shown = json.dumps(summary or {}, sort_keys=True, default=str)[:400]
    typer.echo(f"{name}: done in {time.perf_counter() - STARTED:.2f} s {shown}")


def _fail(command: str, message: str) -> NoReturn:
    typer.secho(f"{command}: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(1) from None


def _stage_command(name: str, summary: str) -> None:
    def command(params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
        _run_stage(name, params)

    command.__doc__ = summary
    app.command(name=name)(command)


for _name, _summary in SUMMARIES.items():
    _stage_command(_name, _summary)


@app.command()
def check(params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """Preflight (run.sh runs it before `dvc repro`): params load, ingest's input paths exist, DVC can hash
    the data folder (no dangling links or FIFOs, only UTF-8 names), the outputs can be written, and timm
    knows the backbone."""
    from pipeline.stages.ingest import check_inputs

    try:
        loaded = Params.load(params)
        source = check_inputs(loaded.ingest, loaded.paths, for_dvc=True)
        _check_outputs_and_model(loaded.paths, loaded.model, Path("."))
    except PipelineError as exc:
        _fail("check", str(exc))
    typer.echo(
        f"check: {params}, the inputs, outputs and model are fine (source: {source}, data_root: "
        f"{loaded.paths.data_root}, backbone: {loaded.model.backbone})"
    )


def _check_outputs_and_model(paths: PathsParams, model: ModelParams, project: Path) -> None:
    """What `check` and `flow` refuse once the inputs are fine: outputs the stages could not write, and a
    model section that timm cannot serve (last: importing timm and torch takes a few seconds)."""
    from pipeline.config import output_problems

    if problems := output_problems(paths, project):
        raise PipelineError("\n".join(problems))
    from pipeline.models import check_backbone

    check_backbone(model, project)


@app.command("dvc-yaml")
def dvc_yaml(
    check_only: Annotated[
        bool, typer.Option("--check", help="Only say whether dvc.yaml is up to date (exit 1 if not).")
    ] = False,
) -> None:
    """Write dvc.yaml from the stage contracts and the modules each stage imports, and add to params.yaml any
    path of the catalogue it lacks (dvc.yaml templates every path from it)."""
    from pipeline.orchestration.dvc_yaml import PROJECT, render
    from pipeline.orchestration.params_file import add_missing_paths

    target, text = PROJECT / "dvc.yaml", render()
    missing = add_missing_paths(PROJECT / DEFAULT_PARAMS_FILE, write=not check_only)
    if check_only:
        if target.read_text(encoding="utf-8") != text or missing:
            stale = f"{target} is out of date" if missing == [] else f"params.yaml lacks {', '.join(missing)}"
            _fail("dvc-yaml", f"{stale}; run `python -m pipeline dvc-yaml`")
        typer.echo(f"dvc-yaml: {target} is up to date")
        return
    if missing:
        typer.echo(f"dvc-yaml: added to {DEFAULT_PARAMS_FILE}: {', '.join(missing)}")
    write_text(target, text)
    typer.echo(f"dvc-yaml: wrote {target} ({len(STAGES)} stages)")


@app.command()
def outputs(params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """List every stage's outputs and page, from the stage contracts, marking those that exist."""
    from pipeline.stages import contracts

    paths = Params.load(params).paths
    for name, stage in contracts().items():
        for path in stage.products(name, paths):
            typer.echo(f"{'ok ' if Path(path).exists() else '-- '}{name:<9} {path}")


@app.command()
def predict(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders (searched recursively) or globs.")],
    model: Annotated[Path | None, typer.Option(help="Export folder (default: paths.export_dir).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes shown per image.")] = 1,
    sets: Annotated[
        bool,
        typer.Option(
            "--sets",
            help="Also show each image's conformal prediction set: the classes that hold the true one with "
            "probability >= 1 - evaluate.conformal.alpha.",
        ),
    ] = False,
    output_format: Annotated[Literal["table", "json", "csv"], typer.Option("--format")] = "table",
    precision: Annotated[
        Literal["auto", "fp32", "int8", "fp16"],
        typer.Option(
            help="Model file to run; auto: the one the export serves (INT8 when it passed the gate), FP16 "
            "on a GPU provider when exported."
        ),
    ] = "auto",
    provider: Annotated[
        Literal["auto", "cpu", "cuda", "tensorrt", "openvino"],
        typer.Option(
            help="ONNX Runtime execution provider; auto: the first of tensorrt, cuda, openvino, cpu."
        ),
    ] = "auto",
    params: ParamsOption = DEFAULT_PARAMS_FILE,
) -> None:
    """Classify images with the exported ONNX model (ONNX Runtime only: works without torch).

    Images unlike the training data are marked UNKNOWN with their score when the export has a detector.
    Exit code 0: all predicted; 1: some inputs could not be read (reported per file); 2: nothing to run.
    """
    from pipeline.serving.predict import Predictor, format_predictions, predict_paths

    try:
        export_dir = model or Params.load(params).paths.export_dir
        predictor = Predictor(export_dir, precision=precision, provider=provider)
        running = f"{predictor.served.upper()}: {predictor.reason} (provider {predictor.provider})"
        typer.echo(f"predict: running {running}", err=True)
        results = predict_paths(paths, predictor, top_k=top_k, sets=sets)
    except PipelineError as exc:
        typer.secho(f"predict: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    typer.echo(format_predictions(results, output_format))
    failed = sum(not result.ok for result in results)
    if failed:
        typer.secho(f"predict: {failed} of {len(results)} inputs failed", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)


@app.command("lr-find")
def lr_find(
    steps: Annotated[
        int, typer.Option(min=8, help="Lr values tried, one batch each (stops early on divergence).")
    ] = 100,
    start_lr: Annotated[float, typer.Option(help="First train.lr of the exponential ramp.")] = 1e-7,
    end_lr: Annotated[float, typer.Option(help="Last train.lr of the ramp.")] = 10.0,
    params: ParamsOption = DEFAULT_PARAMS_FILE,
) -> None:
    """Learning-rate range test on the split data with the current strategy: a plot and a suggested train.lr
    under paths.reports_dir/lr_find (run the split stage first)."""
    from pipeline import lr_find as finder

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        figures = finder.run(Params.load(params), steps=steps, start_lr=start_lr, end_lr=end_lr)
    except PipelineError as exc:
        _fail("lr-find", str(exc))
    readings = f"steepest {figures['steepest_lr']:.2e}, minimum/10 {figures['min_over_10_lr']:.2e}"
    typer.echo(f"lr-find: suggested train.lr: {figures['suggested_lr']:.2e} ({readings})")


SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="Param override key=value (value read as YAML), as `dvc exp run -S`."),
]
ProjectOption = Annotated[Path, typer.Option("--project", help="Project folder (dvc.yaml, params.yaml).")]
# What a worker whose environment may lag behind the clone runs: the clone's dependencies, checked by pip
# (a few seconds when they are installed already). The clone's own code is imported from the clone itself.
DEFAULT_INSTALL = "python -m pip install --quiet -e ."


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # PyYAML (YAML 1.1) reads 1e-4 as a string


def _overrides(pairs: list[str]) -> dict[str, object]:
    """['train.lr=0.001'] -> {'train.lr': 0.001}; values are YAML, as with `dvc exp run -S`."""
    import yaml

    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PipelineError(f"--set {pair!r}: expected key=value, e.g. --set train.lr=0.001")
        try:
            parsed[key.strip()] = yaml.safe_load(value)
            if isinstance(parsed[key.strip()], str) and _EXPONENT.fullmatch(value.strip()):
                parsed[key.strip()] = float(value)  # YAML 1.2, as `dvc exp run -S` reads it: 1e-4 is a number
        except yaml.YAMLError as exc:
            reason = getattr(exc, "problem", None) or type(exc).__name__
            raise PipelineError(
                f"--set {pair!r}: the value is not valid YAML ({reason}); quote it as a string "
                f"(--set '{key.strip()}=\"...\"') or fix it, e.g. --set train.lr=0.001"
            ) from None
    return parsed


@app.command()
def flow(
    overrides: SetOption = None,
    name: Annotated[str | None, typer.Option("--name", "-n", help="Save the run as DVC experiment NAME.")] = (
        None
    ),
    project: ProjectOption = Path("."),
) -> None:
    """Run the stages as a Prefect flow through DVC (unchanged stages are skipped), then the champion gate."""
    from pipeline.orchestration.deploy import require_prefect_api
    from pipeline.orchestration.dvc_api import DvcFailed
    from pipeline.orchestration.flow import retrain
    from pipeline.orchestration.git import require_identity
    from pipeline.stages.ingest import check_dvc_inputs

    try:
        if name:  # before Prefect starts: a missing git identity would otherwise fail only at the end
            require_identity(project)
        parsed = _overrides(overrides or [])
        loaded = Params.load(project / DEFAULT_PARAMS_FILE, parsed)
        if not loaded.orchestrate.push:  # else the flow checks them after pulling them from the remote
            # Here: a clear line, before Prefect logs a failed flow run. A `file:` model.weights may come from
            # the remote too.
            check_dvc_inputs(loaded.paths, project)
            _check_outputs_and_model(loaded.paths, loaded.model, project)
        require_prefect_api()  # else a run against a server that is down is a 136-line traceback
        result = retrain(project_dir=str(project), overrides=parsed, experiment=name)
    except (PipelineError, DvcFailed) as exc:
        _fail("flow", str(exc))
    typer.echo(json.dumps(result, indent=2, sort_keys=True))


@app.command()
def deploy(
    cron: Annotated[str, typer.Option(help='Schedule in cron syntax, e.g. "0 3 * * *" (03:00 daily).')],
    name: Annotated[str, typer.Option(help="Deployment name.")] = "nightly",
    pool: Annotated[str, typer.Option(help="Process work pool; created when missing.")] = "local",
    serve: Annotated[bool, typer.Option("--serve", help="Serve the schedule from here (blocks).")] = False,
    project: ProjectOption = Path("."),
    repository: Annotated[
        str | None,
        typer.Option(
            help="Git URL: each run clones it (at --ref) instead of using --project, for any worker."
        ),
    ] = None,
    ref: Annotated[str, typer.Option(help="Branch the runs clone and push promoted models to.")] = "main",
    install: Annotated[
        str,
        typer.Option(help="Command(s) each run executes in its clone with the worker's python; '' = none."),
    ] = DEFAULT_INSTALL,
) -> None:
    """Create a scheduled deployment of the retraining flow, run by `prefect worker start --pool POOL`
    (or, with --serve, by this process until it is stopped). With --repository, runs fetch the project."""
    from pipeline.orchestration.deploy import deploy as create_deployment
    from pipeline.orchestration.deploy import deploy_from_git, require_prefect_api

    if repository and serve:
        _fail("deploy", "--serve runs this folder; use --repository with a worker (prefect worker start)")
    try:
        require_prefect_api()
    except PipelineError as exc:
        _fail("deploy", str(exc))
    if repository:
        deployment = deploy_from_git(cron, name, pool, repository, ref, install)
    else:
        deployment = create_deployment(cron, name, work_pool=pool, project_dir=str(project), serve=serve)
    if serve:  # returns only once the serving process is stopped
        return
    typer.echo(f"deployment {deployment} scheduled {cron!r} in work pool {pool!r}")
    typer.echo(f"  run it now:      prefect deployment run {deployment}")
    typer.echo(f"  start a worker:  prefect worker start --pool {pool}")


@app.command()
def sweep(
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set", "-S", help="Swept param key=value[,value...] (values YAML); several: their product."
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Sweep name; its experiments are NAME-1, NAME-2, ...")
    ] = None,
    collect: Annotated[
        str | None, typer.Option(help="Only pull sweep NAME's experiments into this clone and list them.")
    ] = None,
    pool: Annotated[
        str, typer.Option(help="Process work pool the runs go to; created when missing.")
    ] = "sweep",
    limit: Annotated[
        int | None, typer.Option(min=1, help="Set the pool's concurrency limit (runs at once, all workers).")
    ] = None,
    repository: Annotated[
        str | None, typer.Option(help="Git URL the runs clone (default: this branch's upstream remote).")
    ] = None,
    ref: Annotated[str | None, typer.Option(help="Branch the runs clone (default: this one).")] = None,
    install: Annotated[
        str, typer.Option(help="Command(s) each run executes in its clone with the worker's python.")
    ] = DEFAULT_INSTALL,
    promote: Annotated[
        bool, typer.Option(help="Promote the best point the champion gate passes (at most one).")
    ] = True,
    project: ProjectOption = Path("."),
) -> None:
    """Run a parameter grid across Prefect workers, one flow run per point, each saved as a DVC experiment
    and pushed; pull them into this clone (dvc exp show lists them) and promote the best that passes the
    champion gate. The runs go to deployment retrain/sweep, which clones the project from git."""
    from pipeline.orchestration import git
    from pipeline.orchestration import sweep as sweeps
    from pipeline.orchestration.deploy import deploy_from_git, require_prefect_api

    try:
        if collect:
            remote = repository or git.upstream_remote(project)
            if not remote:
                raise PipelineError("sweep: this branch has no upstream remote; give --repository URL")
            names = sweeps.sweep_experiments(project, remote, collect)
            if not names:
                raise PipelineError(f"no experiments of sweep {collect} on {remote}")
            gates = sweeps.pull_experiments(project, remote, names)
            for experiment in names:
                typer.echo(f"{experiment}: {sweeps.gate_line(gates.get(experiment, {}))}")
            typer.echo(f"sweep: pulled {len(names)} experiments; dvc exp show -A lists them")
            return
        points = sweeps.grid(overrides or [], _overrides)
        sweeps.check_points(project, points)
        repository, ref = sweeps.git_source(project, repository, ref)
        _require_team_server()
        require_prefect_api()
        deploy_from_git(None, sweeps.DEPLOYMENT, pool, repository, ref, install, False, limit)
        run = sweeps.Sweep(project, name or sweeps.default_name(), points, typer.echo)
        run.run()
        run.collect(repository)
        ok = sweeps.report(run, promote, ref, typer.echo)
    except PipelineError as exc:
        _fail("sweep", str(exc))
    if not ok:
        raise typer.Exit(1)


@app.command("work-pool")
def work_pool(
    name: Annotated[str, typer.Argument(help="Work pool name (deploy --pool NAME).")],
    gpus: Annotated[int, typer.Option(min=0, help="GPUs each job requests (nvidia.com/gpu).")] = 1,
    image: Annotated[
        str | None, typer.Option(help="Default container image: Python and git, or the whole environment.")
    ] = None,
    show: Annotated[
        bool, typer.Option("--print", help="Print the base job template; create nothing.")
    ] = False,
) -> None:
    """Create a Kubernetes work pool whose jobs request GPUs: prefect-kubernetes' base job template with a
    `gpus` variable. Deployments from git (deploy --repository ... --pool NAME) then run as Kubernetes Jobs,
    taken by `prefect worker start --pool NAME --type kubernetes` in the cluster."""
    from pipeline.orchestration import work_pools
    from pipeline.orchestration.deploy import require_prefect_api

    try:
        if show:
            typer.echo(json.dumps(work_pools.kubernetes_template(gpus, image), indent=2))
            return
        require_prefect_api()
        work_pools.create_kubernetes_pool(name, gpus, image)
    except PipelineError as exc:
        _fail("work-pool", str(exc))
    typer.echo(f"work pool {name!r} (kubernetes): each job requests {gpus} GPU(s)")
    typer.echo(f"  deploy to it:  python -m pipeline deploy --cron ... --repository URL --pool {name}")
    typer.echo(f"  its worker:    prefect worker start --pool {name} --type kubernetes  (in the cluster)")


def _require_team_server() -> None:
    """A sweep's runs go to workers that poll one Prefect server: a temporary local one has none."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise PipelineError(
            "sweep: PREFECT_API_URL is not set; point it at the Prefect server your workers poll "
            "(prefect config set PREFECT_API_URL=http://<server>:4200/api)"
        )


def main() -> None:
    try:
        app()
    except PipelineError as exc:  # raised outside a stage (e.g. params loading in a helper command)
        typer.secho(str(exc), err=True, fg=typer.colors.RED)
        sys.exit(1)
    finally:
        # Python's last collection at exit walks every object torch, Great Expectations and scikit-learn made:
        # 0.5 to 2 s a command (benchmarks/README.md), for memory the OS frees anyway. Frozen objects are
        # skipped; atexit handlers still run and open files are still flushed and closed.
        gc.freeze()


if __name__ == "__main__":
    main()
