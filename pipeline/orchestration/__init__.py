"""Running the stages beyond one command: the Prefect flow and its deployments, DVC's Python API, the champion
gate, git, and the generated files (dvc.yaml, params.yaml's paths) that tie the stage contracts to DVC."""
