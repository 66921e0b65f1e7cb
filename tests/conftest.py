"""Fixtures shared by the tests, and an isolated environment for the tools (set before any test runs).

Plain helpers live in `helpers.py` (tests import them from there); this file holds only fixtures.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from helpers import (
    S3_BUCKET,
    SHIP_ANY_INT8,
    commit,
    free_port,
    make_image_folder,
    model_project,
    run_tool,
    tiny_dvc_project,
)

from pipeline.config import Params

# Tools must never phone home or write into the user's home from tests.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="pipeline-tests-prefect-"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # A worker per core runs the files (./run.sh test): one thread each, inherited by the tools they start, so
    # the workers' OpenMP threads never outnumber the cores (spin-waiting made that 10x slower; single_thread)
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")
for _var, _value in {"GIT_AUTHOR_NAME": "tests", "GIT_AUTHOR_EMAIL": "tests@example.invalid"}.items():
    os.environ.setdefault(_var, _value)  # experiments commit in temp repos; CI may have no git identity
    os.environ.setdefault(_var.replace("AUTHOR", "COMMITTER"), _value)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def built_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This project's dvc.yaml, params.yaml (made tiny) and code in a temp git+DVC repo, run once with
    `dvc repro` and committed. Session-wide and shared: use `copy_project` before changing anything."""
    root = tiny_dvc_project(tmp_path_factory.mktemp("built") / "project")
    run_tool(root, "dvc", "repro")
    commit(root, "pipeline run once")
    return root


@pytest.fixture(scope="session")
def exported_project(tmp_path_factory: pytest.TempPathFactory) -> Params:
    """A `model_project` quantized and exported once, with calibration temperature 1.7. Shared: read only."""
    from pipeline.io import write_json
    from pipeline.stages import export, quantize

    params = model_project(tmp_path_factory.mktemp("exported"), quantize=SHIP_ANY_INT8)
    write_json(params.paths.calibration, {"temperature": 1.7})
    quantize.run(params)
    export.run(params)
    return params


@pytest.fixture
def single_thread():
    """Torch on one thread for the test: tiny tensors gain nothing from more, and on a busy machine OpenMP's
    spin-waiting made tiny training runs 10x slower with two threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3-compatible server (moto) on 127.0.0.1 with an empty bucket; fake credentials in the env."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
            env.setenv(name, value)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=S3_BUCKET)
        yield endpoint
    server.stop()
