"""What a patched ComfyUI module really computes, for tests that compare weights."""
from __future__ import annotations

import torch


def effective_weight(module) -> torch.Tensor:
    """The weight a forward pass really uses (patches may be applied in place or at cast time)."""
    w = module.weight
    eye = torch.eye(w.shape[1], dtype=torch.float32)
    if w.ndim == 4:
        eye = eye[:, :, None, None]
    with torch.no_grad():
        out = module(eye) - module(torch.zeros_like(eye))
    return out.reshape(w.shape[1], w.shape[0]).t().reshape(w.shape)
