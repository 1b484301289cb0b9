#!/usr/bin/env bash
# The GPU check: every figure the pack promises, in under 10 minutes on one H100-class NVIDIA GPU, printed as
# one table. What runs is the table of checks below (CHECKS), one row per check: adding a check is adding a
# row. Today's rows:
#   fusion-3, fusion-14  whole fusion at the reference settings (20 steps at 512x512, whole-block rank-4
#                        ED-LoRAs): total and per-stage times, peak VRAM (targets on an H200: < 10 s, < 60 s);
#   solver               the per-layer solver benchmark (closed form vs the node's lbfgs mode vs the published
#                        L-BFGS);
#   regional             the regional step vs the stock KSampler (3 and 5 regions, prompts only);
#   regional-loras       the same with a LoRA per region (3 regions, one pass), and the N-pass approach;
#   sdxl-regional        SDXL regional sampling at 1024x1024: stock vs 3 regions vs a LoRA per region vs N-pass
#                        (target <= 1.10x for the LoRAs; needs the full-size random SDXL, made when missing);
#   sdxl-encode          the SDXL layer-wise encode vs the stock encoder, and what the shared encodes save;
#   sdxl-fusion          whole SDXL fusion, 3 attention-only SDXL ED-LoRAs at 1024x1024, 20 steps: per-stage times,
#                        peak VRAM, Gram memory (goal: under a minute);
#   train                ED-LoRA training vs core's Train LoRA (SD1.5, 512x512, batch 2, UNet rank 4, bf16):
#                        seconds per step, steps per second, peak VRAM;
#   sdxl-train           the same on SDXL (1024x1024, batch 1, UNet rank 4, bf16; the full-size random SDXL).
#
#   bash benchmarks/gpu_check.sh            # from a checkout with .host (the test host) carried
#   bash benchmarks/gpu_check.sh --dry-run  # every row's plumbing on the CPU with tiny settings (no GPU needed;
#                                           # tests/inprocess/test_gpu_check.py runs it)
#
# Python: the first of $MIXOFSHOW_GPU_PYTHON, .host/venv/bin/python, python3 whose torch sees CUDA. The host
# venv has a CPU torch; a system Python with a CUDA torch but without ComfyUI's packages gets a throw-away
# venv (--system-site-packages) that adds the host venv's packages after its own (same Python version only).
# Models: made by tools/host/make_models.sh when missing (nothing is downloaded). Logs: $OUT (default: a
# temporary folder).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$(mktemp -d /tmp/mixofshow-gpu-check.XXXXXX)}
mkdir -p "$OUT"
VENV_PY="$REPO/.host/venv/bin/python"
T0=$(date +%s)

