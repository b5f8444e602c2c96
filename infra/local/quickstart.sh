#!/usr/bin/env bash
# From a fresh clone to a trained, registered SAGAN in the MLflow UI, in one command:
#
#   make quickstart                          # = bash infra/local/quickstart.sh
#   bash infra/local/quickstart.sh train.steps=50 model.g_attention=[]    # config overrides
#
# Steps: virtualenv + project install -> offline Fashion-MNIST -> local stack (S3, MLflow,
# Ray head) -> shards into s3://$SAGAN_DATA_BUCKET/fashion-mnist-32 (train split) and
# fashion-mnist-32-test (held-out test split, for FID) -> `ray job submit` of
# pipelines/train.py --config configs/quickstart.yaml (logs followed) -> MLflow UI address, the
# registered model URI, its FID and the champion. Every step is skipped when already done, so
# re-running is cheap.
#
# Arguments are passed to pipelines/train.py after the config (KEY=VALUE overrides or flags
# such as --workers 1). Environment knobs:
#   SAGAN_CONFIG            run config (default configs/quickstart.yaml); any config that trains
#                           on the Fashion-MNIST shards, e.g. configs/quality32.yaml (longer run)
#   SAGAN_STATE_DIR         stack state dir (default <repo>/.state)
#   SAGAN_UP_ARGS           extra options for `infra/local/up`, e.g. "--free-ports"
#   SAGAN_QUICKSTART_LIMIT  prepare only this many images (a seeded subset; default: all 60000)
#   SAGAN_SKIP_SETUP=1      skip steps 1-2 (venv/install, dataset): tests use it so they never
#                           pip-install into a virtualenv that others are using
#   PYTHON                  interpreter used to create .venv (default python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
CONFIG="${SAGAN_CONFIG:-configs/quickstart.yaml}"
[ -f "$CONFIG" ] || { printf 'error: SAGAN_CONFIG: no such file %s\n' "$CONFIG" >&2; exit 2; }
DATASET_PREFIX="fashion-mnist-32"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- 1. virtualenv + project
if [ "${SAGAN_SKIP_SETUP:-0}" = 1 ]; then
  [ -x "$VENV/bin/python" ] || die "SAGAN_SKIP_SETUP=1 but there is no $VENV"
elif [ ! -x "$VENV/bin/python" ]; then
  step "Creating the virtualenv $VENV"
  "${PYTHON:-python3}" -m venv "$VENV" || die "could not create $VENV. On Debian/Ubuntu: \
sudo apt-get install python3-venv"
fi
# Same marker as the Makefile: reinstall only when pyproject.toml changed.
if [ "${SAGAN_SKIP_SETUP:-0}" != 1 ] && { [ ! -f "$VENV/.installed" ] \
    || [ pyproject.toml -nt "$VENV/.installed" ]; }; then
  step "Installing the project and its dependencies (pip install -e '.[dev]')"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e '.[dev]'
  touch "$VENV/.installed"
fi
export PATH="$VENV/bin:$PATH"  # `python` and `ray` below are the project's

# ---------------------------------------------------------------- 2. dataset
if [ "${SAGAN_SKIP_SETUP:-0}" != 1 ]; then
  step "Fashion-MNIST (offline copy in /usr/share/datasets/fashion-mnist)"
  bash infra/local/ensure_fashion_mnist.sh
  echo "ok"
fi

# ---------------------------------------------------------------- 3. local stack
step "Local stack: S3 (SeaweedFS), MLflow server, Ray head"
# shellcheck disable=SC2086  # SAGAN_UP_ARGS is a list of options on purpose
python -m infra.local up ${SAGAN_UP_ARGS:-}
STATE_DIR="${SAGAN_STATE_DIR:-$ROOT/.state}"
# shellcheck disable=SC1091
source "$STATE_DIR/env"

