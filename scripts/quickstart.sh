#!/usr/bin/env bash
# The main job on a fresh machine: install everything, then train -> export -> index -> serve -> query -> report.
# Reruns reuse finished steps (work directory: runs/quickstart).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
latenthash quickstart "$@"
