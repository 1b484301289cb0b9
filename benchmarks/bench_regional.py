"""Regional sampling benchmark (issues 3, 8 and 19): per-step cost on the full-size random SD1.5 at 512x256
(``--sdxl``: the full-size random SDXL at 768x512), cfg 7, measured side by side in one process (interleaved
repeats, median s/step):

* the stock KSampler;
* the regional sampler with 3 and 5 regions (prompts only; target <= 1.3x for 3);
* the regional sampler with 3 regions, each with its own rank-4 whole-block LoRA applied in its region
  in the same UNet pass (target <= 1.15x; SDXL <= 1.10x);
* the N-pass approach other packs take for a LoRA per region: one UNet pass per region, outputs blended
  with the masks. Its passes use the sampling model's weights, so this is a lower bound for N-pass:
  merging or swapping each region's LoRA into the weights every step (what those packs also pay) is
  not counted.

Peak RSS of each case is measured in a fresh subprocess (model load + one sampling).

``--sdxl`` needs ``bash tools/host/make_models.sh --sdxl`` (the 6.5 GiB checkpoint: run under the big-model lock,
``flock /tmp/mixofshow-bigmodel.lock ...``); ``--sdxl --tiny`` runs the test fixture's tiny SDXL instead (the
plumbing, for gpu_check.sh --dry-run).

usage: .host/venv/bin/python benchmarks/bench_regional.py [--steps 2] [--repeats 3] [--no-memory] [--gpu]
       [--sdxl [--tiny]] [--width W --height H] [--cases stock,3,...]
"""
import argparse
import resource
import statistics
import subprocess
import sys
import time

import dev_paths  # isort: split

import comfy_env
import pack_nodes as pn
import torch
from lora_files import lora_factors, write_kohya_lora
from synthetic import FULL_SDXL_TEXT, TINY_XL_SHAPES

from fusion.families import SD15, SDXL

REPO = dev_paths.REPO
CASES = ("stock", "3", "5", "3 LoRAs", "N-pass 3")

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=2)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--width", type=int, default=None, help="default 512 (SDXL: 768)")
ap.add_argument("--height", type=int, default=None, help="default 256 (SDXL: 512)")
ap.add_argument("--no-memory", action="store_true")
ap.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU")
ap.add_argument("--sdxl", action="store_true", help="the full-size random SDXL (make_models.sh --sdxl)")
ap.add_argument("--tiny", action="store_true", help="with --sdxl: the test fixture's tiny SDXL (plumbing only)")
ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
ap.add_argument("--only", choices=CASES, help=argparse.SUPPRESS)  # memory child
a = ap.parse_args()
a.width = a.width or (768 if a.sdxl else 512)
a.height = a.height or (512 if a.sdxl else 256)
selected = [c for c in CASES if c in a.cases.split(",")]

env = comfy_env.env(cpu=not a.gpu)  # ComfyUI importable from here on
import comfy.patcher_extension  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402

import nodes as comfy_nodes  # noqa: E402

if a.sdxl and a.tiny:
    model, clip, _ = env.tiny_xl.build_all("narrow", 0)
    LORA_SHAPES = dict(family=SDXL, **TINY_XL_SHAPES)
else:
    ckpt = "sdxl_random_fp16.safetensors" if a.sdxl else "sd15_random_fp16.safetensors"
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(REPO / ".host" / "models" / ckpt), output_vae=False)
    LORA_SHAPES = dict(family=SDXL, model_channels=320, text_sizes=FULL_SDXL_TEXT) if a.sdxl else \
        dict(family=SD15, model_channels=320, text_layers=12, text_intermediate=3072)
MODEL_LABEL = ("the tiny SDXL" if a.tiny else "full-size SDXL") if a.sdxl else "full-size SD1.5"
install_regions = env.pack("nodes.glue.regional").install_regions
enc = comfy_nodes.CLIPTextEncode().encode
pos, neg = enc(clip, "people in a hall")[0], enc(clip, "lowres")[0]


def boxes(n):
    step = a.width // n
    return [(0, i * step, a.height, min(a.width, (i + 1) * step + 16)) for i in range(n)]


