#!/usr/bin/env bash
# The demo/test models that are generated, never downloaded (cached in .host/models, git-ignored):
# a full-size random-weight SD1.5 checkpoint and a random T2I-Adapter with the OpenPose adapter's layout.
# --sdxl also makes the full-size random-weight SDXL checkpoint (sdxl_random_fp16.safetensors, about 6.5 GiB,
# written tensor by tensor) and a random T2I-Adapter with the SDXL OpenPose adapter's layout: the SDXL example,
# the SDXL benchmarks and the full-size SDXL checks use them; CI does not make them.
# Run it under the big-model lock (flock /tmp/mixofshow-bigmodel.lock ...): one such process at a time.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
VPY="$REPO/.host/venv/bin/python"
COMFY=${MIXOFSHOW_COMFYUI:-$REPO/.host/ComfyUI}   # the same rule as comfy_root() in comfy_server.py
mkdir -p "$REPO/.host/models"
SD15="$REPO/.host/models/sd15_random_fp16.safetensors"
[ -f "$SD15" ] || (cd /tmp && "$VPY" "$REPO/tools/host/make_sd15_random.py" "$COMFY" "$SD15")
ADAPTER="$REPO/.host/models/t2iadapter_openpose_random.safetensors"
[ -f "$ADAPTER" ] || (cd /tmp && "$VPY" "$REPO/tools/host/make_t2i_adapter_random.py" "$COMFY" "$ADAPTER")
if [ "${1:-}" = "--sdxl" ]; then
  SDXL="$REPO/.host/models/sdxl_random_fp16.safetensors"
  [ -f "$SDXL" ] || (cd /tmp && "$VPY" "$REPO/tools/host/make_sdxl_random.py" "$COMFY" "$SDXL")
  XL_ADAPTER="$REPO/.host/models/t2iadapter_openpose_sdxl_random.safetensors"
  [ -f "$XL_ADAPTER" ] || (cd /tmp && "$VPY" "$REPO/tools/host/make_t2i_adapter_random.py" "$COMFY" "$XL_ADAPTER" --xl)
fi
