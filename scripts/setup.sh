#!/usr/bin/env bash
# Install latenthash into the project's own virtual environment, .venv: the system Python stays untouched (Debian
# and Ubuntu refuse pip installs into it, PEP 668). apt is used only for what pip cannot bring, and says so:
# Debian's Fashion-MNIST package, python3-venv where the system Python lacks it, and for the tests (the dev extra)
# qemu-user-static, which emulates an AVX2-only x86 CPU.
# EXTRAS picks the extras (default: everything the tests need); the CPU build of torch is pinned and installed
# first, since an unpinned torch pulls a multi-GB CUDA build (on machines without this project's local wheel it
# comes from PyTorch's CPU index: see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
apt_install() {
  command -v apt-get >/dev/null || return 1
  echo "setup: apt-get install $* (needs root)" >&2
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "$@"
}
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  apt_install dataset-fashion-mnist || echo "setup: Fashion-MNIST not installed; the main job uses scikit-learn's digits" >&2
fi
EXTRAS=${EXTRAS:-train,server,milvus,ray,dev}
if [[ ",$EXTRAS," == *,dev,* && "$(uname -m)" == x86_64 ]] && ! command -v qemu-x86_64-static >/dev/null; then
  # the tests run INT8 models on an emulated AVX2-only CPU (tests/test_export_encoder.py)
  apt_install qemu-user-static || echo "setup: qemu-user-static not installed: the AVX2-only CPU test fails" >&2
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    apt_install python3-venv
    "$PY" -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]"
echo "$EXTRAS" > .venv/latenthash-extras  # the tests fail, not skip, when a package of these is missing
echo "setup: installed into $(pwd)/.venv (activate with: . .venv/bin/activate)" >&2
