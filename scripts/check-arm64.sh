#!/usr/bin/env bash
# Check the base runtime on aarch64 (every Jetson's CPU) without ARM hardware: a Debian arm64 userland run by
# qemu-user. Inside it: install the base package (no torch) from PyPI's aarch64 wheels, run the kernel parity tests,
# then scripts/smoke.py (encode with a small exported model, index, search, serve and query).
#
#   sudo bash scripts/check-arm64.sh        # as root: debootstrap, binfmt_misc and chroot need it
#
# The arm64 root (~800 MB) is made once and kept in ARM64_ROOT (default ~/.cache/latenthash/arm64-bookworm); the
# model is trained and exported here on the host (.venv, made by scripts/setup.sh if missing). Figures say nothing
# about a Jetson's speed: emulation is 10-50x slower than native.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"  # chroot, debootstrap and update-binfmts live there; a user's PATH may lack them
[ "$(id -u)" = 0 ] || { echo "check-arm64: run as root (debootstrap, binfmt_misc, chroot): sudo bash $0" >&2; exit 2; }
ROOT=${ARM64_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/latenthash/arm64-bookworm}
started=$(date +%s)
say() { echo "check-arm64 [$(( $(date +%s) - started )) s]: $*" >&2; }

if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null \
   || ! command -v update-binfmts >/dev/null; then
  say "installing qemu-user-static, binfmt-support, debootstrap"
  apt-get update -qq && apt-get install -y -qq qemu-user-static binfmt-support debootstrap >/dev/null
fi
if [ "$(uname -m)" != aarch64 ]; then
  mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
fi

if [ ! -x "$ROOT/opt/venv/bin/python" ]; then
  if [ ! -x "$ROOT/usr/bin/python3" ]; then
    mirror=$(grep -hoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/*.sources \
             /etc/apt/sources.list 2>/dev/null | head -n1 | grep -oE 'https?://[^ ]+' || true)
    say "debootstrap arm64 bookworm into $ROOT (about 3-6 min)"
    rm -rf "$ROOT"
    mkdir -p "$(dirname "$ROOT")"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$ROOT" "${mirror:-http://deb.debian.org/debian}" >/dev/null
  fi
fi

# The chroot: /proc with an aarch64 cpuinfo (QEMU passes the host's x86 one through, and onnxruntime's CPU detection
# crashes on it), /dev, the host's DNS and CA bundle, Fashion-MNIST for the parity tests, the project's files.
mounts=()
cleanup() {
  for (( i=${#mounts[@]}-1; i>=0; i-- )); do umount -l "${mounts[i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
bind() { if [ -d "$1" ]; then mkdir -p "$2"; else touch "$2"; fi; mount --bind "$1" "$2"; mounts+=("$2"); }
mount -t proc proc "$ROOT/proc"; mounts+=("$ROOT/proc")
bind /sys "$ROOT/sys"
bind /dev "$ROOT/dev"
bind /dev/pts "$ROOT/dev/pts"
cpuinfo=$(mktemp)
for n in 0 1; do
  printf 'processor\t: %s\nBogoMIPS\t: 62.50\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: 0xd42\nCPU revision\t: 1\n\n' "$n"
done > "$cpuinfo"
bind "$cpuinfo" "$ROOT/proc/cpuinfo"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
[ -f "$ca" ] && cp "$ca" "$ROOT/etc/ssl/certs/host-ca.crt"
if [ -d /usr/share/datasets/fashion-mnist ]; then bind /usr/share/datasets/fashion-mnist "$ROOT/usr/share/datasets/fashion-mnist"; fi
rm -rf "$ROOT/src" && mkdir -p "$ROOT/src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$ROOT/src"

# A small real model, trained and exported on the host (torch is not part of the base runtime)
[ -x .venv/bin/python ] || bash scripts/setup.sh
work=$(mktemp -d)
say "training and exporting a small digits model on the host"
.venv/bin/latenthash train --dataset digits --bits 16 --epochs 2 --feature-dim 32 --out "$work/run" >/dev/null 2>&1
.venv/bin/latenthash export "$work/run" --out "$ROOT/src/smoke-model.onnx" >/dev/null 2>&1
.venv/bin/python -c "
import numpy as np
from latenthash.export.data import load_dataset
np.save('$ROOT/src/smoke-images.npy', load_dataset('digits').test.images[:64])"
rm -rf "$work"

run() { chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/opt/venv/bin:/usr/bin:/bin PIP_CERT=/etc/ssl/certs/host-ca.crt \
          PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 NUMBA_CACHE_DIR=/root/numba-cache "$@"; }
[ -x "$ROOT/opt/venv/bin/python" ] || { say "making /opt/venv in the arm64 root"; run python3 -m venv /opt/venv; }
say "installing the base package and pytest from PyPI's aarch64 wheels"
run python -m pip install -q /src pytest
run python -c "import platform, numpy, numba, onnxruntime, grpc; print('arm64 root:', platform.machine(), 'numpy',
numpy.__version__, 'numba', numba.__version__, 'onnxruntime', onnxruntime.__version__, 'grpcio', grpc.__version__)"
say "kernel parity tests (tests/test_kernels.py)"
run sh -c 'cd /src && python -m pytest -q -p no:cacheprovider tests/test_kernels.py'
say "smoke: encode, index, search, serve"
run python /src/scripts/smoke.py --model /src/smoke-model.onnx --images /src/smoke-images.npy
say "passed in $(( $(date +%s) - started )) s"
