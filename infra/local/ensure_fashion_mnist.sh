#!/usr/bin/env bash
# Make the offline Fashion-MNIST copy available at /usr/share/datasets/fashion-mnist
# (Debian package dataset-fashion-mnist, MIT licence). Idempotent; used by `make setup`.
set -euo pipefail
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ]; then exit 0; fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
if ! command -v apt-get >/dev/null; then
  echo "Fashion-MNIST missing at $DIR and apt-get is unavailable: install the Debian package" \
       "dataset-fashion-mnist, or download the four *-ubyte.gz files into $DIR" >&2
  exit 1
fi
echo "installing dataset-fashion-mnist (offline Fashion-MNIST) ..."
$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || {
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null
}
test -f "$DIR/train-images-idx3-ubyte.gz"
