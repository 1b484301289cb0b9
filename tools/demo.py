"""The README's main job: a multi-concept regional generation on the project's host, through the HTTP
API of a real ComfyUI server, with demo models: a full-size random-weight SD1.5 checkpoint, three
synthetic full-size ED-LoRAs, and a random T2I-Adapter with the OpenPose adapter's layout. Three
regions come from a reference OpenPose image (one per skeleton), each with its own prompt; the pose
also steers the adapter. Random weights make a noise image: this shows the plumbing, not the art.
The graph is queued by the headless runner users run (``mixofshow_run.run``), which prints the
progress and saves the image.

usage: python tools/demo.py [--steps N] [--width W] [--height H] [--fused]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import dev_paths  # isort: split

import torch
from comfy_server import ComfyServer
from lora_files import lora_factors, write_kohya_lora
from synthetic import FULL_SDXL_TEXT, make_edlora_state

import mixofshow_run
from fusion.families import SDXL

REPO = dev_paths.REPO

CHARACTERS = {"potter": ("<potter1>", "<potter2>"), "hermione": ("<hermione1>", "<hermione2>"),
              "thanos": ("<thanos1>", "<thanos2>")}
CKPT = "sd15_random_fp16.safetensors"
ADAPTER = "t2iadapter_openpose_random.safetensors"
# the SDXL example's models: bash tools/host/make_models.sh --sdxl makes the checkpoint and the adapter; the three
# plain SDXL LoRAs (kohya keys, full-size SDXL shapes, random) are written by prepare(), named by trigger words
SDXL_CKPT = "sdxl_random_fp16.safetensors"
SDXL_ADAPTER = "t2iadapter_openpose_sdxl_random.safetensors"
SDXL_LORAS = {"wizard": "ohwx wizard", "witch": "sks witch", "titan": "zxq titan"}
POSE = REPO / "assets" / "poses" / "harry_hermione_thanos.png"
DEMO_PREFIX = "mixofshow_demo"  # the SaveImage of the sampled picture


def sampled_image(saved: list) -> Path:
    """The sampled picture among a run's saved images (the prompt also outputs the region previews of
    Regions from Pose and of the sampler)."""
    return next(Path(p) for p in saved if Path(p).name.startswith(DEMO_PREFIX))


def prepare(base: Path) -> None:
    (base / "models" / "edloras").mkdir(parents=True, exist_ok=True)
    (base / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    for i, (name, tokens) in enumerate(CHARACTERS.items()):
        path = base / "models" / "edloras" / f"demo_{name}.pth"
        if not path.exists():
            torch.save(make_edlora_state(tokens, seed=100 + i), path)
    (base / "models" / "loras").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(SDXL_LORAS):
        path = base / "models" / "loras" / f"demo_sdxl_{name}.safetensors"
        if not path.exists():
            write_kohya_lora(path, lora_factors(200 + i, family=SDXL, model_channels=320, text_sizes=FULL_SDXL_TEXT,
                                                scale=0.5))
    (base / "models" / "controlnet").mkdir(parents=True, exist_ok=True)
    (base / "input").mkdir(parents=True, exist_ok=True)
    for folder, name in (("checkpoints", CKPT), ("controlnet", ADAPTER), ("checkpoints", SDXL_CKPT),
                         ("controlnet", SDXL_ADAPTER)):
        link = base / "models" / folder / name
        if not link.is_symlink():  # (the SDXL models exist after make_models.sh --sdxl only)
            link.symlink_to(REPO / ".host" / "models" / name)
    shutil.copy(POSE, base / "input" / POSE.name)


def graph(steps: int, width: int, height: int, fused: bool = False) -> dict:
    """The demo graph; ``fused``: the three ED-LoRAs go through Gradient Fusion first (strengths 1.0,
    the paper's fusion setting) and the regions sample the one fused model."""
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}}}
    model, clip, concepts = ["1", 0], ["1", 1], None
    strength = 1.0 if fused else 0.7
    for i, name in enumerate(CHARACTERS):
        node = str(10 + i)
        inputs = {"model": model, "clip": clip, "edlora_name": f"demo_{name}.pth",
                  "text_encoder_strength": strength, "unet_strength": strength}
        if concepts:
            inputs["concepts"] = concepts
        g[node] = {"class_type": "MixOfShowLoadEDLoRA", "inputs": inputs}
        model, clip, concepts = [node, 0], [node, 1], [node, 2]
    if fused:
        g["40"] = {"class_type": "MixOfShowGradientFusion", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "concepts": concepts, "steps": steps, "width": 512, "height": 512,
            "seed": 0, "solver": "closed_form", "cache": True}}
        model, clip, concepts = ["40", 0], ["40", 1], ["40", 2]
    g["30"] = {"class_type": "LoadImage", "inputs": {"image": POSE.name}}
    g["31"] = {"class_type": "MixOfShowPoseRegions", "inputs": {
        "image": ["30", 0], "clip": clip, "concepts": concepts, "margin": 0.05, "control_strength": 1.0,
        "prompts": "a <potter1> <potter2>, in Hogwarts uniform\na <hermione1> <hermione2>, smiling\n"
                   "a <thanos1> <thanos2>, in armor",
        "negative": "longbody, lowres, bad anatomy, bad hands, missing fingers, cropped, worst quality"}}
    g["20"] = {"class_type": "MixOfShowTextEncode", "inputs": {"clip": clip, "concepts": concepts, "text":
               "three people standing near a lake, 4K, high quality, high resolution, best quality"}}
    g["21"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "longbody, lowres, bad anatomy, "
                                                                               "bad hands, worst quality"}}
    g["32"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": ADAPTER}}
    g["33"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["20", 0], "negative": ["21", 0], "control_net": ["32", 0], "image": ["30", 0],
        "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    g["22"] = {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}}
    g["23"] = {"class_type": "MixOfShowRegionalSampler", "inputs": {
        "model": model, "positive": ["33", 0], "negative": ["33", 1], "latent_image": ["22", 0],
        "regions": ["31", 0], "seed": 19, "steps": steps, "cfg": 7.5, "sampler_name": "dpmpp_2m",
        "scheduler": "karras", "denoise": 1.0}}
    g["24"] = {"class_type": "VAEDecode", "inputs": {"samples": ["23", 0], "vae": ["1", 2]}}
    g["25"] = {"class_type": "SaveImage", "inputs": {"images": ["24", 0], "filename_prefix": DEMO_PREFIX}}
    return g


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--fused", action="store_true", help="fuse the three ED-LoRAs first (Gradient Fusion)")
    a = ap.parse_args()
    base = REPO / ".host" / "demo-base"
    prepare(base)
    t0 = time.time()
    with ComfyServer(base, {"mixofshow": REPO}) as server:
        try:
            saved = mixofshow_run.run(graph(a.steps, a.width, a.height, a.fused), server.url,
                                      REPO / ".host" / "demo-out")
        except mixofshow_run.RunError as e:
            print("demo failed:", e)
            return e.exit_code
    image = sampled_image(saved)
    shutil.copy(image, REPO / ".host" / "demo.png")
    print(json.dumps({"image": str(image), "copy": str(REPO / ".host" / "demo.png"),
                      "seconds": round(time.time() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
