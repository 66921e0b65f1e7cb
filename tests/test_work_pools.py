"""A Kubernetes work pool whose jobs request GPUs, checked as data without a cluster: the pool is created on
a real Prefect server, a deployment from git goes to it, and the Kubernetes Job its worker would submit for a
flow run is rendered by prefect-kubernetes itself and read back as a Kubernetes `V1Job`."""

from __future__ import annotations

import asyncio
import json

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.testing.utilities import prefect_test_harness
from typer.testing import CliRunner

from pipeline.__main__ import app
from pipeline.orchestration import work_pools
from pipeline.orchestration.deploy import deploy_from_git

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=90):
        yield


def test_the_template_is_prefect_kubernetes_own_with_a_gpu_request():
    from prefect_kubernetes.worker import KubernetesWorker

    template = work_pools.kubernetes_template(2, image="registry.example.com/classifier:1")
    stock = KubernetesWorker.get_default_base_job_template()

    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"][work_pools.GPU_RESOURCE] == "{{ gpus }}"
    variables = template["variables"]["properties"]
    assert variables["gpus"]["default"] == 2 and variables["image"]["default"].endswith("classifier:1")
    assert set(variables) - set(stock["variables"]["properties"]) == {"gpus"}  # nothing else added
    stock_container = stock["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    del container["resources"]["limits"][work_pools.GPU_RESOURCE]
    assert container == stock_container  # the rest is prefect-kubernetes' template as it ships

    printed = CliRunner().invoke(app, ["work-pool", "gpu", "--gpus", "1", "--print"])
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.output)["variables"]["properties"]["gpus"]["default"] == 1


def test_a_deployment_on_the_pool_renders_a_kubernetes_job_that_requests_the_gpus(prefect_api, tmp_path):
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    created = CliRunner().invoke(app, ["work-pool", "gpu-pool", "--image", "team/classifier:3"])
    assert created.exit_code == 0, created.output
    name = deploy_from_git(
        "0 3 * * *", "nightly-gpu", "gpu-pool", "https://git.example.com/team/classifier.git", "main", ""
    )
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("gpu-pool")
        deployment = client.read_deployment_by_name(name)
        flow_run = client.create_flow_run_from_deployment(deployment.id)
        flow = client.read_flow(deployment.flow_id)
    assert pool.type == "kubernetes" and deployment.work_pool_name == "gpu-pool"
    assert next(iter(deployment.pull_steps[0])).endswith("git_clone")  # the job clones the project

    values = {**(deployment.job_variables or {}), **(flow_run.job_variables or {})}
    configuration = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(pool.base_job_template, values)
    )
    configuration.prepare_for_flow_run(flow_run, deployment, flow)

    job = asyncio.run(_as_kubernetes_job(configuration.job_manifest))
    container = job.spec.template.spec.containers[0]
    assert container.resources.limits[work_pools.GPU_RESOURCE] == "1"  # a quantity, as Kubernetes reads it
    assert container.image == "team/classifier:3"
    assert container.args == ["prefect", "flow-run", "execute"]
    env = {entry.name: entry.value for entry in container.env}
    assert env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    assert job.spec.template.spec.restart_policy == "Never"

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="process-pool", type="process"))
    refused = CliRunner().invoke(app, ["work-pool", "process-pool"])
    assert refused.exit_code == 1 and "exists with type process" in refused.output, refused.output


async def _as_kubernetes_job(manifest: dict):
    """`manifest` read into Kubernetes' own model of a Job, by its client's deserializer."""
    from kubernetes_asyncio.client import ApiClient

    async with ApiClient() as api:
        return api._ApiClient__deserialize(manifest, "V1Job")
