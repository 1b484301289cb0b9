"""ED-LoRA training benchmark (issue 21): seconds per optimiser step and peak memory of Train ED-LoRA vs core's
Train LoRA node at the same UNet rank, batch and resolution, side by side in one run on the full-size random SD1.5
(``--sdxl``: the full-size random SDXL) (interleaved repeats; the median of each run's steps after its first).

* ``core``: ComfyUI's Train LoRA (``TrainLoraNode``) as it ships: a LoRA of the rank on every UNet weight (plus
  bias and norm differences), captions encoded once and detached (no text-side training), MSE on the x0
  prediction; gradient checkpointing as chosen here;
* ``ours``: Train ED-LoRA with the family's reference preset ("auto": MoS SD1.5 real, on SDXL CC SDXL) at that
  UNet rank: the concept rows of both tokens (one table per text encoder), each text encoder's attention LoRA at
  the preset's rank and the UNet's attention LoRA, every caption encoded once per cross-attention layer with
  gradients (16 times on SD1.5, 70 on SDXL), the masked loss and the attention regulariser;
* ``ours, no regulariser``: the same with ``attn_reg_weight`` 0 (the attention runs ComfyUI's own kernel).

The training images are the synthetic set of the tests (tests/support/synthetic.py) at the benchmark's
resolution. Peak memory: on the CPU the peak RSS (sampled every 20 ms) of a fresh process per case while it trains
two steps, and what that adds to the RSS before training; with ``--gpu`` the peak of
``torch.cuda.max_memory_allocated`` per case.

``--tiny`` runs the tiny SD1.5-layout test model, ``--sdxl --tiny`` the test fixture's tiny SDXL (the plumbing,
for gpu_check.sh --dry-run). ``--sdxl`` needs ``bash tools/host/make_models.sh --sdxl`` (the 6.5 GiB checkpoint).

usage: .host/venv/bin/python benchmarks/bench_train.py [--resolution 256] [--batch 1] [--rank 4] [--steps 2]
       [--repeats 2] [--checkpointing] [--dtype fp32|bf16] [--gpu] [--no-memory] [--json] [--sdxl] [--tiny]
(full-size SD1.5 or SDXL: hold the big-model lock, flock /tmp/mixofshow-bigmodel.lock ...)
"""
import argparse
import gc
import json
import statistics
import subprocess
import sys
import threading
import time

import dev_paths  # isort: split

import comfy_env
import torch
from synthetic import training_images

REPO = dev_paths.REPO
CASES = ("core", "ours", "ours, no regulariser")

ap = argparse.ArgumentParser()
ap.add_argument("--resolution", type=int, default=256)
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--rank", type=int, default=4, help="UNet LoRA rank of both trainers")
ap.add_argument("--steps", type=int, default=2, help="measured optimiser steps per run (after one warm-up step)")
ap.add_argument("--repeats", type=int, default=2)
ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both trainers")
ap.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 with --gpu, else fp32")
ap.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU")
ap.add_argument("--no-memory", action="store_true")
ap.add_argument("--json", action="store_true", help="also print one JSON line (JSON <list>)")
ap.add_argument("--sdxl", action="store_true", help="the full-size random SDXL (make_models.sh --sdxl)")
ap.add_argument("--tiny", action="store_true", help="the tiny SD1.5-layout test model (with --sdxl: the tiny SDXL; "
                "plumbing only)")
ap.add_argument("--only", choices=CASES, help=argparse.SUPPRESS)  # memory child
a = ap.parse_args()
dtype = a.dtype or ("bf16" if a.gpu else "fp32")

env = comfy_env.env(cpu=not a.gpu)  # ComfyUI importable from here on
import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
from comfy_extras.nodes_train import TrainLoraNode  # noqa: E402

import nodes as comfy_nodes  # noqa: E402

training = env.pack("nodes.glue.training")
dataset = env.pack("fusion.train.dataset")

with torch.inference_mode():  # as a prompt loads a checkpoint (its weights are inference tensors)
    if a.tiny:
        model, clip, vae = (env.tiny_xl if a.sdxl else env.tiny).build_all("narrow", 0)
    else:
        checkpoint = "sdxl_random_fp16.safetensors" if a.sdxl else "sd15_random_fp16.safetensors"
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(REPO / ".host" / "models" / checkpoint),
                                                                    output_vae=True)
    images = training_images(4, a.resolution, seed=0)
    trainset = dataset.make_training_set([i[0] for i in images], [i[1] for i in images], [i[2] for i in images])
    # core's inputs: the VAE latents of the images (cropped square) and one caption, encoded once
    squares = torch.stack([i[0][:a.resolution, :a.resolution] for i in images])
    latents = vae.encode(squares)
    positive = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of a sks person")[0]


