"""Sampling with regions: the stock KSampler and a CFG guider on the regions' patched clone of the MODEL."""
from __future__ import annotations

import comfy.samplers

import nodes as comfy_nodes

from .regional import install_regions


class RegionalGuider(comfy.samplers.CFGGuider):
    """CFGGuider on a clone of the model patched for the regions."""

    def __init__(self, model_patcher, regions=()):
        super().__init__(install_regions(model_patcher, regions))


def regional_guider(model, positive, negative, regions, cfg: float) -> RegionalGuider:
    guider = RegionalGuider(model, regions)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def regional_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                      denoise=1.0, regions=None) -> dict:
    """The stock KSampler on the regions' patched clone of ``model``; returns the LATENT."""
    return comfy_nodes.common_ksampler(install_regions(model, regions), seed, steps, cfg, sampler_name, scheduler,
                                       positive, negative, latent_image, denoise=denoise)[0]
