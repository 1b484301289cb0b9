"""A LoRA per region, layer by layer (issue 22): the cost the region-LoRA hooks add to the layers they patch,
at the full-size SD1.5 shapes for 512x256 with cfg (batch 2), 3 regions each with a rank-4 LoRA on every
whole-block layer that acts per pixel (attention q/k/v/out, feed-forward in/out, 1x1 proj_in/proj_out; the
cross-attention k/v act on the short context and are left out). No checkpoint: random layers of those
shapes, so it needs no big-model lock and shows the hooks' own cost, free of the rest of the UNet.

Measured side by side in one run (interleaved repeats, median of per-UNet-call sums, process CPU time so
other load on the machine counts less):

* base: the layers alone;
* out + delta: each layer's output plus a new tensor with the regions' low-rank products (the hooks up to
  issue 22);
* in place: the products added into the output in place (``LowRankBank.add_up``: one fused ``addmm`` on
  linear layers), as the hooks do now. Both give the same bits (tests/unit/test_regional_lora.py).

usage: .host/venv/bin/python benchmarks/bench_region_lora_layers.py [--repeats 9] [--threads 1]
"""
import argparse
import statistics
import time

import dev_paths  # noqa: F401  # isort: split
import torch

from fusion.regions.blend import blend_weights
from fusion.regions.lowrank import LowRankBank

ap = argparse.ArgumentParser()
ap.add_argument("--repeats", type=int, default=9)
ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: CPU time is then clean)")
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)

# (feature size at 512x256, width, transformers at that size) of SD1.5's UNet
LEVELS = [((64, 32), 320, 5), ((32, 16), 640, 5), ((16, 8), 1280, 5), ((8, 4), 1280, 1)]
REGIONS, RANK = 3, 4
layers = []  # (kind, transformers, layer, bank, input, feature size)
for hw, c, count in LEVELS:
    tokens = hw[0] * hw[1]
    for out_f, in_f in [(c, c)] * 6 + [(8 * c, c), (c, 4 * c)]:  # attn1 q/k/v/out, attn2 q/out, ff in, ff out
        bank = LowRankBank({r: (torch.randn(out_f, RANK) * 0.1, torch.randn(RANK, in_f) * 0.05)
                            for r in range(REGIONS)})
        layers.append(("linear", count, torch.nn.Linear(in_f, out_f), bank, torch.randn(2, tokens, in_f), hw))
    for _ in range(2):  # proj_in, proj_out
        bank = LowRankBank({r: (torch.randn(c, RANK, 1, 1) * 0.1, torch.randn(RANK, c, 1, 1) * 0.05)
                            for r in range(REGIONS)})
        layers.append(("conv", count, torch.nn.Conv2d(c, c, 1), bank, torch.randn(2, c, *hw), hw))
weights = {hw: blend_weights((torch.rand(REGIONS, hw[0] * hw[1]) > 0.5).float()) for hw, _, _ in LEVELS}


def one_unet_call(mode: str) -> float:
    started = time.process_time()
    with torch.inference_mode():
        for kind, count, module, bank, x, hw in layers:
            w = weights[hw]
            for _ in range(count):
                out = module(x)
                if mode == "base":
                    continue
                if kind == "linear":
                    out = out + bank.linear(x, w) if mode == "out + delta" else bank.add_up(bank.project(x, w), out)
                else:
                    delta = bank.conv(x, w, module.stride, module.padding, module.dilation, hw)
                    out = out + delta if mode == "out + delta" else out.add_(delta)
    return time.process_time() - started


MODES = ("base", "out + delta", "in place")
for mode in MODES:
    one_unet_call(mode)  # warm-up
times: dict[str, list[float]] = {m: [] for m in MODES}
for _ in range(a.repeats):
    for mode in MODES:
        times[mode].append(one_unet_call(mode))
base = statistics.median(times["base"])
print(f"## Region-LoRA hooks on SD1.5's LoRA'd layers, 512x256, cfg batch 2, {REGIONS} regions x rank {RANK}: "
      f"process CPU s per UNet call ({a.threads} thread(s), {a.repeats} interleaved repeats; median, min-max)")
for mode in MODES:
    m = statistics.median(times[mode])
    extra = f"  LoRA cost +{m - base:.3f} s" if mode != "base" else ""
    print(f"{mode:12s} {m:7.3f} s  ({min(times[mode]):.3f}-{max(times[mode]):.3f}){extra}")
old, new = (statistics.median(times[m]) - base for m in MODES[1:])
print(f"in place / out + delta, LoRA cost: {new / old:.2f}")
