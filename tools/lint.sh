#!/usr/bin/env bash
# Lint and type checks (run by .ci/run before the tests): ruff on everything, mypy on the shipped package
# (strict on fusion/). Uses the host venv (tools/host/setup_host.sh --venv-only makes it).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VPY="$REPO/.host/venv/bin/python"
cd "$REPO"
"$VPY" -m ruff check --no-cache .
# mypy checks the pack as the package ComfyUI imports (its relative imports reach the root): link the checkout
# under a fixed package name
TYPECHECK="$REPO/.host/typecheck"
mkdir -p "$TYPECHECK"
ln -sfn "$REPO" "$TYPECHECK/mixofshow"
MYPYPATH="$TYPECHECK" "$VPY" -m mypy --cache-dir "$REPO/.host/mypy-cache" -p mixofshow
