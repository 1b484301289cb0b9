"""What chosen UNet layers receive and return while a patched MODEL samples, recorded from inside the pack's own
wrapper (so the recorded outputs include whatever the pack adds, e.g. a region's LoRA)."""
from __future__ import annotations

import comfy.patcher_extension
import torch


def record_layer_io(patched, unet: torch.nn.Module, paths: set[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Add a diffusion-model wrapper to ``patched`` that hooks each layer of ``paths`` for the call; returns the
    dict it fills with each layer's first (input, output) once ``patched`` samples."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def recorder(path):
        def hook(_module, args, out):
            seen.setdefault(path, (args[0].clone(), out.clone()))  # returns None: the output is left alone
        return hook

    def record(executor, *args, **kwargs):  # inside the pack's wrapper: these hooks run after the pack's
        handles = [unet.get_submodule(p).register_forward_hook(recorder(p)) for p in paths]
        try:
            return executor(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.recorder", record)
    return seen