# ---------------------------------------------------------------- 4. shards in S3
# Training shards from the train split; the held-out real set FID is measured against from
# the test split (FID against the training images would reward memorisation).
DATA="s3://$SAGAN_DATA_BUCKET/$DATASET_PREFIX"
HELDOUT="s3://$SAGAN_DATA_BUCKET/$DATASET_PREFIX-test"
prepared() {
  python - "$SAGAN_DATA_BUCKET" "$1/manifest.json" <<'PY'
import sys

import boto3

try:
    boto3.client("s3").head_object(Bucket=sys.argv[1], Key=sys.argv[2])
except Exception:
    sys.exit(1)
PY
}
for split in train test; do
  if [ "$split" = train ]; then out="$DATA"; prefix="$DATASET_PREFIX"; else
    out="$HELDOUT"; prefix="$DATASET_PREFIX-test"; fi
  step "Fashion-MNIST $split split -> $out"
  if prepared "$prefix"; then
    echo "already prepared (manifest.json present)"
  else
    limit_args=()
    if [ "$split" = train ] && [ -n "${SAGAN_QUICKSTART_LIMIT:-}" ]; then
      limit_args=(--limit "$SAGAN_QUICKSTART_LIMIT")
    fi
    python pipelines/prepare_data.py fashion-mnist "$out" --image-size 32 --split "$split" \
      "${limit_args[@]}"
  fi
done

# ---------------------------------------------------------------- 5. train on Ray
step "Submitting pipelines/train.py --config $CONFIG to $RAY_API_SERVER_ADDRESS"
echo "(Ctrl-C stops following the logs, not the job: 'ray job stop <id>' stops it)"
# The working dir is uploaded to the cluster; keep environments, state and outputs out of it
# (.gitignore is honoured too; these are listed so a custom .gitignore cannot bloat uploads).
# Checkpoints go to <repo>/runs (absolute: the job runs in a copy of the working dir), so a
# re-run with the same cluster.run_name resumes; later arguments override any of this.
# The upload carries no .git: the commit (and a dirty flag) of this checkout travel in the
# job's environment, so MLflow records the code version the run was submitted from.
EXCLUDES='{"excludes": ["/.git/", "/.venv/", "/.state/", "/data/", "/runs/", "/mlruns/", "/bench/results/"]}'
SUBMISSION_ID="$(basename "$CONFIG" .yaml)-$(date +%Y%m%d-%H%M%S)"
if ! ray job submit --address "$RAY_API_SERVER_ADDRESS" --submission-id "$SUBMISSION_ID" \
    --working-dir . --runtime-env-json "$(python -m pipelines.lineage --runtime-env "$EXCLUDES")" \
    -- python pipelines/train.py --config "$CONFIG" "data.path=$DATA" \
       "eval.real_path=$HELDOUT" "cluster.storage_path=$ROOT/runs" "$@"; then
  die "the training job failed; logs: ray job logs --address $RAY_API_SERVER_ADDRESS $SUBMISSION_ID"
fi

# ---------------------------------------------------------------- 6. where to look
step "Done"
python - "$CONFIG" "$@" <<'PY'
import os
import sys

from mlflow import MlflowClient

from pipelines.config import load_run_config

overrides = [a for a in sys.argv[2:] if "=" in a and not a.startswith("-")]
cfg = load_run_config(sys.argv[1], overrides)
name = cfg.tracking.registered_model
uri = os.environ["MLFLOW_TRACKING_URI"]
client = MlflowClient(uri)
print(f"MLflow UI:         {uri}   (experiment '{cfg.tracking.experiment}')")
try:
    mv = client.get_model_version_by_alias(name, "latest")
except Exception as exc:  # registration can be switched off (--no-register)
    print(f"Registered model:  models:/{name}@latest   (not found: {exc})")
    sys.exit(1)
fid = mv.tags.get("fid")
n = cfg.eval.num_samples
print(f"Registered model:  models:/{name}@latest   (version {mv.version}, run {mv.run_id}, "
      f"step {mv.tags.get('step')})")
if fid is None:
    print("FID:               not measured (eval.eval_every is 0)")
else:
    print(f"FID:               {float(fid):.1f}   (EMA generator, {n} samples vs "
          f"{cfg.eval.real_samples} held-out test images, standard Inception features)")
try:
    champ = client.get_model_version_by_alias(name, "champion")
    print(f"Champion:          models:/{name}@champion   (version {champ.version}, "
          f"FID {float(champ.tags['fid']):.1f})")
except Exception:
    print(f"Champion:          none yet (models:/{name}@champion needs a measured FID)")
PY
echo
echo "Stack stays up for more runs: 'source $STATE_DIR/env'. infra/local/down stops it and keeps"
echo "the shards, runs and models for the next infra/local/up; 'infra/local/down --purge' deletes them."
