#!/usr/bin/env bash
# Install what is missing (Debian's Fashion-MNIST, the project virtualenv and its pinned
# requirements); a quick no-op when everything is there.
#   bash .ci/setup.sh          what the stages and `make demo` need
#   bash .ci/setup.sh --test   also what only the tests need (chromium, requirements-test.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
FOR_TESTS=0
[ "${1:-}" = "--test" ] && FOR_TESTS=1

# Debian packages: the Fashion-MNIST files; for the tests, chromium (the headless browser that
# renders report.html in its test).
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
APT=()
[ -f "$FMNIST" ] || APT+=(dataset-fashion-mnist)
if [ "$FOR_TESTS" = 1 ]; then command -v chromium >/dev/null || APT+=(chromium); fi
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

TEST_STAMP=.venv/.setup-test-stamp
if [ "$FOR_TESTS" = 1 ] && { [ ! -f "$TEST_STAMP" ] || [ requirements-test.txt -nt "$TEST_STAMP" ]; }; then
  echo "setup: installing requirements-test.txt into .venv (--no-deps)"
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -r requirements-test.txt
  touch "$TEST_STAMP"
fi
