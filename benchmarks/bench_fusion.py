"""Whole gradient fusion of N synthetic whole-block ED-LoRAs in an in-process ComfyUI: total time, time per
stage (recording / solving), peak memory and cache-entry size, one child process per N, one table.

    .host/venv/bin/python benchmarks/bench_fusion.py                       # full-size SD1.5, N = 3, 7, 14
    .host/venv/bin/python benchmarks/bench_fusion.py --concepts 3 --steps 20 --size 512   # reference settings
    .host/venv/bin/python benchmarks/bench_fusion.py --tiny --concepts 2,3  # tiny SD1.5 layout (seconds)
    flock /tmp/mixofshow-bigmodel.lock .host/venv/bin/python benchmarks/bench_fusion.py --sdxl --concepts 3 \
        --steps 2 --size 256 --attention-only                               # full-size random SDXL
    .host/venv/bin/python benchmarks/bench_fusion.py --sdxl --tiny --concepts 3   # tiny SDXL (plumbing)
    python benchmarks/bench_fusion.py --gpu                                # CUDA (a CUDA build of torch)

Defaults: the full-size random SD1.5 (``.host/models/sd15_random_fp16.safetensors``, made by
tools/host/make_models.sh), recording 4 steps at 256×256 per concept (the reference: 20 at 512×512),
the node's defaults otherwise (closed form, default ridge, the reference sampler), the fusion cache on
(a fresh folder: the entry is written, its size reported; the key digests every base weight). ``--sdxl``: the
full-size random SDXL (``bash tools/host/make_models.sh --sdxl``; ~20 GB peak on a CPU: hold the big-model lock)
with SDXL ED-LoRAs (Concept Conductor's layout, both encoders), and the Gram memory of each stage's accumulators
(``in²`` float32 per input group that folds its rows; a group with at most ``in`` rows keeps its rows instead) beside
the spec's estimate for SDXL (3.06 GiB with shared inputs, attention-only; 5.36 GiB without).

Each N runs in its own child process, so that its peak memory is its own: peak RSS is the process's
high-water mark (``VmHWM``) after the fusion, counted from the resident size with the model and the
concepts loaded (``/proc/self/clear_refs`` resets the mark there); on CUDA also
``torch.cuda.max_memory_allocated`` over the fusion.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dev_paths  # isort: split

REPO = dev_paths.REPO
FULL_CKPT = REPO / ".host" / "models" / "sd15_random_fp16.safetensors"
FULL_SDXL_CKPT = REPO / ".host" / "models" / "sdxl_random_fp16.safetensors"
STAGES = ("text", "cross_kv", "unet")


def start_comfy(gpu: bool):
    """An in-process ComfyUI with the pack loaded; returns (``pack(module) -> module``, the environment): the
    tests' harness (tests/support/comfy_env.py), with --cpu unless ``gpu``."""
    import comfy_env

    env = comfy_env.env(cpu=not gpu)
    return env.pack, env


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def load_model(full: bool, sdxl: bool, env):
    """(MODEL, CLIP, make_edlora_state's shape arguments) of the benchmarked model."""
    from synthetic import FULL_SDXL_TEXT, TINY_XL_SHAPES

    from fusion.families import SD15, SDXL

    family = {"family": SDXL if sdxl else SD15}
    if full:
        import comfy.sd

        model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(str(FULL_SDXL_CKPT if sdxl else FULL_CKPT),
                                                                     output_vae=False, output_clipvision=False)
        return model, clip, {**family, **({"text_sizes": FULL_SDXL_TEXT} if sdxl else {})}
    if sdxl:
        model, clip, _vae = env.tiny_xl.build_all("narrow", 0)
        return model, clip, {**family, **TINY_XL_SHAPES}
    model, clip, _vae = env.tiny.build_all("narrow", 0)
    return model, clip, {**family, "model_channels": 32, "text_layers": 2, "text_intermediate": 512}


def gram_gib(plan, stage: str, rows: dict) -> float:
    """GiB of the stage's Gram accumulators (upper-triangle strips) of the input groups whose rows were folded."""
    from fusion.merge.solver import FoldedInputs

    held = 0
    for g, t in plan.stage_groups(stage).items():
        acc = FoldedInputs(t[0].in_features)
        held += acc.gram_bytes if rows.get(g, 0) > acc.row_limit else 0
    return held / 2**30


