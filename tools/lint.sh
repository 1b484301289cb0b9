#!/usr/bin/env bash
# Lint and type checks (.ci/run runs them before the tests): ruff on everything, mypy on the shipped pack (strict
# on fusion/). Sets up the venv if needed (tools/host/setup_host.sh --venv-only).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VPY="$REPO/.host/venv/bin/python"
bash "$REPO/tools/host/setup_host.sh" --venv-only >/dev/null
# a host made before the linters joined requirements-dev.txt gets them now
"$VPY" -m ruff --version >/dev/null 2>&1 && "$VPY" -m mypy --version >/dev/null 2>&1 \
  || "$VPY" -m pip install -q -r "$REPO/requirements-dev.txt"
cd "$REPO"
echo "ruff:" && "$VPY" -m ruff check --no-cache .
# mypy checks the pack as the package ComfyUI imports (nodes/ imports reach the root): the checkout is linked under
# a fixed package name, in a folder of this checkout's own (checkouts may share one .host)
TYPECHECK=$(mktemp -d)
trap 'rm -rf "$TYPECHECK"' EXIT
ln -s "$REPO" "$TYPECHECK/mixofshow"
CACHE="${TMPDIR:-/tmp}/mixofshow-mypy-$(printf %s "$REPO" | sha1sum | cut -c1-12)"
# (run from there: from the checkout, ComfyUI's top-level `nodes` would resolve to the pack's nodes/)
echo "mypy:" && (cd "$TYPECHECK" && MYPYPATH="$TYPECHECK" "$VPY" -m mypy --config-file "$REPO/pyproject.toml" \
  --cache-dir "$CACHE" -p mixofshow)
