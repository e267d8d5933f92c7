#!/usr/bin/env bash
# The main job on a fresh machine: install what it uses into .venv, then train -> export -> index -> serve -> query
# -> report. Reruns reuse finished steps (work directory: runs/quickstart).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-train,server} bash scripts/setup.sh
.venv/bin/latenthash quickstart "$@"
