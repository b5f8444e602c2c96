# Two entry points a new user needs (see README): `make quickstart` and `make test`.
# Both create .venv and install everything on a fresh machine first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup quickstart test lint bench clean-state inception-weights

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed
	bash infra/local/ensure_fashion_mnist.sh
	bash infra/local/ensure_inception_weights.sh

# standard FID/KID Inception weights, offline (part of setup)
inception-weights: $(VENV)/.installed
	bash infra/local/ensure_inception_weights.sh

quickstart: setup
	bash infra/local/quickstart.sh $(ARGS)

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m bench.step
	$(PY) -m bench.attention
	$(PY) -m bench.data_stream
