"""Each region's own LoRA, inside its region only, in the same UNet pass (issue 8).

A region's MODEL (Load ED-LoRA, LoRA as Concept or the stock Load LoRA, on the sampling MODEL's
base) contributes the weight patches it has beyond the sampling MODEL. For every UNet layer they
patch, a forward hook adds the masked low-rank products to the layer's output
(fusion/regional_lora.py): the sampling MODEL's weights stay as they are (no merged copies, nothing
written to ``module.weight``), and ComfyUI's own weight handling (offloading, lowvram casts) is
untouched. The hooks live only for the duration of one UNet call (a DIFFUSION_MODEL wrapper adds
and removes them), so other clones sharing the modules never see them.

Layers and the positions their masks are taken at:
* linear layers of the transformer blocks (attn1/attn2 q/k/v/out, ff): every token is a pixel of
  the layer's feature map; cross-attention k/v take the regional attention's concatenated context,
  and region r's product applies to region r's own context tokens only (exactly its k/v);
* conv layers (proj_in/out as 1x1 convs, LoCon 3x3 convs of the ResNet blocks): the output pixels;
* a ResNet block's time-embedding projection (``emb_layers.1``, LoCon): its output is added to every
  pixel of the block's features, so the masked part is returned as a per-pixel map.
"""
from __future__ import annotations

from collections import defaultdict

import comfy.patcher_extension
import torch

from ...fusion.errors import LoRAFormatError
from ...fusion.regions.blend import blend_weights
from ...fusion.regions.lowrank import LowRankBank
from ...fusion.regions.masks import feature_hw_for_tokens
from ..names import CONCEPTS_USED_KEY
from .lora_patch import low_rank_factors

WRAPPER_KEY = "mixofshow.region_lora"
_UNET = "diffusion_model."


def _source(index: int, region_model) -> str:
    loaded = region_model.model_options.get(CONCEPTS_USED_KEY, ())
    return f"region {index}" + (f" ({', '.join(loaded)})" if loaded else "")


def extra_patches(base, region_model, index: int) -> dict[str, list[tuple]]:
    """The weight patches ``region_model`` carries beyond ``base`` (patch entries are shared between
    clones, so "beyond" is by identity): weight key -> patch entries."""
    if region_model.model is not base.model:
        raise ValueError(f"region {index}: its MODEL is not the sampling MODEL's base model with a LoRA on it — load "
                         f"the region's LoRA (Load ED-LoRA, LoRA as Concept or Load LoRA) on the same checkpoint as "
                         f"the sampling MODEL")
    out = {}
    for key, entries in region_model.patches.items():
        shared = base.patches.get(key, [])
        extra = [e for e in entries if not any(e is s for s in shared)]
        if extra:
            out[key] = extra
    return out


