"""Sampling nodes: Regional KSampler and Regional Guider (docs/design.md §9)."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

import nodes as comfy_nodes

from .glue.previews import preview_ui, regions_preview
from .glue.sampling import regional_guider, regional_ksampler
from .glue.schema import PackNode, check_choices, schema
from .names import REGIONS, SAMPLING

_REGIONS_TOOLTIP = "Regions (Region / Regions from Pose nodes); without regions this is the stock behaviour."


class RegionalGuiderNode(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            cls, node_id="MixOfShowRegionalGuider", display_name="Regional Guider (Mix-of-Show)", category=SAMPLING,
            description="A GUIDER (for SamplerCustomAdvanced) that samples with regional prompts.",
            search_aliases=("regional guider", "regional prompt", "multi character"),
            inputs=[
                io.Model.Input("model", tooltip="The sampling model (from Load ED-LoRA or Gradient Fusion)."),
                io.Conditioning.Input("positive", tooltip="Global prompt (used outside the regions)."),
                io.Conditioning.Input("negative", tooltip="Global negative prompt."),
                REGIONS.Input("regions", tooltip=_REGIONS_TOOLTIP),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
            ],
            outputs=[io.Guider.Output(tooltip="A guider for SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, regions, cfg) -> io.NodeOutput:
        return io.NodeOutput(regional_guider(model, positive, negative, regions, cfg),
                             ui=preview_ui(regions_preview(regions)))


def _stock_ksampler_inputs() -> list[io.Input]:
    """The stock KSampler's inputs, in its order and with its own defaults and tooltips."""
    spec = comfy_nodes.KSampler.INPUT_TYPES()["required"]

    def tip(name):
        return spec[name][1].get("tooltip")

    seed, steps, cfg, denoise = (spec[n][1] for n in ("seed", "steps", "cfg", "denoise"))
    return [
        io.Model.Input("model", tooltip=tip("model")),
        io.Int.Input("seed", default=seed["default"], min=seed["min"], max=seed["max"], control_after_generate=True,
                     tooltip=tip("seed")),
        io.Int.Input("steps", default=steps["default"], min=steps["min"], max=steps["max"], tooltip=tip("steps")),
        io.Float.Input("cfg", default=cfg["default"], min=cfg["min"], max=cfg["max"], step=cfg["step"],
                       round=cfg["round"], tooltip=tip("cfg")),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip=tip("sampler_name")),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip=tip("scheduler")),
        io.Conditioning.Input("positive", tooltip=tip("positive")),
        io.Conditioning.Input("negative", tooltip=tip("negative")),
        io.Latent.Input("latent_image", tooltip=tip("latent_image")),
        io.Float.Input("denoise", default=denoise["default"], min=denoise["min"], max=denoise["max"],
                       step=denoise["step"], tooltip=tip("denoise")),
    ]


class RegionalKSampler(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            cls, node_id="MixOfShowRegionalSampler", display_name="Regional KSampler (Mix-of-Show)", category=SAMPLING,
            description="The stock KSampler plus regions: inside each region's mask, cross-attention uses the "
                        "region's own prompts. Without regions it is exactly the stock KSampler.",
            search_aliases=("regional sampler", "regional prompt", "multi character", "KSampler regions"),
            inputs=_stock_ksampler_inputs() + [REGIONS.Input("regions", optional=True, tooltip=_REGIONS_TOOLTIP)],
            outputs=[io.Latent.Output(tooltip="The denoised latent.")],
        )

    @classmethod
    def validate_inputs(cls, sampler_name, scheduler) -> bool | str:
        return check_choices(cls, sampler_name=sampler_name, scheduler=scheduler)

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise=1.0, regions=None) -> io.NodeOutput:
        return io.NodeOutput(regional_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                               latent_image, denoise, regions),
                             ui=preview_ui(regions_preview(regions)))


NODES = [RegionalGuiderNode, RegionalKSampler]
