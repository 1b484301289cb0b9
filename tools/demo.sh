#!/usr/bin/env bash
# The README's main job: set everything up (idempotent), then run the demo generation.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
bash "$REPO/tools/host/setup_host.sh"
bash "$REPO/tools/host/make_models.sh"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} exec "$REPO/.host/venv/bin/python" "$REPO/tools/demo.py" "$@"
