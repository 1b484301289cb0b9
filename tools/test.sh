#!/usr/bin/env bash
# The README's test command: builds the test host if needed (idempotent), then runs every test tier.
# Extra arguments go to pytest (e.g. tools/test.sh tests/unit -k solver).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
bash "$REPO/tools/host/setup_host.sh" >/dev/null
VPY="$REPO/.host/venv/bin/python"
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
cd "$REPO"
export OMP_NUM_THREADS=1
exec "$VPY" -m pytest -q -p no:cacheprovider "$@"
