#!/usr/bin/env bash
# The README's test command: builds the test host if needed (idempotent), then runs every test tier.
# Extra arguments go to pytest (e.g. tools/test.sh tests/unit -k solver). When they ask for the unit tier
# only (paths under tests/unit, or -m unit without paths), only the venv is set up: no ComfyUI, no models,
# no Chromium, no second frontend.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)

unit_only() {  # the arguments name paths under tests/unit only, or -m unit and no path
  local arg prev="" paths=0 marker=0 path
  for arg in "$@"; do
    if [ "$prev" = "-m" ] && [ "$arg" = unit ]; then
      marker=1
    elif [ "${arg#-}" = "$arg" ] && [ "$prev" != "-m" ]; then
      path=$(cd "$REPO" && realpath -e -- "${arg%%::*}" 2>/dev/null) || path=""
      if [ -n "$path" ]; then
        paths=$((paths + 1))
        case "$path/" in "$REPO/tests/unit/"*) ;; *) return 1 ;; esac
      fi
    fi
    prev=$arg
  done
  [ "$paths" -gt 0 ] || [ "$marker" = 1 ]
}

VPY="$REPO/.host/venv/bin/python"
if unit_only "$@"; then
  bash "$REPO/tools/host/setup_host.sh" --venv-only >/dev/null
else
  bash "$REPO/tools/host/setup_host.sh" >/dev/null
  bash "$REPO/tools/host/make_models.sh"
  # the browser tier drives Debian's Chromium (never a downloaded browser)
  if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
      || echo "warning: could not install chromium; the browser tests will be skipped" >&2
  fi
  # ... on the bundled frontend and on the newest one, served with --front-end-root (tests/browser)
  FRONTEND="$REPO/.host/frontend-1.58.1"
  if [ ! -f "$FRONTEND/comfyui_frontend_package/static/index.html" ]; then
    rm -rf "$FRONTEND.part"
    if "$VPY" -m pip install -q --no-deps --target "$FRONTEND.part" comfyui-frontend-package==1.58.1; then
      rm -rf "$FRONTEND" && mv "$FRONTEND.part" "$FRONTEND"
    else
      echo "warning: could not install comfyui-frontend-package 1.58.1; its browser tests will be skipped" >&2
    fi
  fi
  # outside validators of the example workflows (tests/api/test_example_validators.py), into the venv if missing
  if [ ! -x "$REPO/.host/venv/bin/comfy" ] || [ ! -x "$REPO/.host/venv/bin/comfy-lint" ]; then
    "$VPY" -m pip install -q comfy-cli==1.23.0 comfy-lint==0.1.0 >/dev/null 2>&1 \
      || echo "warning: could not install comfy-cli / comfy-lint; their checks of the examples will be skipped" >&2
  fi
fi
cd "$REPO"
export OMP_NUM_THREADS=1
exec "$VPY" -m pytest -q -p no:cacheprovider "$@"