def step_times(run) -> list[float]:
    """Seconds of each optimiser step after the first, from the progress reports."""
    stamps = []
    run(lambda *_args, **_kwargs: stamps.append(time.perf_counter()))
    if torch.cuda.is_available() and a.gpu:
        torch.cuda.synchronize()
    return [t1 - t0 for t0, t1 in zip(stamps, stamps[1:], strict=False)]


def run_case(name: str, steps: int):
    mm.unload_all_models()   # each case starts from the same state (no other trainer's clone still patched in)
    gc.collect()

    def run(tick):
        if name == "core":
            comfy.utils.set_progress_bar_global_hook(tick)
            try:
                with torch.inference_mode():
                    TrainLoraNode.execute(
                        # one latent dict per image: core's node only handles a list of several
                        model=[model], latents=[{"samples": lat[None]} for lat in latents], positive=[positive],
                        batch_size=[a.batch],
                        steps=[steps], grad_accumulation_steps=[1], learning_rate=[1e-4], rank=[a.rank],
                        optimizer=["AdamW"], loss_function=["MSE"], seed=[0], training_dtype=[dtype],
                        lora_dtype=["fp32"], algorithm=["LoRA"], gradient_checkpointing=[a.checkpointing],
                        existing_lora=["[None]"])
            finally:
                comfy.utils.set_progress_bar_global_hook(None)
            return
        settings = {"steps": steps, "resolution": a.resolution, "batch_size": a.batch, "grad_accum": 1,
                    "rank_unet": a.rank, "training_dtype": dtype, "gradient_checkpointing": a.checkpointing}
        if name == "ours, no regulariser":
            settings["attn_reg_weight"] = 0.0
        with torch.inference_mode():
            training.train_edlora(model, clip, vae, trainset, "<b1>+<b2>", "<rand-0.013>+man", "auto", settings,
                                  progress=tick)
    return step_times(run)


if a.only:
    import psutil

    process = psutil.Process()
    before = process.memory_info().rss / 2**20
    peak = [before]
    done = threading.Event()

    def poll():
        while not done.wait(0.02):
            peak[0] = max(peak[0], process.memory_info().rss / 2**20)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    run_case(a.only, 2)
    done.set()
    watcher.join()
    print(json.dumps({"before": before, "peak": max(peak[0], process.memory_info().rss / 2**20)}))
    sys.exit(0)

times: dict[str, list[float]] = {k: [] for k in CASES}
vram: dict[str, float] = {}
for _ in range(a.repeats):
    for name in CASES:
        if a.gpu:
            mm.soft_empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times[name] += run_case(name, a.steps + 1)
        if a.gpu:
            vram[name] = max(vram.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**20)
base = statistics.median(times["core"])
where = "GPU " + torch.cuda.get_device_name(0) if a.gpu else "CPU"
model_label = f"{'tiny' if a.tiny else 'full-size'} {'SDXL' if a.sdxl else 'SD1.5'}"
print(f"## Training step vs core's Train LoRA, {model_label}, {a.resolution}x{a.resolution}, batch {a.batch}, "
      f"UNet rank {a.rank}, {dtype}, checkpointing {'on' if a.checkpointing else 'off'}; {a.steps} steps x "
      f"{a.repeats} interleaved runs ({where})")
rows = []
for name in CASES:
    m = statistics.median(times[name])
    spread = f"{min(times[name]):.2f}-{max(times[name]):.2f}"
    target = "  (target <= 1.3)" if name == "ours" else ""
    extra = f"  peak VRAM {vram[name] / 1024:.2f} GiB" if name in vram else ""
    print(f"{name:22s} {m:8.3f} s/step (range {spread})  ratio {m / base:5.2f}{target}{extra}")
    rows.append({"case": name, "s_per_step": m, "min": min(times[name]), "max": max(times[name]),
                 "ratio": m / base, **({"peak_vram_mib": vram[name]} if name in vram else {})})
if not a.no_memory and not a.gpu:
    print("\n## Peak RSS while training two steps (a fresh process per case, sampled every 20 ms)")
    for name in CASES:
        args = [sys.executable, __file__, "--only", name, "--resolution", str(a.resolution), "--batch", str(a.batch),
                "--rank", str(a.rank), "--dtype", dtype] + (["--checkpointing"] if a.checkpointing else []) + \
            (["--sdxl"] if a.sdxl else []) + (["--tiny"] if a.tiny else [])
        out = subprocess.run(args, capture_output=True, text=True).stdout.strip().splitlines()
        got = json.loads(out[-1]) if out and out[-1].startswith("{") else None
        if got is None:
            print(f"{name:22s} failed")
            continue
        print(f"{name:22s} peak {got['peak']:8.0f} MiB, before training {got['before']:8.0f} MiB, "
              f"training +{got['peak'] - got['before']:6.0f} MiB")
        next(r for r in rows if r["case"] == name)["peak_rss_mib"] = got["peak"] - got["before"]
if a.json:
    print("JSON " + json.dumps(rows))
