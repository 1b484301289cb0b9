#!/usr/bin/env bash
# The demo/test models that are generated, never downloaded (cached in .host/models, git-ignored):
# a full-size random-weight SD1.5 checkpoint and a random T2I-Adapter with the OpenPose adapter's layout.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
VPY="$REPO/.host/venv/bin/python"
COMFY=${MIXOFSHOW_COMFYUI:-$REPO/.host/ComfyUI}   # the same rule as comfy_root() in comfy_server.py
mkdir -p "$REPO/.host/models"
SD15="$REPO/.host/models/sd15_random_fp16.safetensors"
[ -f "$SD15" ] || (cd /tmp && "$VPY" "$REPO/tools/host/make_sd15_random.py" "$COMFY" "$SD15")
ADAPTER="$REPO/.host/models/t2iadapter_openpose_random.safetensors"
[ -f "$ADAPTER" ] || (cd /tmp && "$VPY" "$REPO/tools/host/make_t2i_adapter_random.py" "$COMFY" "$ADAPTER")
