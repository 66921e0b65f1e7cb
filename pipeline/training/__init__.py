"""Training machinery used by the `train` stage: precision, distributed setup, optimizers and schedules,
losses, cached features, checkpoints and the epoch loop. Each module is small and testable on its own."""
