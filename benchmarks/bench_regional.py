"""Issue 3 benchmark: per-step cost of the regional sampler with 3 and 5 regions vs the stock KSampler on
the full-size random SD1.5 at 512x256 (target <= 1.3x for 3 regions), measured side by side in one
process (interleaved), plus peak RSS of each case in a fresh subprocess.

usage: .host/venv/bin/python benchmarks/bench_regional.py [--steps 2] [--repeats 3] [--no-memory]
"""
import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))
sys.path.append(str(REPO))

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=2)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--width", type=int, default=512)
ap.add_argument("--height", type=int, default=256)
ap.add_argument("--no-memory", action="store_true")
ap.add_argument("--only", choices=["stock", "3", "5"], help=argparse.SUPPRESS)  # memory child
a = ap.parse_args()

import comfy_env  # noqa: E402

env = comfy_env.env()
import torch  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import nodes as comfy_nodes  # noqa: E402

model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
    str(REPO / ".host" / "models" / "sd15_random_fp16.safetensors"), output_vae=False)
regional = env.pack("nodes.regional_nodes")
enc = comfy_nodes.CLIPTextEncode().encode
pos, neg = enc(clip, "people in a hall")[0], enc(clip, "lowres")[0]


def regions(n):
    out = None
    step = a.width // n
    for i in range(n):
        mask = torch.zeros(1, a.height, a.width)
        mask[:, :, i * step:(i + 1) * step + 16] = 1
        out = regional.RegionNode().add(enc(clip, f"person number {i}")[0], neg, mask, out)[0]
    return out


cases = {"stock": model, "3": regional.install_regions(model, regions(3)), "5": regional.install_regions(model, regions(5))}
latent = torch.zeros(1, 4, a.height // 8, a.width // 8)
noise = comfy.sample.prepare_noise(latent, 0)


def run(m):
    t = time.perf_counter()
    comfy.sample.sample(m, noise, a.steps, 7.0, "euler", "normal", pos, neg, latent, disable_pbar=True, seed=0)
    return (time.perf_counter() - t) / a.steps


if a.only:
    run(cases[a.only])
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    sys.exit(0)

for m in cases.values():
    run(m)  # warm-up
times = {k: [] for k in cases}
for _ in range(a.repeats):
    for k, m in cases.items():
        times[k].append(run(m))
base = statistics.median(times["stock"])
print(f"## Regional sampler vs stock KSampler, full-size SD1.5, {a.width}x{a.height}, cfg 7, "
      f"{a.steps} euler steps x {a.repeats} interleaved repeats (median s/step)")
for k in cases:
    m = statistics.median(times[k])
    label = "stock KSampler" if k == "stock" else f"regional, {k} regions"
    print(f"{label:24s} {m:7.3f} s/step  ratio {m / base:5.3f}" + ("  (target <= 1.3)" if k == "3" else ""))
if not a.no_memory:
    print("\n## Peak RSS per case (fresh process: model load + one sampling)")
    for k in cases:
        out = subprocess.run([sys.executable, __file__, "--only", k, "--steps", "1", "--width", str(a.width),
                              "--height", str(a.height)], capture_output=True, text=True).stdout.strip().splitlines()
        print(f"{k:6s} {float(out[-1]):9.0f} MiB")
