"""Write a full-size SDXL checkpoint (the original/ldm key layout of SDXL 1.0 base: UNet, CLIP-L, OpenCLIP-bigG,
VAE; fp16, random weights) as one .safetensors that ComfyUI's stock Load Checkpoint detects as SDXL. No download.

Key names and shapes come from ComfyUI's own classes, built on the meta device (no memory):
  UNet : comfy.supported_models.SDXL(<SDXL's unet config>).get_model() -> model_base.SDXL.diffusion_model
  CLIP : comfy.sdxl_clip.SDXLClipModel (CLIP-L 12 layers, bigG 32 layers)
  VAE  : comfy.ldm.models.autoencoder.AutoencoderKL (SDXL's VAE has SD1.5's architecture)
and the saving-side key mapping of the SDXL model config (process_clip_state_dict_for_saving: bigG in OpenCLIP
naming with fused q/k/v; "model.diffusion_model." / "first_stage_model." prefixes). The file (about 6.5 GiB) is
written tensor by tensor — header first, then each tensor's bytes as it is drawn — so the process holds one tensor
at a time, never the checkpoint.

Weights: biases 0, norm scales 1, embeddings N(0, 0.02), other weights N(0, 1/fan_in), seeded; a tensor's
values depend only on the seed and its key (draws in sorted key order).

usage: python make_sdxl_random.py COMFYUI_DIR OUT.safetensors [--seed N]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time

import torch

SDXL_UNET = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'num_classes': 'sequential', 'adm_in_channels': 2816, 'in_channels': 4,
             'model_channels': 320, 'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10],
             'channel_mult': [1, 2, 4], 'transformer_depth_middle': 10, 'use_linear_in_transformer': True,
             'context_dim': 2048, 'num_head_channels': 64, 'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10],
             'use_temporal_attention': False, 'use_temporal_resblock': False}
VAE_DDCONFIG = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
                'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}
DTYPE = torch.float16
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}


def layout() -> dict[str, torch.Tensor]:
    """Every key of the checkpoint with a meta tensor of its shape and dtype (needs ComfyUI importable)."""
    import comfy.ops
    import comfy.sdxl_clip
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    mc = comfy.supported_models.SDXL({**SDXL_UNET, "dtype": DTYPE})
    mc.set_inference_dtype(DTYPE, None)
    mc.custom_operations = comfy.ops.disable_weight_init
    with torch.device("meta"):
        unet = mc.get_model({}, "", device="meta").diffusion_model
        clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=DTYPE)
        vae = AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4)
        sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
        sd.update(mc.process_clip_state_dict_for_saving({k: v for k, v in clip.state_dict().items()}))
        sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    out = {}
    for k in sorted(sd):
        t = sd[k]
        dtype = DTYPE if t.is_floating_point() else torch.int64
        out[k] = torch.empty(tuple(t.shape), dtype=dtype, device="meta")
    return out


def fill(key: str, shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """The random value of one tensor (make_sd15_random.py's rule)."""
    if dtype == torch.int64:  # CLIP-L's position ids
        return torch.arange(shape[-1], dtype=torch.int64).expand(shape).contiguous()
    if key.endswith(".bias"):
        v = torch.zeros(shape)
    elif len(shape) == 1 and key.endswith(".weight"):  # every 1-D weight here is a norm scale
        v = torch.ones(shape)
    elif "embedding" in key:
        v = torch.randn(shape, generator=g) * 0.02
    elif len(shape) == 0:
        v = torch.ones(shape)
    else:
        fan_in = max(1, math.prod(shape[1:])) if len(shape) > 1 else shape[0]
        v = torch.randn(shape, generator=g) * (1.0 / math.sqrt(fan_in))
    return v.to(dtype).contiguous()


def write_streamed(path: str, tensors: dict[str, torch.Tensor], make, metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors of ``tensors``' keys, shapes and dtypes (meta tensors will do) whose values
    ``make(key, shape, dtype)`` returns one at a time, in key order (safetensors' layout: 8-byte little-endian
    header length, the JSON header, then the tensors' bytes at their offsets). Written to ``path + '.part'``
    and renamed."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for key in sorted(tensors):
        t = tensors[key]
        size = math.prod(t.shape) * t.element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset,
                                                                                                     offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in sorted(tensors):
            t = tensors[key]
            value = make(key, tuple(t.shape), t.dtype)
            assert value.dtype == t.dtype and tuple(value.shape) == tuple(t.shape), key
            f.write(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("comfy_dir")
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.comfy_dir))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()

    t0 = time.time()
    tensors = layout()
    g = torch.Generator().manual_seed(a.seed)
    write_streamed(a.out, tensors, lambda key, shape, dtype: fill(key, shape, dtype, g),
                   {"format": "pt", "note": "random weights, SDXL architecture, for tests and benchmarks"})
    groups: dict[str, int] = {}
    for k in tensors:
        groups[k.split(".")[0]] = groups.get(k.split(".")[0], 0) + 1
    params = sum(math.prod(t.shape) for t in tensors.values() if t.is_floating_point())
    print(f"keys={len(tensors)} {groups} params={params / 1e6:.1f}M size={os.path.getsize(a.out) / 2**30:.2f} GiB "
          f"time={time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
