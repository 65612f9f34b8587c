#!/usr/bin/env bash
# Install what is missing (Debian's Fashion-MNIST, the project virtualenv and its pinned
# requirements); a quick no-op when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the Fashion-MNIST files, and chromium (the headless browser that renders
# report.html in its test).
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
APT=()
[ -f "$FMNIST" ] || APT+=(dataset-fashion-mnist)
command -v chromium >/dev/null || APT+=(chromium)
if [ ${#APT[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing Debian's ${APT[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${APT[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi

STAMP=.venv/.setup-stamp
if [ ! -f "$STAMP" ] || [ requirements.txt -nt "$STAMP" ]; then
  echo "setup: installing requirements.txt into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  touch "$STAMP"
fi
