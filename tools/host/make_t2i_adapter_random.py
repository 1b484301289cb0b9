"""Write a random-weight T2I-Adapter with the layout of TencentARC's t2iadapter_openpose_sd14v1
(3-channel pose image, SD1.x channels 320/640/1280/1280) — or, with ``--xl``, of the SDXL OpenPose adapter
(t2i-adapter-openpose-sdxl-1.0: 16x16 pixel unshuffle, 768 input channels, SDXL's three levels) — that
ComfyUI's stock ControlNet loader detects and loads (comfy.controlnet.load_t2i_adapter). Built from
ComfyUI's own Adapter class.

usage: python make_t2i_adapter_random.py COMFYUI_DIR OUT.safetensors [--seed N] [--xl]
"""
import argparse
import math
import os
import sys

import torch
from safetensors.torch import save_file

ap = argparse.ArgumentParser()
ap.add_argument("comfy_dir")
ap.add_argument("out")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--xl", action="store_true", help="the SDXL adapter's layout")
a = ap.parse_args()
sys.path.insert(0, os.path.abspath(a.comfy_dir))  # this ComfyUI's comfy package (make_models.sh names it)
from comfy.t2i_adapter.adapter import Adapter  # noqa: E402

# the pose image pixel-unshuffled: 8x8 (SD1.x) or 16x16 (SDXL) blocks of 3 channels
net = Adapter(cin=(256 if a.xl else 64) * 3, channels=[320, 640, 1280, 1280], nums_rb=2, ksize=1, sk=True,
              use_conv=False, xl=a.xl)
g = torch.Generator().manual_seed(a.seed)
out = {}
for k, v in net.state_dict().items():
    if k.endswith("bias"):
        t = torch.zeros(v.shape)
    else:
        fan_in = max(1, math.prod(v.shape[1:]))
        t = torch.randn(v.shape, generator=g) * (0.5 / math.sqrt(fan_in))
    out[k] = t.to(torch.float16).contiguous()
save_file(out, a.out)
print(f"{len(out)} tensors, {sum(t.numel() for t in out.values()) / 1e6:.1f}M params -> {a.out}")
