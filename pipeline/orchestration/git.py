"""git, as the flow needs it: who commits (`dvc exp save` and a promoted model's pointers are commits), and
committing and pushing a promoted champion's pointers."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from pipeline.errors import PipelineError


def require_identity(project_dir: str | Path) -> None:
    """Raise a PipelineError unless git knows who commits: `dvc exp save` makes a git commit, and without an
    identity it fails only at the end of the run. As in DVC's git backend, GIT_AUTHOR_NAME, GIT_AUTHOR_EMAIL,
    GIT_COMMITTER_NAME and GIT_COMMITTER_EMAIL each fall back to git's user.name / user.email."""
    config = {key: _git_config(Path(project_dir), f"user.{key}") for key in ("name", "email")}
    roles = ("AUTHOR", "COMMITTER")
    missing = [
        f"user.{key}"
        for key in ("name", "email")
        if not all(os.environ.get(f"GIT_{role}_{key.upper()}") or config[key] for role in roles)
    ]
    if missing:
        raise PipelineError(
            f"saving the experiment is a git commit, but git has no {' or '.join(missing)} here; run "
            'git config --global user.name "Your Name"; git config --global user.email you@example.com '
            "(or set GIT_AUTHOR_NAME, GIT_AUTHOR_EMAIL, GIT_COMMITTER_NAME, GIT_COMMITTER_EMAIL), then retry"
        )


def _git_config(project: Path, key: str) -> str:
    """`git config --get key` as git resolves it in `project` (repo, global, system); '' when unset."""
    return run(project, "config", "--get", key, check=False)


def commit_and_push(project: Path, paths: list[Path | str], message: str, log: logging.Logger) -> str:
    """Commit `paths` (those that exist) and push to the branch's upstream when it has one; the new commit."""
    present = [str(path) for path in paths if (project / path).exists()]
    run(project, "add", "--", *present)
    run(project, "commit", "-q", "-m", message)
    revision = run(project, "rev-parse", "HEAD")
    if upstream_remote(project):
        run(project, "push", "-q")
    else:
        log.warning("%s: the branch has no upstream; committed %s without pushing", project, revision)
    return revision


def upstream_remote(project: Path) -> str | None:
    """The git remote the current branch tracks (`origin` in a clone); None without an upstream."""
    branch = run(project, "rev-parse", "--abbrev-ref", "HEAD", check=False)
    return run(project, "config", "--get", f"branch.{branch}.remote", check=False) or None


def run(project: Path, *args: str, check: bool = True) -> str:
    """`git args` in `project`; its output, or '' when it failed and not `check` (else a PipelineError)."""
    try:
        proc = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True)
    except OSError as exc:  # no git at all: DVC experiments and commits cannot work either
        if check:
            raise PipelineError(f"{project}: git is not installed ({exc}); install git") from None
        return ""
    if proc.returncode != 0 and check:
        raise PipelineError(
            f"{project}: git {' '.join(args[:2])} failed: {(proc.stderr or proc.stdout).strip()}"
        )
    return proc.stdout.strip() if proc.returncode == 0 else ""
