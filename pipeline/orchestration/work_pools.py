"""Work pools beyond processes: a Kubernetes pool whose jobs ask for GPUs.

The template is prefect-kubernetes' own base job template (what `prefect work-pool create --type kubernetes`
starts from) with one variable added, `gpus`, which the job's container requests as `nvidia.com/gpu` (the
NVIDIA device plugin's resource; Kubernetes takes an extended resource's limit as its request). A deployment
from git (`deploy --repository ... --pool NAME`) then runs each flow run as a Kubernetes Job: the container
clones the project, installs it and runs the flow; `train.device: auto` finds the GPU. The image must hold
Python with git; `--install` installs the project into it (or bake the environment into the image and pass
`--install ""`).
"""

from __future__ import annotations

import copy
from typing import Any

from pipeline.errors import PipelineError

GPU_RESOURCE = "nvidia.com/gpu"


def kubernetes_template(gpus: int, image: str | None = None) -> dict[str, Any]:
    """prefect-kubernetes' base job template with a `gpus` variable (default `gpus`) requested by the job's
    container, and `image` as the default image when given."""
    try:
        from prefect_kubernetes.worker import KubernetesWorker
    except ImportError:
        raise PipelineError(
            "a Kubernetes work pool needs prefect-kubernetes: pip install -e '.[cluster]'"
        ) from None
    template = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    variables = template["variables"]["properties"]
    variables["gpus"] = {
        "title": "GPUs",
        "type": "integer",
        "minimum": 0,
        "default": gpus,
        "description": f"GPUs the job's container requests ({GPU_RESOURCE}); 0 runs on any node.",
    }
    if image:
        variables["image"]["default"] = image
    manifest = template["job_configuration"]["job_manifest"]
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["resources"]["limits"][GPU_RESOURCE] = "{{ gpus }}"
    return template


def create_kubernetes_pool(name: str, gpus: int, image: str | None = None) -> dict[str, Any]:
    """Create (or update) Kubernetes work pool `name` with `kubernetes_template`; returns the template."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    template = kubernetes_template(gpus, image)
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="kubernetes", base_job_template=template))
        except ObjectAlreadyExists:
            pool = client.read_work_pool(name)
            if pool.type != "kubernetes":
                raise PipelineError(
                    f"work pool {name!r} exists with type {pool.type}; pick another name or delete it "
                    f"(prefect work-pool delete {name})"
                ) from None
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
    return template
