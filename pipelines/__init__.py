"""Entry points (train.py, tune.py, prepare_data.py, evaluate.py, sample.py) and the modules that
wire sagan/ to Ray Train, Ray Tune and MLflow; which module does what: docs/ARCHITECTURE.md."""
