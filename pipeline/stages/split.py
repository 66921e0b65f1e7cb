"""Stage: split (placeholder until its issue lands)."""

from pipeline.config import Params
from pipeline.errors import PipelineError


def run(params: Params) -> dict:
    raise PipelineError("not implemented yet")