def region_factors(base, region_model, index: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path (below ``diffusion_model``) -> ``(up, down)`` of the region's extra LoRA there,
    strength and alpha/rank folded into ``up``; several patches on one layer stack their ranks."""
    source = _source(index, region_model)
    factors = {}
    for key, entries in extra_patches(base, region_model, index).items():
        if not key.startswith(_UNET) or not key.endswith(".weight"):
            raise LoRAFormatError(f"{source}: the patch on {key} is not a LoRA on a UNet layer's weight; only those "
                                  f"can be applied per region")
        ups, downs = [], []
        for strength, value, strength_model, offset, function in entries:
            if strength_model != 1.0 or offset is not None or function is not None:
                raise LoRAFormatError(f"{source}: the patch on {key} also rescales or offsets the original weight, "
                                      f"which cannot be applied per region")
            up, down = low_rank_factors(value, key, source)
            ups.append(up.reshape(up.shape[0], up.shape[1]) * float(strength))
            downs.append(down)
        factors[key[len(_UNET):-len(".weight")]] = (torch.cat(ups, dim=1), torch.cat(downs))
    return factors


class RegionLoRAs:
    """The regions' LoRAs of one regional sampling, and the DIFFUSION_MODEL wrapper that applies them.

    ``data`` is the regions' :class:`~nodes.regional_attention.RegionData` (masks, and the context
    layout the regional attention sets per layer)."""

    def __init__(self, base, regions, data):
        self.data = data
        per_module: dict[str, dict[int, tuple]] = defaultdict(dict)
        for i, region in enumerate(regions):
            if region.model is not None:
                for path, pair in region_factors(base, region.model, i).items():
                    per_module[path][i] = pair
        unet = base.model.diffusion_model
        self.layers = []  # (module, bank, kind, the ResNet block of an "emb" layer)
        for path, pairs in sorted(per_module.items()):
            module = unet.get_submodule(path)
            kind = self._kind(path, module)
            block = unet.get_submodule(path[:-len(".emb_layers.1")]) if kind == "emb" else None
            self.layers.append((module, LowRankBank(pairs), kind, block))
        self._weights = {}
        self._latent_hw = (1, 1)
        self._block_hw = {}

    def __bool__(self) -> bool:
        return bool(self.layers)

    def __deepcopy__(self, memo):  # shared by the patched clone's options; never copy the factors
        return self

    @staticmethod
    def _kind(path: str, module) -> str:
        if isinstance(module, torch.nn.Conv2d):
            if module.groups != 1:
                raise LoRAFormatError(f"{path}: a grouped convolution cannot take a region LoRA")
            return "conv"
        if not isinstance(module, torch.nn.Linear):
            raise LoRAFormatError(f"{path} ({type(module).__name__}) cannot take a region LoRA")
        if path.endswith(("attn2.to_k", "attn2.to_v")):
            return "context"
        if path.endswith(".emb_layers.1"):
            return "emb"
        if ".transformer_blocks." in path or path.endswith((".proj_in", ".proj_out")):  # linear proj: tokens
            return "tokens"
        raise LoRAFormatError(f"{path}: a LoRA on this layer acts on the whole image (it is not per pixel), so it "
                              f"cannot be limited to a region")

    def weights(self, fh: int, fw: int, device) -> tuple[torch.Tensor, frozenset]:
        """``[R, fh*fw]`` blend weights of every region at one feature size, and the regions present there
        (decided once per size on the CPU: no device sync in the layers' hooks)."""
        key = (fh, fw, str(device))
        if key not in self._weights:
            w = blend_weights(self.data.flat_masks(fh, fw, "cpu"))
            present = frozenset(int(r) for r in torch.nonzero(w.amax(dim=1) > 0).flatten())
            self._weights[key] = (w.to(device), present)
        return self._weights[key]

    @staticmethod
    def _active(bank: LowRankBank, present: frozenset) -> bool:
        return not present.isdisjoint(bank.regions)

    def _hook(self, module, bank: LowRankBank, kind: str):
        def tokens(_m, args, out):
            x = args[0]
            w, present = self.weights(*feature_hw_for_tokens(x.shape[-2], *self._latent_hw), x.device)
            return out + bank.linear(x, w) if self._active(bank, present) else out

        def context(_m, args, out):
            x, layout = args[0], self.data.context_layout
            if layout is None or x.shape[-2] != layout.global_tokens + len(self.data) * layout.region_tokens:
                return out  # not the regional attention's layout: nothing of a region here
            return out + bank.segments(x, {r: layout.region_slice(r) for r in bank.regions})

        def conv(m, args, out):
            w, present = self.weights(out.shape[-2], out.shape[-1], out.device)
            if not self._active(bank, present):
                return out
            return out + bank.conv(args[0], w, m.stride, m.padding, m.dilation, (out.shape[-2], out.shape[-1]))

        def emb(_m, args, out):
            fh, fw = self._block_hw[id(module)]
            w, present = self.weights(fh, fw, out.device)
            if not self._active(bank, present):
                return out
            return out[:, :, None, None] + bank.broadcast(args[0], w).reshape(out.shape[0], out.shape[1], fh, fw)

        return {"tokens": tokens, "context": context, "conv": conv, "emb": emb}[kind]

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        self._latent_hw = (int(x.shape[-2]), int(x.shape[-1]))
        self.data.context_layout = None
        handles = []
        try:
            for module, bank, kind, block in self.layers:
                if block is not None:  # the ResNet block's feature size, seen just before its time embedding
                    handles.append(block.register_forward_pre_hook(
                        lambda _m, args, key=id(module): self._block_hw.__setitem__(key, tuple(args[0].shape[-2:]))))
                handles.append(module.register_forward_hook(self._hook(module, bank, kind)))
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        finally:
            for h in handles:
                h.remove()


def install_region_loras(clone, base, regions, data) -> None:
    """Add the regions' LoRAs to a patched clone of the sampling MODEL ``base`` (no-op without any)."""
    loras = RegionLoRAs(base, regions, data)
    if loras:
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, loras)
