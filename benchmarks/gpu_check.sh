#!/usr/bin/env bash
# The GPU check of gradient fusion and SDXL sampling on one large NVIDIA GPU, printed as one table:
#   1. whole fusion at the reference settings (20 steps at 512x512, whole-block rank-4 ED-LoRAs) for 3 and
#      14 concepts: total and per-stage times, peak VRAM (targets on an H200: < 10 s and < 60 s);
#   2. the per-layer solver benchmark on CUDA (closed form vs the node's lbfgs mode vs the published L-BFGS);
#   3. the regional-sampling ratio (benchmarks/bench_regional.py; it runs on the CPU);
#   4. SDXL regional sampling on the GPU at 1024x1024 (bench_regional.py --sdxl: stock vs 3 regions vs 3 regions
#      each with its own LoRA vs N-pass; target <= 1.10x for the LoRAs);
#   5. the SDXL layer-wise encode on the GPU (bench_conditioning.py --sdxl: 70 copies vs the stock encoder, and
#      what the shared encodes save);
#   6. ED-LoRA training vs core's Train LoRA (benchmarks/bench_train.py): s/step, steps/s and peak VRAM, SD1.5 at
#      512x512 batch 2 (bf16).
# Parts 1-3 and 6 take under 8 minutes; 4-5 need the full-size random SDXL (made here when missing: a 6.5 GiB file,
# a few minutes on the machine's CPU) and add an estimated 3-5 minutes (not yet run on a GPU).
#
#   bash benchmarks/gpu_check.sh            # from a checkout with .host (the test host) carried
#   bash benchmarks/gpu_check.sh --dry-run  # the same plumbing on the CPU with tiny settings (no GPU needed)
#
# Python: the first of $MIXOFSHOW_GPU_PYTHON, .host/venv/bin/python, python3 whose torch sees CUDA. The host
# venv has a CPU torch; a system Python with a CUDA torch but without ComfyUI's packages gets a throw-away
# venv (--system-site-packages) that adds the host venv's packages after its own (same Python version only).
# Models: made by tools/host/make_models.sh when missing. Logs: $OUT (default: a temporary folder).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$(mktemp -d /tmp/mixofshow-gpu-check.XXXXXX)}
mkdir -p "$OUT"
VENV_PY="$REPO/.host/venv/bin/python"
T0=$(date +%s)

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
  FUSION_ARGS=(--tiny --concepts 2,3 --steps 1 --size 64 --json)
  SOLVER_ARGS=(--device cpu --quick --only q_proj --lbfgs-budget 2 --json)
  REGIONAL_ARGS=(--steps 1 --repeats 1 --width 64 --height 64 --no-memory)
  SDXL_REGIONAL_ARGS=(--sdxl --tiny --steps 1 --repeats 1 --width 64 --height 64 --no-memory --cases "stock,3 LoRAs")
  SDXL_ENCODE_ARGS=(--sdxl --tiny --repeats 1)
  TRAIN_ARGS=(--tiny --resolution 64 --batch 1 --steps 1 --repeats 1 --no-memory --json)
  say "dry run on the CPU with tiny settings (the plumbing, not the numbers)"
else
  if ! PY=$(pick_python); then
    cat >&2 <<EOF
gpu_check: no Python here has a CUDA-enabled torch (checked: \$MIXOFSHOW_GPU_PYTHON, $VENV_PY, python3, python).
The host venv's torch is the CPU build. Point MIXOFSHOW_GPU_PYTHON at a Python whose torch was built with CUDA
(torch.cuda.is_available() must be True), e.g.  MIXOFSHOW_GPU_PYTHON=/opt/conda/bin/python bash benchmarks/gpu_check.sh
EOF
    exit 3
  fi
  FUSION_ARGS=(--gpu --concepts 3,14 --steps 20 --size 512 --json)
  SOLVER_ARGS=(--device cuda --quick --lbfgs-budget 10 --json)
  REGIONAL_ARGS=(--steps 2 --repeats 2 --no-memory)
  SDXL_REGIONAL_ARGS=(--sdxl --gpu --steps 4 --repeats 3 --width 1024 --height 1024 --no-memory)
  SDXL_ENCODE_ARGS=(--sdxl --gpu --repeats 3)
  TRAIN_ARGS=(--gpu --resolution 512 --batch 2 --steps 5 --repeats 2 --no-memory --json)
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

