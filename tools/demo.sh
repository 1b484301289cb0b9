#!/usr/bin/env bash
# The README's main job: set everything up (idempotent), then run the demo generation.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
bash "$REPO/tools/host/setup_host.sh"
SD15="$REPO/.host/models/sd15_random_fp16.safetensors"
[ -f "$SD15" ] || (mkdir -p "$(dirname "$SD15")" && cd /tmp && \
  "$REPO/.host/venv/bin/python" "$REPO/tools/host/make_sd15_random.py" "$REPO/.host/ComfyUI" "$SD15")
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} exec "$REPO/.host/venv/bin/python" "$REPO/tools/demo.py" "$@"
