#!/usr/bin/env bash
# Single entry point for a fresh machine: builds .venv when missing or stale, then
#   ./run.sh pipeline   -> the whole DVC pipeline on the configured data (bundled sample by default)
#   ./run.sh test       -> the test suite
#   ./run.sh <cmd...>   -> any command inside the environment (e.g. ./run.sh dvc exp show)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV="${PIPELINE_VENV:-.venv}"
[[ "$VENV" == /* ]] || VENV="$PWD/$VENV"  # PIPELINE_VENV may be absolute or relative to the project
STAMP="$VENV/.installed"
export DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1

started=$SECONDS
step() { echo ">> [$((SECONDS - started)) s] $*"; }  # one line per step, with the seconds since the start

ensure_env() {
    if [[ -f "$STAMP" && "$STAMP" -nt pyproject.toml ]]; then return; fi
    local pip=("$VENV/bin/pip" install --disable-pip-version-check --progress-bar off)  # a line per package
    step "creating $VENV (first run only)"
    python3 -m venv "$VENV"
    # torch first, pinned to the build this machine kind carries on disk, so pip never resolves another.
    step "installing torch and torchvision (about 1 min)"
    "${pip[@]}" "torch==2.14.1" "torchvision==0.29.1"
    step "installing the pipeline and its dependencies (about 1 min)"
    "${pip[@]}" -e ".[dev]"
    touch "$STAMP"
    step "environment ready"
}

ensure_test_tools() {  # Debian's chromium opens the HTML reports (tests/test_pages.py, never a downloaded one);
    # qemu-user runs INT8 models as on an AVX2-only CPU (tests/stages/test_quantize_cpus.py); postgresql backs
    # the team's Prefect server (tests/test_sweep.py starts its own, nothing runs as a service)
    local missing=()
    [[ -x /usr/bin/chromium ]] || missing+=(chromium)
    command -v qemu-x86_64 >/dev/null || missing+=(qemu-user)
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
    if [[ ${#missing[@]} -eq 0 || $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then return; fi
    echo ">> installing Debian ${missing[*]} for the tests (apt-get install ${missing[*]})"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_env
export PATH="$VENV/bin:$PATH"

case "${1:-pipeline}" in
    pipeline)
        shift || true
        python -m pipeline check   # params and input paths, one line each, before DVC's own [Errno 2]
        dvc repro "$@"
        if ! dvc remote default >/dev/null 2>&1; then   # DVC's hint above assumes a remote exists
            echo ">> no DVC remote is set, so outputs stay on this machine; to share them, see docs/teams.md"
        fi
        python -m pipeline outputs
        ;;
    test)
        shift
        ensure_test_tools
        # One test file per worker process, a worker per core (pytest-xdist); `-n 0` runs them in this process
        python -m pytest -n auto --dist loadfile "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
