"""Issue 2 benchmarks, measured side by side in one run on the full-size random SD1.5:
1. encode cost: stock CLIP Text Encode vs the pack's encode without and with a concept token
   (and how many text-encoder passes / rows each makes);
2. sampling cost with layer-wise conditioning vs plain conditioning at 256x256 (target <= 1.05x).

usage: .host/venv/bin/python benchmarks/bench_conditioning.py [--steps 3] [--repeats 3] [--size 256]
"""
import argparse
import statistics
import time

import dev_paths  # isort: split

import comfy_env
import torch
from synthetic import make_edlora_state

REPO = dev_paths.REPO
ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--size", type=int, default=256)
a = ap.parse_args()

env = comfy_env.env()  # ComfyUI importable from here on
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402

import nodes as comfy_nodes  # noqa: E402

ckpt = REPO / ".host" / "models" / "sd15_random_fp16.safetensors"
model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False)
torch.save(make_edlora_state(("<b1>", "<b2>"), seed=3), env.base / "models" / "edloras" / "bench.pth")
lmodel, lclip, concepts = env.pack("nodes.glue.loading").apply_edlora(
    model, clip, None, str(env.base / "models" / "edloras" / "bench.pth"), 0.7, 0.7)
encode = env.pack("nodes.glue.layerwise").encode_with_concepts

calls = []
transformer = lclip.cond_stage_model.clip_l.transformer
transformer.register_forward_pre_hook(lambda m, args, kwargs: calls.append(
    (args[0] if args and args[0] is not None else kwargs.get("embeds")).shape[0]), with_kwargs=True)

text_plain = "a photo of a man in a garden, detailed"
text_concept = "a photo of a <b1> <b2> in a garden, detailed"
cases = {
    "stock CLIPTextEncode (no concept)": lambda: comfy_nodes.CLIPTextEncode().encode(lclip, text_plain),
    "pack encode, no concept token": lambda: encode(lclip, text_plain, concepts),
    "pack encode, one concept (2 tokens)": lambda: encode(lclip, text_concept, concepts),
}
for f in cases.values():
    f()  # warm-up (model load)
times = {k: [] for k in cases}
passes = {}
for _ in range(5):
    for name, f in cases.items():
        calls.clear()
        t = time.perf_counter()
        f()
        times[name].append(time.perf_counter() - t)
        passes[name] = list(calls)
ref = statistics.median(times["stock CLIPTextEncode (no concept)"])
print("## Encode (full-size CLIP, CPU, median of 5, interleaved)")
print(f"{'case':40s} {'ms':>8s} {'ratio':>7s}  text-encoder passes (rows each)")
for name in cases:
    m = statistics.median(times[name])
    print(f"{name:40s} {m * 1000:8.1f} {m / ref:7.2f}  {len(passes[name])} {passes[name]}")

pos_layer = encode(lclip, text_concept, concepts)
pos_plain = comfy_nodes.CLIPTextEncode().encode(lclip, text_plain)[0]
neg = comfy_nodes.CLIPTextEncode().encode(lclip, "lowres")[0]
latent = torch.zeros(1, 4, a.size // 8, a.size // 8)
noise = comfy.sample.prepare_noise(latent, 0)


def run(pos):
    t = time.perf_counter()
    comfy.sample.sample(lmodel, noise, a.steps, 7.0, "euler", "normal", pos, neg, latent, disable_pbar=True, seed=0)
    return time.perf_counter() - t


run(pos_plain)
run(pos_layer)
tp, tl = [], []
for _ in range(a.repeats):
    tp.append(run(pos_plain))
    tl.append(run(pos_layer))
mp, ml = statistics.median(tp), statistics.median(tl)
print(f"\n## Sampling, full-size SD1.5, {a.size}x{a.size}, {a.steps} euler steps, cfg 7, median of {a.repeats}")
print(f"plain conditioning      {mp:7.2f} s")
print(f"layer-wise conditioning {ml:7.2f} s   ratio {ml / mp:.3f} (target <= 1.05)")