say "1/6 whole fusion, ${FUSION_ARGS[*]}"
timeout 240 "$PY" benchmarks/bench_fusion.py "${FUSION_ARGS[@]}" >"$OUT/fusion.log" 2>&1
echo "exit $?" >>"$OUT/fusion.log"
say "2/6 per-layer solver, ${SOLVER_ARGS[*]}"
timeout 80 "$PY" benchmarks/bench_solver.py "${SOLVER_ARGS[@]}" >"$OUT/solver.log" 2>&1
echo "exit $?" >>"$OUT/solver.log"
say "3/6 regional sampling ratio (CPU), ${REGIONAL_ARGS[*]}"
timeout 80 "$VENV_PY" benchmarks/bench_regional.py "${REGIONAL_ARGS[@]}" >"$OUT/regional.log" 2>&1
echo "exit $?" >>"$OUT/regional.log"
say "4/6 SDXL regional sampling, ${SDXL_REGIONAL_ARGS[*]}"
timeout 420 "$PY" benchmarks/bench_regional.py "${SDXL_REGIONAL_ARGS[@]}" >"$OUT/sdxl_regional.log" 2>&1
echo "exit $?" >>"$OUT/sdxl_regional.log"
say "5/6 SDXL layer-wise encode, ${SDXL_ENCODE_ARGS[*]}"
timeout 300 "$PY" benchmarks/bench_conditioning.py "${SDXL_ENCODE_ARGS[@]}" >"$OUT/sdxl_encode.log" 2>&1
echo "exit $?" >>"$OUT/sdxl_encode.log"
say "6/6 ED-LoRA training vs core's Train LoRA, ${TRAIN_ARGS[*]}"
timeout 240 "$PY" benchmarks/bench_train.py "${TRAIN_ARGS[@]}" >"$OUT/train.log" 2>&1
echo "exit $?" >>"$OUT/train.log"

"$VENV_PY" - "$OUT" "$DRY" "$(( $(date +%s) - T0 ))" <<'EOF'
import json, re, sys
from pathlib import Path

out, dry, wall = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])


def last_json(log, prefix):
    lines = [ln for ln in (out / log).read_text(errors="replace").splitlines() if ln.startswith(prefix)]
    return json.loads(lines[-1][len(prefix):]) if lines else None


def failed(log):
    text = (out / log).read_text(errors="replace")
    code = re.findall(r"^exit (\d+)$", text, re.M)
    return None if code and code[-1] == "0" else f"failed (exit {code[-1] if code else '?'}; see {out / log})"


gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "CPU (dry run)"
rows = [f"GPU check of gradient fusion and SDXL -- {gpu}; wall {wall} s{' -- DRY RUN, tiny settings' if dry else ''}",
        ""]
fusion = None
try:
    fusion = json.loads([ln for ln in (out / "fusion.log").read_text().splitlines() if ln.startswith("[{")][-1])
except (IndexError, json.JSONDecodeError):
    pass
rows.append("1. whole fusion (reference settings: 20 steps at 512x512, whole-block rank-4 ED-LoRAs)")
head = (f"   {'N':>3s} {'total s':>8s} {'target':>8s} {'ident':>6s} {'text rec/sol':>13s} {'k/v rec/sol':>12s} "
        f"{'unet rec/sol':>13s} {'peak VRAM':>10s} {'cache MiB':>9s}")
