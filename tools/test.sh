#!/usr/bin/env bash
# The README's test command: builds the test host if needed (idempotent), then runs every test tier.
# Extra arguments go to pytest (e.g. tools/test.sh tests/unit -k solver).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
bash "$REPO/tools/host/setup_host.sh" >/dev/null
VPY="$REPO/.host/venv/bin/python"
SD15="$REPO/.host/models/sd15_random_fp16.safetensors"
if [ ! -f "$SD15" ]; then
  mkdir -p "$(dirname "$SD15")"
  (cd /tmp && "$VPY" "$REPO/tools/host/make_sd15_random.py" "$REPO/.host/ComfyUI" "$SD15")
fi
cd "$REPO"
export OMP_NUM_THREADS=1
exec "$VPY" -m pytest -q -p no:cacheprovider "$@"