# ------------------------------------------------------------------------------------------- the checks
# One row per check, fields separated by "|":
#   name | title (the report's heading) | timeout s | arguments on the GPU | arguments in --dry-run | shown as
# Arguments start with the script, run by the picked Python from the repository root; they are split as
# the shell splits words (quote an argument with spaces in single quotes), and no field may contain "|". "shown as" picks the report's formatter: fusion or solver (the
# tables in the report below), lines:REGEX (the log's lines matching REGEX, as they are) or after:REGEX
# (the log's non-empty lines from the first one matching REGEX). A timeout is a cap that also has to cover
# the row's CPU dry run (the tiny SDXL encode takes ~100 s on 2 loaded cores), not an estimate of the GPU
# run, which should take under 10 minutes in all.
CHECKS=(
  "fusion-3 | whole fusion, 3 concepts | 100 | benchmarks/bench_fusion.py --gpu --concepts 3 --steps 20 --size 512 --json | benchmarks/bench_fusion.py --tiny --concepts 2 --steps 1 --size 64 --json | fusion"
  "fusion-14 | whole fusion, 14 concepts | 150 | benchmarks/bench_fusion.py --gpu --concepts 14 --steps 20 --size 512 --json | benchmarks/bench_fusion.py --tiny --concepts 3 --steps 1 --size 64 --json | fusion"
  "solver | per-layer solver (3 concepts, rank 4), seconds per layer | 80 | benchmarks/bench_solver.py --device cuda --quick --lbfgs-budget 10 --json | benchmarks/bench_solver.py --device cpu --quick --only q_proj --lbfgs-budget 2 --json | solver"
  "regional | regional step vs the stock KSampler, prompts only (SD1.5, 512x256) | 60 | benchmarks/bench_regional.py --gpu --steps 4 --repeats 3 --no-memory --cases stock,3,5 | benchmarks/bench_regional.py --steps 1 --repeats 1 --width 64 --height 64 --no-memory --cases stock,3 | lines:ratio"
  "regional-loras | regional step with a LoRA per region, and N-pass (SD1.5, 512x256) | 70 | benchmarks/bench_regional.py --gpu --steps 4 --repeats 3 --no-memory --cases 'stock,3 LoRAs,N-pass 3' | benchmarks/bench_regional.py --steps 1 --repeats 1 --width 64 --height 64 --no-memory --cases 'stock,3 LoRAs' | lines:ratio"
  # SDXL sampling (issue 19)
  "sdxl-regional | SDXL regional step vs the stock KSampler, 1024x1024 (--dry-run: the tiny SDXL) | 420 | benchmarks/bench_regional.py --sdxl --gpu --steps 4 --repeats 3 --width 1024 --height 1024 --no-memory | benchmarks/bench_regional.py --sdxl --tiny --steps 1 --repeats 1 --width 64 --height 64 --no-memory --cases 'stock,3 LoRAs' | lines:ratio"
  "sdxl-encode | SDXL layer-wise encode: seconds, ratio to the stock encoder, sequences encoded | 300 | benchmarks/bench_conditioning.py --sdxl --gpu --repeats 3 | benchmarks/bench_conditioning.py --sdxl --tiny --repeats 1 | after:^## SDXL"
  # SDXL fusion (issue 20): Concept Conductor's attention-only files, 1024x1024, 20 steps (goal: under a minute)
  "sdxl-fusion | whole SDXL fusion, 3 concepts, 1024x1024 (--dry-run: the tiny SDXL) | 240 | benchmarks/bench_fusion.py --sdxl --gpu --concepts 3 --steps 20 --size 1024 --attention-only --json | benchmarks/bench_fusion.py --sdxl --tiny --concepts 2 --steps 1 --size 64 --json | fusion"
  # the trainer (issue 21)
  "train | ED-LoRA training vs core's Train LoRA (SD1.5, 512x512, batch 2, UNet rank 4, bf16) | 240 | benchmarks/bench_train.py --gpu --resolution 512 --batch 2 --steps 5 --repeats 2 --no-memory --json | benchmarks/bench_train.py --tiny --resolution 64 --batch 1 --steps 1 --repeats 1 --no-memory --json | train"
  "sdxl-train | ED-LoRA training vs core's Train LoRA (SDXL, 1024x1024, batch 1, UNet rank 4, bf16; --dry-run: the tiny SDXL) | 300 | benchmarks/bench_train.py --sdxl --gpu --resolution 1024 --batch 1 --steps 5 --repeats 2 --no-memory --json | benchmarks/bench_train.py --sdxl --tiny --resolution 64 --batch 1 --steps 1 --repeats 1 --no-memory --json | train"
)

say() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*" >&2; }

has_cuda() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }
has_comfy_deps() {  # what ComfyUI imports to load a checkpoint and sample (torchvision/torchaudio aside)
  (cd "$REPO/.host/ComfyUI" && "$1" -c "import torch, safetensors, einops, transformers, tokenizers, torchsde, scipy, \
PIL, yaml, aiohttp, psutil, tqdm, sqlalchemy, numpy; import comfy.model_management" >/dev/null 2>&1)
}

