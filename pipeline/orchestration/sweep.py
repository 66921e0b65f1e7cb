"""Sweeps across Prefect workers: one flow run of a deployment from git per point of a parameter grid, each
saved as a DVC experiment and pushed, so that `dvc exp show` on any clone lists the sweep side by side.

Nothing here schedules: Prefect's workers take the runs (as many at once as the work pool's concurrency limit
and each worker's `--limit` allow), DVC's run cache and remote carry what one run computed to the others, and
git carries the experiments. The sweep only submits, waits and reads:

1. The stages before the first one that reads a swept key are the same for every point: one run computes
   them first (`until`) and pushes them, so every point restores them from the run cache.
2. One run per point (`dvc exp save` as `<sweep>-<k>`, then `dvc exp push`); the champion gate judges each
   against the champion without replacing it. A point that fails fails alone, with its message.
3. `dvc exp pull` of the finished points into this clone; among those the gate passed, the best by the gate's
   figure (accuracy or mAP on the same test images) is promoted by one more run of that point with
   `commit`: its stages all restore from the run cache, the gate replaces the champion and the run commits
   and pushes it, as the nightly deployment does. So a sweep promotes at most one model.

Time and memory grow with the points (one flow run each); the driver holds a line per point.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.config import DEFAULT_PARAMS_FILE, Params
from pipeline.errors import PipelineError
from pipeline.orchestration import dvc_api, git
from pipeline.orchestration.champion import GATE
from pipeline.orchestration.flow import FLOW_NAME
from pipeline.stages import contracts

DEPLOYMENT = "sweep"  # retrain/sweep: the deployment from git that every sweep's runs go to
SHARE = {"orchestrate.push": True}  # every run pulls, and pushes its outputs, run cache and experiment


@dataclass
class Point:
    """One point of the grid and what became of its flow run."""

    experiment: str
    overrides: dict[str, Any]
    run_id: Any = None
    state: str = "SCHEDULED"
    message: str = ""
    gate: dict[str, Any] = field(default_factory=dict)  # metrics/promote.json of its experiment


def grid(pairs: list[str], parse: Callable[[list[str]], dict[str, Any]]) -> list[dict[str, Any]]:
    """`['train.lr=1e-4,3e-4', 'model.backbone=a,b']` -> the 4 points of their product, in order. Values are
    split at commas outside brackets and quotes (`train.augment.scale=[0.5,1.0],[0.8,1.0]` is two values),
    then read by `parse` (YAML, as `dvc exp run -S`)."""
    axes = []
    for pair in pairs:
        key, sep, values = pair.partition("=")
        if not sep or not key.strip():
            raise PipelineError(f"-S {pair!r}: expected key=value[,value...], e.g. -S train.lr=1e-4,3e-4")
        axes.append([parse([f"{key}={value}"]) for value in _split_values(values)])
    points = [dict(item for part in combo for item in part.items()) for combo in itertools.product(*axes)]
    if not points or points == [{}]:
        raise PipelineError("sweep: no points; give at least one -S key=value[,value...]")
    return points


def _split_values(text: str) -> list[str]:
    values, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += char
    return [*values, current]


def shared_until(keys: list[str]) -> str | None:
    """The last stage of the run of stages, from the first, that read none of `keys`; None when the first
    stage reads one. (A key `train.lr` is read by a stage whose params hold `train` or `train.lr`; one a
    stage only `warms` a cache with changes none of its outputs.)"""
    last = None
    for name, stage in contracts().items():
        if any(_reads(param, key) for param in stage.params for key in keys):
            break
        last = name
    return last


def _reads(param: str, key: str) -> bool:
    return key == param or key.startswith(f"{param}.") or param.startswith(f"{key}.")


def check_points(project: Path, points: list[dict[str, Any]]) -> None:
    """Each point's params as the project's params.yaml with its overrides; the first bad one is a
    PipelineError naming the point (a run would fail the same way on a worker, after its set-up)."""
    for point in points:
        try:
            Params.load(project / DEFAULT_PARAMS_FILE, {**point, **SHARE})
        except PipelineError as exc:
            raise PipelineError(f"sweep point {_shown(point)}: {exc}") from None
        for key, value in point.items():
            if isinstance(value, float) and value.is_integer() and abs(value) >= 2**63:
                raise PipelineError(
                    f"sweep point {key}={value:g}: a Prefect server on PostgreSQL stores run parameters as "
                    "JSONB, which reads this number back as an integer beyond 64 bits and then fails to list "
                    "the run; use a value below 9.2e18"
                )


def default_name() -> str:
    return f"sweep-{datetime.now():%Y%m%d-%H%M%S}"


class Sweep:
    """Submits the runs of one sweep to deployment retrain/sweep and follows them on the Prefect server."""

    def __init__(self, project: Path, name: str, points: list[dict[str, Any]], log: Callable[[str], None]):
        self.project, self.name, self.log = project, name, log
        self.points = [Point(f"{name}-{k}", overrides) for k, overrides in enumerate(points, start=1)]
        self.deployment = f"{FLOW_NAME}/{DEPLOYMENT}"

    def run(self, poll_s: float = 2.0) -> None:
        """Shared stages once, then every point; returns when all runs have ended."""
        keys = sorted({key for point in self.points for key in point.overrides})
        until = shared_until(keys)
        if until:
            self.log(
                f"sweep {self.name}: stages up to {until} read none of {', '.join(keys)}: they run first"
            )
            first = self._submit(f"{self.name}-shared", {"overrides": SHARE, "until": until})
            state, message = self._wait([first], poll_s)[0]
            if state != "COMPLETED":
                raise PipelineError(
                    f"sweep {self.name}: the run of the shared stages {state.lower()}: {message}"
                )
        for point in self.points:
            parameters = {
                "overrides": {**point.overrides, **SHARE},
                "experiment": point.experiment,
                "replace_champion": False,
            }
            point.run_id = self._submit(point.experiment, parameters)
            self.log(f"sweep {self.name}: submitted {point.experiment} {_shown(point.overrides)}")
        ended = self._wait([point.run_id for point in self.points], poll_s)
        for point, (state, message) in zip(self.points, ended, strict=True):
            point.state, point.message = state, message

    def _submit(self, run_name: str, parameters: dict[str, Any]) -> Any:
        from prefect.deployments import run_deployment

        flow_run = run_deployment(
            self.deployment, parameters=parameters, timeout=0, flow_run_name=run_name,
            tags=["sweep", self.name], as_subflow=False,
        )  # fmt: skip
        return flow_run.id

    def _wait(self, run_ids: list[Any], poll_s: float) -> list[tuple[str, str]]:
        """Each run's final state type and message, in order, once all have ended."""
        from prefect.client.orchestration import get_client

        ended: dict[Any, tuple[str, str]] = {}
        with get_client(sync_client=True) as client:
            while len(ended) < len(run_ids):
                for run_id in run_ids:
                    if run_id in ended:
                        continue
                    flow_run = client.read_flow_run(run_id)
                    state = flow_run.state
                    if state is not None and state.is_final():
                        ended[run_id] = (state.type.value, _first_error(state.message or ""))
                        self.log(f"sweep {self.name}: {flow_run.name} {state.type.value.lower()}")
                if len(ended) < len(run_ids):
                    time.sleep(poll_s)
        return [ended[run_id] for run_id in run_ids]

    def collect(self, remote: str) -> list[Point]:
        """Pull the finished points' experiments from git `remote` into this clone and read each one's gate
        decision."""
        finished = [point for point in self.points if point.state == "COMPLETED"]
        gates = pull_experiments(self.project, remote, [point.experiment for point in finished])
        for point in finished:
            point.gate = gates.get(point.experiment, {})
        return finished

    def best(self) -> Point | None:
        """The finished point the gate passed with the highest figure (first on ties); None when none."""
        passed = [p for p in self.points if p.gate.get("promoted") and p.gate.get("new") is not None]
        return max(passed, key=lambda point: point.gate["new"], default=None)

    def promote(self, point: Point, poll_s: float = 2.0) -> tuple[str, str]:
        """One run of `point` with `commit`: it restores every stage from the run cache, and the gate replaces
        the champion and commits and pushes it. Its final state and message."""
        parameters = {"overrides": {**point.overrides, **SHARE}, "commit": True}
        run_id = self._submit(f"{point.experiment}-promote", parameters)
        return self._wait([run_id], poll_s)[0]