rows += [head, "   " + "-" * (len(head) - 3)]
if fusion:
    targets = {3: 10.0, 14: 60.0}
    for r in fusion:
        s = r["seconds"]
        rs = lambda st: f"{s.get(st + '_record', 0):.1f}/{s.get(st + '_solve', 0):.1f}"  # noqa: E731
        target = targets.get(r["n"])
        verdict = "" if dry or target is None else (f"<{target:.0f} ok" if r["total"] < target else f"<{target:.0f} NO")
        vram = f"{r['peak_vram_mib'] / 1024:8.1f}G" if "peak_vram_mib" in r else f"{'-':>9s}"
        rows.append(f"   {r['n']:3d} {r['total']:8.1f} {verdict:>8s} {s.get('identity', 0):6.1f} {rs('text'):>13s} "
                    f"{rs('cross_kv'):>12s} {rs('unet'):>13s} {vram:>10s} {r['cache_mib']:9.1f}")
else:
    rows.append("   " + (failed("fusion.log") or "no result"))
rows += ["", "2. per-layer solver (3 concepts, rank 4): seconds per layer"]
solver = last_json("solver.log", "JSON ")
head = f"   {'layer':24s} {'rows/c':>7s} {'closed':>8s} {'node lbfgs':>11s} {'published':>10s} {'speed-up':>9s} {'cf<=lb':>7s}"
rows += [head, "   " + "-" * (len(head) - 3)]
if solver:
    for r in solver:
        pub = f"{'~' if r['extrapolated'] else ''}{r['lbfgs_s']:.2f}"
        rows.append(f"   {r['layer']:24s} {r['rows']:7d} {r['closed_s']:8.3f} {r['node_lbfgs_s']:11.2f} {pub:>10s} "
                    f"{r['lbfgs_s'] / max(r['closed_s'], 1e-9):8.0f}x {'yes' if r['cf_le_lb'] else 'NO':>7s}")
else:
    rows.append("   " + (failed("solver.log") or "no result"))
rows += ["", "3. regional sampling (bench_regional.py, CPU): per-step cost vs the stock KSampler"]
regional = [ln for ln in (out / "regional.log").read_text(errors="replace").splitlines() if "ratio" in ln]
rows += ["   " + ln for ln in regional] or ["   " + (failed("regional.log") or "no result")]
rows += ["", f"4. SDXL regional sampling (bench_regional.py --sdxl{' --tiny' if dry else ', GPU, 1024x1024'}): "
         "per-step cost vs the stock KSampler"]
sdxl = [ln for ln in (out / "sdxl_regional.log").read_text(errors="replace").splitlines() if "ratio" in ln]
rows += ["   " + ln for ln in sdxl] or ["   " + (failed("sdxl_regional.log") or "no result")]
rows += ["", f"5. SDXL layer-wise encode (bench_conditioning.py --sdxl{' --tiny' if dry else ', GPU'}): seconds, ratio to "
         "the stock encoder, sequences encoded"]
text = (out / "sdxl_encode.log").read_text(errors="replace").splitlines()
encode = [ln for ln in text[next((i for i, ln in enumerate(text) if ln.startswith("## SDXL")), len(text)):]
          if ln.strip()]
rows += ["   " + ln for ln in encode] or ["   " + (failed("sdxl_encode.log") or "no result")]
if failed("sdxl_regional.log") and sdxl:
    rows.append("   " + failed("sdxl_regional.log"))
rows += ["", "6. ED-LoRA training vs core's Train LoRA (bench_train.py): SD1.5, 512x512, batch 2, UNet rank 4, bf16"]
train = last_json("train.log", "JSON ")
head = f"   {'case':24s} {'s/step':>8s} {'steps/s':>8s} {'ratio':>6s} {'peak VRAM':>10s}"
rows += [head, "   " + "-" * (len(head) - 3)]
if train:
    for r in train:
        vram = f"{r['peak_vram_mib'] / 1024:9.2f}G" if "peak_vram_mib" in r else f"{'-':>10s}"
        rows.append(f"   {r['case']:24s} {r['s_per_step']:8.3f} {1 / max(r['s_per_step'], 1e-9):8.2f} "
                    f"{r['ratio']:6.2f} {vram:>10s}")
else:
    rows.append("   " + (failed("train.log") or "no result"))
print("\n".join(rows))
EOF