pick_python() {
  local candidates=() py
  [ -n "${MIXOFSHOW_GPU_PYTHON:-}" ] && candidates+=("$MIXOFSHOW_GPU_PYTHON")
  [ -x "$VENV_PY" ] && candidates+=("$VENV_PY")
  for py in python3 python; do command -v "$py" >/dev/null && candidates+=("$(command -v "$py")"); done
  for py in "${candidates[@]}"; do
    has_cuda "$py" || continue
    if has_comfy_deps "$py"; then echo "$py"; return 0; fi
    # a CUDA torch without ComfyUI's packages: borrow them from the host venv (same Python version)
    local want have
    want=$("$VENV_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
    have=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    [ "$want" = "$have" ] || { say "$py has CUDA but not ComfyUI's packages (Python $have, host venv $want)"; continue; }
    local overlay="$OUT/gpu-venv" site
    "$py" -m venv --system-site-packages --without-pip "$overlay" >/dev/null 2>&1 || continue
    site=$("$overlay/bin/python" -c 'import site; print(site.getsitepackages()[0])')
    host_site=$("$VENV_PY" -c 'import site; print(site.getsitepackages()[0])')
    # sitecustomize runs after every site directory is on sys.path: the host packages come last, so the
    # system's CUDA torch wins over the host venv's CPU torch
    printf 'import sys\nsys.path.append(%s)\n' "'$host_site'" > "$site/sitecustomize.py"
    if has_cuda "$overlay/bin/python" && has_comfy_deps "$overlay/bin/python"; then echo "$overlay/bin/python"; return 0; fi
    say "$py has CUDA, but ComfyUI does not import with the host venv's packages added"
  done
  return 1
}

if [ "$DRY" = 1 ]; then
  PY="$VENV_PY"
  say "dry run on the CPU with tiny settings (the plumbing, not the numbers)"
elif ! PY=$(pick_python); then
  cat >&2 <<EOF
gpu_check: no Python here has a CUDA-enabled torch (checked: \$MIXOFSHOW_GPU_PYTHON, $VENV_PY, python3, python).
The host venv's torch is the CPU build. Point MIXOFSHOW_GPU_PYTHON at a Python whose torch was built with CUDA
(torch.cuda.is_available() must be True), e.g.  MIXOFSHOW_GPU_PYTHON=/opt/conda/bin/python bash benchmarks/gpu_check.sh
EOF
  exit 3
fi
say "python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -1))"
if [ ! -f "$REPO/.host/models/sd15_random_fp16.safetensors" ]; then
  say "making the random full-size SD1.5 (tools/host/make_models.sh)"
  bash "$REPO/tools/host/make_models.sh" >"$OUT/models.log" 2>&1 || { say "make_models.sh failed: $OUT/models.log"; exit 4; }
fi
if [ "$DRY" = 0 ] && [ ! -f "$REPO/.host/models/sdxl_random_fp16.safetensors" ]; then
  say "making the random full-size SDXL (tools/host/make_models.sh --sdxl)"
  bash "$REPO/tools/host/make_models.sh" --sdxl >"$OUT/models_sdxl.log" 2>&1 \
    || { say "make_models.sh --sdxl failed: $OUT/models_sdxl.log"; exit 4; }
fi
[ "$DRY" = 0 ] && "$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB')" >"$OUT/gpu.txt" 2>&1

trim() { local t="$1"; t="${t#"${t%%[![:space:]]*}"}"; echo "${t%"${t##*[![:space:]]}"}"; }
: >"$OUT/checks.tsv"  # per check: name, title, shown as, log, exit code, seconds (what the report reads)
number=0
for row in "${CHECKS[@]}"; do
  number=$((number + 1))
  IFS='|' read -r name title limit gpu_args dry_args show <<<"$row"
  name=$(trim "$name"); title=$(trim "$title"); limit=$(trim "$limit"); show=$(trim "$show")
  if [ "$DRY" = 1 ]; then eval "args=($dry_args)"; else eval "args=($gpu_args)"; fi
  say "$number/${#CHECKS[@]} $name: ${args[*]}"
  started=$(date +%s)
  timeout "$limit" "$PY" "${args[@]}" >"$OUT/$name.log" 2>&1
  code=$?
  [ "$code" = 124 ] && say "$name ran past its $limit s"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$title" "$show" "$OUT/$name.log" "$code" \
    "$(( $(date +%s) - started ))" >>"$OUT/checks.tsv"
done

"$VENV_PY" - "$OUT" "$DRY" "$(( $(date +%s) - T0 ))" <<'EOF'
import json, re, sys
from pathlib import Path

out, dry, wall = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])


def last_json(text, prefix=""):
    """The value on the last line that starts with ``prefix`` and parses as JSON after it."""
    for ln in reversed(text.splitlines()):
        if ln.startswith(prefix):
            try:
                return json.loads(ln[len(prefix):])
            except json.JSONDecodeError:
                continue
    return None


def fusion(text):
    runs = last_json(text)
    if not isinstance(runs, list):
        return None
    head = (f"{'N':>3s} {'total s':>8s} {'target':>8s} {'ident':>6s} {'text rec/sol':>13s} {'k/v rec/sol':>12s} "
            f"{'unet rec/sol':>13s} {'peak VRAM':>10s} {'cache MiB':>9s}")
    rows = [head, "-" * len(head)]
    targets = {3: 10.0, 14: 60.0}
    for r in runs:
        s = r["seconds"]
        rs = lambda st: f"{s.get(st + '_record', 0):.1f}/{s.get(st + '_solve', 0):.1f}"  # noqa: E731
        target = targets.get(r["n"])
        verdict = "" if dry or target is None else (f"<{target:.0f} ok" if r["total"] < target else f"<{target:.0f} NO")
        vram = f"{r['peak_vram_mib'] / 1024:8.1f}G" if "peak_vram_mib" in r else f"{'-':>9s}"
        rows.append(f"{r['n']:3d} {r['total']:8.1f} {verdict:>8s} {s.get('identity', 0):6.1f} {rs('text'):>13s} "
                    f"{rs('cross_kv'):>12s} {rs('unet'):>13s} {vram:>10s} {r['cache_mib']:9.1f}")
    return rows


def solver(text):
    layers = last_json(text, "JSON ")
    if not layers:
        return None
    head = f"{'layer':24s} {'rows/c':>7s} {'closed':>8s} {'node lbfgs':>11s} {'published':>10s} {'speed-up':>9s} {'cf<=lb':>7s}"
    rows = [head, "-" * len(head)]
    for r in layers:
        pub = f"{'~' if r['extrapolated'] else ''}{r['lbfgs_s']:.2f}"
        rows.append(f"{r['layer']:24s} {r['rows']:7d} {r['closed_s']:8.3f} {r['node_lbfgs_s']:11.2f} {pub:>10s} "
                    f"{r['lbfgs_s'] / max(r['closed_s'], 1e-9):8.0f}x {'yes' if r['cf_le_lb'] else 'NO':>7s}")
    return rows


def train(text):
    cases = last_json(text, "JSON ")
    if not cases:
        return None
    head = f"{'case':24s} {'s/step':>8s} {'steps/s':>8s} {'ratio':>6s} {'peak VRAM':>10s}"
    rows = [head, "-" * len(head)]
    for r in cases:
        vram = f"{r['peak_vram_mib'] / 1024:9.2f}G" if "peak_vram_mib" in r else f"{'-':>10s}"
        rows.append(f"{r['case']:24s} {r['s_per_step']:8.3f} {1 / max(r['s_per_step'], 1e-9):8.2f} "
                    f"{r['ratio']:6.2f} {vram:>10s}")
    return rows


FORMATTERS = {"fusion": fusion, "solver": solver, "train": train}


def shown(how, text):
    lines = text.splitlines()
    if how.startswith("lines:"):
        return [ln for ln in lines if re.search(how[len("lines:"):], ln)] or None
    if how.startswith("after:"):
        start = next((i for i, ln in enumerate(lines) if re.search(how[len("after:"):], ln)), len(lines))
        return [ln for ln in lines[start:] if ln.strip()] or None
    return FORMATTERS[how](text)


gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "CPU (dry run)"
report = [f"GPU check -- {gpu}; wall {wall} s{' -- DRY RUN, tiny settings' if dry else ''}"]
for number, line in enumerate((out / "checks.tsv").read_text().splitlines(), 1):
    name, title, how, log, code, seconds = line.split("\t")
    text = Path(log).read_text(errors="replace")
    rows = shown(how, text) if code == "0" else None
    status = "ok" if rows else f"FAILED (exit {code}{', timed out' if code == '124' else ''}; see {log})"
    report += ["", f"{number}. {name}: {title} [{seconds} s, {status}]"] + ["   " + r for r in rows or []]
print("\n".join(report))
EOF