def child(args) -> dict:
    """One fusion of ``args.child`` concepts; returns the measurements."""
    import torch

    if not args.gpu:
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    pack, env = start_comfy(args.gpu)
    os.environ["MIXOFSHOW_FUSION_CACHE"] = tempfile.mkdtemp(prefix="mixofshow-bench-cache-")
    from synthetic import make_edlora_state

    model, clip, shape = load_model(not args.tiny, args.sdxl, env)
    en = pack("nodes.glue.loading")
    folders = pack("nodes.glue.folders")
    concepts, m, c = None, model, clip
    folder = Path(folders.folder_paths.get_folder_paths("edloras")[0])
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(args.child):
        name = f"bench_{'tiny' if args.tiny else 'full'}{'_xl' if args.sdxl else ''}_{i}.pth"
        torch.save(make_edlora_state((f"<bench{i}a>", f"<bench{i}b>"), seed=100 + i,
                                     whole_block=not args.attention_only, **shape), folder / name)
        m, c, concepts = en.apply_edlora(m, c, concepts, folders.edlora_path(name), 1.0, 1.0)
    del m, c
    gf = pack("fusion.merge.gradient_fusion")
    settings = gf.FusionSettings(steps=args.steps, width=args.size, height=args.size, seed=0, solver=args.solver,
                                 sampler=args.sampler)
    import gc

    import comfy.model_management

    gc.collect()
    # the cost of the base identity alone: sha256 over every byte of every MODEL and CLIP weight
    run, fp = pack("nodes.glue.fusion_run"), pack("nodes.glue.fused_patches")
    t = time.perf_counter()
    run._weight_digests(model), run._weight_digests(clip.patcher)
    digest_s = time.perf_counter() - t
    weights_gib = sum(fp.original_weight(v).numel() * fp.original_weight(v).element_size()
                      for p in (model, clip.patcher) for v in p.get_key_patches().values()) / 2**30
    gc.collect()
    rss_model = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on
    if args.gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    rows: dict[str, int] = {}  # input group -> rows recorded (all concepts)

    def tap(_stage, _i, group, x, channels_first):
        rows[group] = rows.get(group, 0) + (x.shape[0] * x.shape[2] * x.shape[3] if channels_first
                                            else x.reshape(-1, x.shape[-1]).shape[0])

    with torch.inference_mode():  # as ComfyUI runs nodes
        fm, fc, _fcs, stats = run.fuse(model, clip, concepts, settings, use_cache=True, tap=tap)
    if args.gpu:
        torch.cuda.synchronize()
    total = time.perf_counter() - t
    out = {"n": args.child, "total": total, "seconds": stats["seconds"], "rss_model_mib": rss_model / 1024,
           "digest_s": digest_s, "weights_gib": weights_gib, "cpus": os.cpu_count(),
           "peak_rss_mib": _status_kib("VmHWM") / 1024, "recorded": stats["recorded"],
           "cache_mib": os.path.getsize(stats["cache_file"]) / 2**20 if stats.get("cache_file") else 0.0,
           "device": str(comfy.model_management.get_torch_device()), "threads": torch.get_num_threads(),
           "fused": len(fp.fused_of(fm)[0]) + len(fp.fused_of(fc.patcher)[0]),
           "gram_gib": {stage: gram_gib(run.plan_for(model, clip, concepts), stage, rows) for stage in STAGES}}
    if args.gpu:
        out["peak_vram_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def table(results: list[dict], args) -> str:
    gpu = any("peak_vram_mib" in r for r in results)
    threads = "" if gpu else f", {results[0]['threads']} torch threads"
    family = "SDXL" if args.sdxl else "SD1.5"
    lines = [f"model: {'tiny ' + family + ' layout' if args.tiny else 'full-size random ' + family}; "
             f"device {results[0]['device']}"
             f"{threads}; recording {args.steps} steps at "
             f"{args.size}x{args.size}; {'attention-only' if args.attention_only else 'whole-block'} rank-4 ED-LoRAs; "
             f"solver {args.solver}, sampler {args.sampler}; {results[0]['fused']} fused weights"]
    head = (f"{'N':>3s} {'total s':>8s} {'s/conc':>7s} {'ident':>6s} {'text rec/sol':>13s} {'k/v rec/sol':>12s} "
            f"{'unet rec/sol':>14s} {'peak RSS':>9s} {'model RSS':>10s} {'above':>8s} {'growth':>7s} {'cache MiB':>9s}"
            + (f" {'peak VRAM':>10s}" if gpu else ""))
    lines += [head, "-" * len(head)]
    first_above = None

    def rec_sol(seconds: dict, stage: str) -> str:
        return f"{seconds.get(stage + '_record', 0):.1f}/{seconds.get(stage + '_solve', 0):.1f}"

    for r in results:
        s = r["seconds"]
        above = r["peak_rss_mib"] - r["rss_model_mib"]
        first_above = first_above if first_above is not None else above
        lines.append(f"{r['n']:3d} {r['total']:8.1f} {r['total'] / r['n']:7.1f} {s.get('identity', 0):6.1f} "
                     f"{rec_sol(s, 'text'):>13s} {rec_sol(s, 'cross_kv'):>12s} {rec_sol(s, 'unet'):>14s} "
                     f"{r['peak_rss_mib']:8.0f}M {r['rss_model_mib']:9.0f}M {above:7.0f}M "
                     f"{(above / first_above - 1) * 100 if first_above else 0:6.1f}% {r['cache_mib']:9.1f}"
                     + (f" {r['peak_vram_mib']:9.0f}M" if gpu else ""))
    lines.append("(s/conc: total per concept; ident: base/concept digests and cache key; above: peak RSS above the "
                 "resident model + concepts; growth: of 'above' relative to the first row)")
    for r in results:
        g = r["gram_gib"]
        lines.append(f"N={r['n']}: Gram accumulators text {g['text']:.2f} GiB, k/v {g['cross_kv']:.2f} GiB, UNet "
                     f"{g['unet']:.2f} GiB (one stage's at a time; largest {max(g.values()):.2f} GiB)"
                     + ("; spec's SDXL estimate: 3.06 GiB over all stages with shared inputs, attention-only"
                        if args.sdxl else ""))
    r = results[0]
    lines.append(f"base identity alone: sha256 of all {r['weights_gib']:.2f} GiB of MODEL + CLIP weights in "
                 f"{r['digest_s']:.2f} s ({r['cpus']} hashing threads; "
                 f"{r['weights_gib'] / max(r['digest_s'], 1e-9):.2f} GiB/s)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", default="3,7,14", help="comma-separated numbers of concepts (default 3,7,14)")
    ap.add_argument("--steps", type=int, default=4, help="sampling steps per concept (reference: 20)")
    ap.add_argument("--size", type=int, default=256, help="recording resolution, square (reference: 512)")
    ap.add_argument("--tiny", action="store_true", help="the tiny SD1.5-layout model instead of the full-size one")
    ap.add_argument("--sdxl", action="store_true", help="SDXL: the full-size random SDXL (with --tiny: the tiny SDXL)")
    ap.add_argument("--attention-only", action="store_true", help="attention-only ED-LoRAs (default whole-block)")
    ap.add_argument("--solver", default="closed_form", choices=("closed_form", "lbfgs"))
    ap.add_argument("--sampler", default="reference", help="recording sampler (default: the reference schedule)")
    ap.add_argument("--gpu", action="store_true", help="fuse on CUDA (default: CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    ckpt = FULL_SDXL_CKPT if args.sdxl else FULL_CKPT
    if not args.tiny and not ckpt.is_file():
        print(f"SKIP: {ckpt} is missing (bash tools/host/make_models.sh{' --sdxl' if args.sdxl else ''} makes it)")
        return 0
    if args.child is not None:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    results = []
    passthrough, skip = [], False
    for a in argv if argv is not None else sys.argv[1:]:  # every option but --concepts goes to the children
        if skip or a.startswith("--concepts"):
            skip = a == "--concepts" and not skip
            continue
        passthrough.append(a)
    for n in [int(x) for x in args.concepts.split(",")]:
        cmd = [sys.executable, __file__, *passthrough, "--child", str(n)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"N={n}: the child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            return 1
        results.append(json.loads(line[len("RESULT "):]))
        print(f"  N={n}: {results[-1]['total']:.1f} s", flush=True)
    print(table(results, args))
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