def regions(n, with_loras=False):
    out = None
    for i, b in enumerate(boxes(n)):
        m, c = model, clip
        if with_loras:
            name = f"bench_{LORA_SHAPES['family'].name}_char{i}.safetensors"
            path = env.base / "models" / "loras" / name
            if not path.exists():
                write_kohya_lora(path, lora_factors(500 + i, scale=0.5, **LORA_SHAPES))
            m, c, _ = pn.node("MixOfShowLoRAConcept", model=model, clip=clip, lora_name=name,
                              trigger_words=f"char{i} person", strength_model=1.0, strength_clip=1.0)
        out = pn.region(enc(c, f"a photo of char{i} person")[0], neg, pn.box_mask(a.width, a.height, *b), out,
                        model=m if with_loras else None)
    return out


def n_pass(n):
    """One UNet pass per region (its prompt's cost), outputs blended with the regions' masks."""
    masks = torch.stack([pn.box_mask(a.width, a.height, *b)[0] for b in boxes(n)])
    weights = torch.nn.functional.avg_pool2d(masks[:, None], 8)  # [n, 1, h, w] at the latent size
    weights = weights / weights.sum(0, keepdim=True).clamp_min(1e-8)

    def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw):
        transformer_options = {} if transformer_options is None else transformer_options
        out = 0
        for r in range(n):
            out = out + weights[r].to(x) * executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)
        return out

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "bench.npass", apply_model)
    return clone


def case(name):
    if name == "stock":
        return model
    if name == "3 LoRAs":
        return install_regions(model, regions(3, with_loras=True))
    if name == "N-pass 3":
        return n_pass(3)
    return install_regions(model, regions(int(name)))


latent = torch.zeros(1, 4, a.height // 8, a.width // 8)  # SD1.5 and SDXL latents: 4 channels
noise = comfy.sample.prepare_noise(latent, 0)


def run(m):
    t = time.perf_counter()
    comfy.sample.sample(m, noise, a.steps, 7.0, "euler", "normal", pos, neg, latent, disable_pbar=True, seed=0)
    if torch.cuda.is_available() and a.gpu:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / a.steps


if a.only:
    run(case(a.only))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    sys.exit(0)

cases = {name: case(name) for name in selected}
for m in cases.values():
    run(m)  # warm-up
times = {k: [] for k in cases}
for _ in range(a.repeats):
    for k, m in cases.items():
        times[k].append(run(m))
base = statistics.median(times["stock"]) if "stock" in times else float("nan")
targets = {"3": "  (target <= 1.3)", "3 LoRAs": f"  (target <= {1.10 if a.sdxl else 1.15})"}
labels = {"stock": "stock KSampler", "3 LoRAs": "regional, 3 regions, a LoRA each", "N-pass 3": "N-pass, 3 regions"}
print(f"## Regional sampling vs the stock KSampler, {MODEL_LABEL}, {a.width}x{a.height}, cfg 7, "
      f"{a.steps} euler steps x {a.repeats} interleaved repeats (median s/step, {'GPU' if a.gpu else 'CPU'})")
for k in cases:
    m = statistics.median(times[k])
    spread = f"[{min(times[k]) / base:.3f}-{max(times[k]) / base:.3f}]" if k != "stock" else ""
    print(f"{labels.get(k, f'regional, {k} regions'):34s} {m:7.3f} s/step  ratio {m / base:5.3f} {spread:15s}"
          f"{targets.get(k, '')}")
if not a.no_memory:
    print("\n## Peak RSS per case (fresh process: model load + one sampling)")
    for k in cases:
        out = subprocess.run([sys.executable, __file__, "--only", k, "--steps", "1", "--width", str(a.width),
                              "--height", str(a.height)] + (["--gpu"] if a.gpu else [])
                             + (["--sdxl"] if a.sdxl else []) + (["--tiny"] if a.tiny else []),
                             capture_output=True, text=True).stdout.strip().splitlines()
        print(f"{k:10s} {float(out[-1]):9.0f} MiB")