def pull_experiments(project: Path, remote: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """`dvc exp pull` of `names` from git `remote` (a name or URL; their outputs stay on the DVC remote: `dvc
    exp apply` + `dvc pull` fetch one); each one's gate decision from its commit (empty when it has none)."""
    if not names:
        return {}

    def pull(repo) -> dict[str, str]:
        from dvc.repo.experiments.utils import resolve_name

        repo.experiments.pull(remote, names, pull_cache=False)
        return {name: str(ref) for name, ref in resolve_name(repo.scm, names).items() if ref is not None}

    refs, _ = dvc_api.call(project, "exp pull", pull)
    record = Params.load(project / DEFAULT_PARAMS_FILE).paths.metrics(GATE).as_posix()
    gates = {}
    for name, ref in refs.items():
        text = git.run(project, "show", f"{ref}:{record}", check=False)
        gates[name] = json.loads(text) if text else {}
    return gates


def sweep_experiments(project: Path, remote: str, sweep: str) -> list[str]:
    """The names of the experiments of `sweep` (`<sweep>-<k>`) on git `remote`, any baseline, in order."""

    def listed(repo) -> dict:
        return repo.experiments.ls(git_remote=remote, all_commits=True)

    by_baseline, _ = dvc_api.call(project, "exp list", listed)
    names = {name for entries in by_baseline.values() for name, _sha in entries}
    return sorted((n for n in names if n.startswith(f"{sweep}-") and n[len(sweep) + 1 :].isdigit()),
                  key=lambda n: int(n[len(sweep) + 1 :]))  # fmt: skip


def git_source(project: Path, repository: str | None, ref: str | None) -> tuple[str, str]:
    """The git repository and branch the runs clone: as given, else this branch's upstream and this branch."""
    if not repository:
        remote = git.upstream_remote(project)
        repository = remote and git.run(project, "remote", "get-url", remote)
    if not repository:
        raise PipelineError("sweep: this branch has no upstream remote; give --repository URL and --ref")
    return repository, ref or git.run(project, "rev-parse", "--abbrev-ref", "HEAD")


def gate_line(gate: dict[str, Any]) -> str:
    """A point's gate decision in a few words."""
    if not gate:
        return "no gate decision recorded"
    verdict = "passes the gate" if gate.get("promoted") else "blocked by the gate"
    figure = f"{gate.get('metric')} {gate['new']:.4f}" if gate.get("new") is not None else gate.get("metric")
    return f"{figure}, {verdict} ({gate.get('reason')})"


def report(sweep: Sweep, promote: bool, ref: str, log: Callable[[str], None]) -> bool:
    """A line per point, then the promotion of the best passing one (with `promote`); True when every point
    and the promotion run finished."""
    for point in sweep.points:
        shown = gate_line(point.gate) if point.state == "COMPLETED" else point.message
        log(f"{point.experiment} {point.state.lower()}: {_shown(point.overrides)}: {shown}")
    finished = sum(point.state == "COMPLETED" for point in sweep.points)
    ok = finished == len(sweep.points)
    best = sweep.best()
    if promote and best:
        state, message = sweep.promote(best)
        ok = ok and state == "COMPLETED"
        outcome = "promoted" if state == "COMPLETED" else f"promotion run {state.lower()}: {message}"
        log(f"sweep {sweep.name}: {best.experiment} {outcome} (pushed to {ref})")
    elif promote:
        log(f"sweep {sweep.name}: no point passed the champion gate; the champion stays")
    log(f"sweep {sweep.name}: {finished} of {len(sweep.points)} points finished; dvc exp show -A lists them")
    return ok


def _shown(overrides: dict[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in overrides.items())


def _first_error(message: str) -> str:
    """The line of a failed run's message that says why: the stage's own error line when DVC quotes one."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.split(":", 1)[0] in contracts() and ": done in" not in line:
            return line
    return lines[0] if lines else ""
