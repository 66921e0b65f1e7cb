"""One module per DVC stage; each exposes `run(params) -> dict` (the stage's metrics)."""

STAGES = ("ingest", "validate", "split", "train", "evaluate", "quantize", "export")
