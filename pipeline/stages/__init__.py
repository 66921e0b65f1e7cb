"""One module per DVC stage; each exposes `run(params) -> dict` (the stage's metrics).

SUMMARIES is the one list of them, in DAG order, with what each does (STAGES: their names): the CLI makes a
command of each, the Prefect flow a task, and the tests check `dvc.yaml` against it.
"""

SUMMARIES = {
    "ingest": "Scan the data source, hash and decode every image (in bounded memory), write the manifest.",
    "validate": "Check the manifest (pandera schema + Great Expectations rules); quarantine unusable files.",
    "audit": "Embed every image: near-duplicates, likely label errors (cleanlab), drift since the champion.",
    "split": "Stratified train/val/test split that keeps exact and near-duplicates together.",
    "train": "Fine-tune the pretrained backbone (resumes from the last complete epoch).",
    "evaluate": "Test-split metrics, calibration, plots and report.html.",
    "quantize": "ONNX export and INT8 candidates judged against FP32; the best passing one ships.",
    "export": "Assemble the self-contained export folder and check ONNX/PyTorch parity.",
}
STAGES = tuple(SUMMARIES)
