"""SAGAN as a library: layers, models, losses, the training step, checkpoints, data, metrics and
figures. Never imports ray or mlflow; the rooms and the data flow: docs/ARCHITECTURE.md."""
