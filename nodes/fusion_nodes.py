"""Fusion nodes: Gradient Fusion (docs/design.md §5) and Save Fused ED-LoRA Bundle (§6). The work is in
nodes/glue/fusion_run.py (one fusion), nodes/glue/fusion_recording.py (recording), nodes/glue/fused_patches.py
(patches and bundles) and fusion/ (plan, solver, cache, bundle format)."""
from __future__ import annotations

import os

import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from ..fusion.errors import BundleError
from ..fusion.files.bundle import save_bundle
from ..fusion.log import log
from ..fusion.merge import gradient_fusion as gf
from .glue.folders import bundle_output_path
from .glue.fused_patches import bundle_of, fused_of
from .glue.fusion_run import NodeProgress, fuse
from .glue.schema import PackNode, advanced, check_choices, schema
from .names import CONCEPTS, FUSION, MAX_FUSION_SIZE

SAMPLER_CHOICES = [gf.REFERENCE_SAMPLER] + list(comfy.samplers.KSampler.SAMPLERS)


class GradientFusionNode(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            cls, node_id="MixOfShowGradientFusion", display_name="Gradient Fusion (Mix-of-Show)", category=FUSION,
            description="Mix-of-Show gradient fusion: merges every concept of the set (ED-LoRAs and LoRAs as "
                        "concepts) into ONE model, so that each fused layer reproduces every concept's own tuned "
                        "layer on the inputs that concept produces. Three stages: text encoder, cross-attention "
                        "k/v, other UNet layers (by sampling each concept's prompt). The result is an exact "
                        "low-rank LoRA on the base (SD1.5 or SDXL: both SDXL text encoders are fused); it is cached "
                        "on disk (models/edloras/.fusion_cache, 2 GiB at most) and Save Fused ED-LoRA Bundle writes "
                        "it as a standard LoRA file.",
            search_aliases=("merge LoRA", "fuse ED-LoRA", "multi character", "multi concept", "gradient fusion"),
            inputs=[
                io.Model.Input("model", tooltip="The BASE model: the checkpoint loader's MODEL, not a loader's "
                                                "output (LoRA patches on fused weights are ignored)."),
                io.Clip.Input("clip", tooltip="The BASE CLIP: the checkpoint loader's CLIP."),
                CONCEPTS.Input("concepts", tooltip="Concept set from chained Load ED-LoRA / LoRA as Concept nodes; "
                                                   "each concept's strengths are its fusion weights (1.0 in the "
                                                   "paper)."),
                io.Int.Input("steps", default=20, min=1, max=200,
                             tooltip="Sampling steps per concept for recording the UNet layers' inputs (20 in "
                                     "the paper)."),
                io.Int.Input("width", default=512, min=64, max=MAX_FUSION_SIZE, step=8,
                             tooltip="Width of the images sampled for recording (SDXL: 1024, also told to the "
                                     "model as its size conditioning)."),
                io.Int.Input("height", default=512, min=64, max=MAX_FUSION_SIZE, step=8,
                             tooltip="Height of the images sampled for recording (SDXL: 1024)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Noise seed of the recording samples (concept i uses seed + i). Keep it "
                                     "fixed: another seed is another fusion."),
                io.Combo.Input("solver", options=list(gf.SOLVERS), default="closed_form",
                               tooltip="closed_form: the exact (ridge-regularised) minimiser, fast. lbfgs: the "
                                       "reference optimiser with its iteration counts, for comparison (slower)."),
                io.Boolean.Input("cache", default=True,
                                 tooltip="Reuse fused results from disk (models/edloras/.fusion_cache); off: "
                                         "nothing is written."),
                advanced(io.Combo.Input(
                    "sampler_name", options=SAMPLER_CHOICES, default=gf.REFERENCE_SAMPLER, optional=True,
                    tooltip="Sampler of the recording samples. reference: the paper's DPM-Solver++ (2M) on "
                            "linspace timesteps; or any ComfyUI sampler with the scheduler below.")),
                advanced(io.Combo.Input(
                    "scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal", optional=True,
                    tooltip="Scheduler for a ComfyUI sampler (the reference sampler has its own timesteps).")),
                advanced(io.Float.Input(
                    "ridge", default=gf.DEFAULT_RIDGE, min=0.0, max=10.0, step=0.0001, optional=True,
                    tooltip="Regularisation of every closed-form solve, relative to the mean input energy "
                            "(ridge · trace(G)/in). Keeps the fused layers out of directions the recordings "
                            "barely visit; 0 = the unregularised minimiser of the recorded rows.")),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="Fused model: the base with the fused LoRA "
                                                              "(layer-wise conditioning installed)."),
                io.Clip.Output(display_name="clip", tooltip="Fused CLIP: the base with the fused LoRA."),
                CONCEPTS.Output(display_name="concepts", tooltip="Fused concept set: every concept's tokens, tables "
                                                                 "and trigger words; strengths 0 (already merged)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, solver, sampler_name=None, scheduler=None) -> bool | str:
        return check_choices(cls, solver=solver, sampler_name=sampler_name, scheduler=scheduler)

    @classmethod
    def execute(cls, model, clip, concepts, steps, width, height, seed, solver, cache,
                sampler_name=gf.REFERENCE_SAMPLER, scheduler="normal", ridge=gf.DEFAULT_RIDGE) -> io.NodeOutput:
        settings = gf.FusionSettings(steps=steps, width=width, height=height, seed=seed, solver=solver,
                                     sampler=sampler_name, scheduler=scheduler, ridge=ridge)
        hidden = getattr(cls, "hidden", None)
        progress = NodeProgress(getattr(hidden, "unique_id", None) if hidden is not None else None)
        m, c, cs, stats = fuse(model, clip, concepts, settings, cache, progress)
        log.info("Mix-of-Show fusion: %s (cache %s, recorded %s)", cs.describe(), stats["cache"], stats["recorded"])
        return io.NodeOutput(m, c, cs)


class SaveFusedBundle(PackNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            cls, node_id="MixOfShowSaveFusedBundle", display_name="Save Fused ED-LoRA Bundle (Mix-of-Show)",
            category=FUSION, is_output_node=True,
            description="Saves a fusion as one .safetensors in models/edloras: a standard LoRA (kohya keys: the "
                        "stock Load LoRA at strength 1.0 gives the fused weights; SDXL: lora_te1_/lora_te2_/"
                        "lora_unet_) plus every concept's tables (both text encoders' on SDXL) and the metadata "
                        "(base, concepts, settings, family). Load ED-LoRA loads it with the concept tokens.",
            search_aliases=("save fused", "fused bundle", "export fusion", "save LoRA"),
            inputs=[
                io.Model.Input("model", tooltip="Fused MODEL from Gradient Fusion."),
                io.Clip.Input("clip", tooltip="Fused CLIP from Gradient Fusion."),
                CONCEPTS.Input("concepts", tooltip="Fused concept set from Gradient Fusion (its tables are saved)."),
                io.String.Input("filename_prefix", default="fused_edlora",
                                tooltip="File name prefix in models/edloras; a counter is appended."),
            ],
            outputs=[io.String.Output(display_name="filename", tooltip="Name of the written bundle.")],
        )

    @classmethod
    def execute(cls, model, clip, concepts, filename_prefix) -> io.NodeOutput:
        path = bundle_output_path(filename_prefix, "Save Fused ED-LoRA Bundle, input 'filename_prefix'")
        model_deltas, info = fused_of(model)
        clip_deltas, clip_info = fused_of(clip.patcher)
        info = info or clip_info
        if not info:
            raise BundleError("Save Fused Bundle: the MODEL/CLIP carry no fused LoRA -- connect the outputs of "
                              "Gradient Fusion (Mix-of-Show) or of a Load ED-LoRA that loaded a version-2 bundle "
                              "(0.1.0 bundles hold full weights and cannot be saved again: fuse once more)")
        bundle = bundle_of(model_deltas, clip_deltas, model, clip, info, concepts)
        save_bundle(bundle, path)
        name = os.path.basename(path)
        return io.NodeOutput(name, ui={"text": [f"{name}: {concepts.describe()}"]})


NODES = [GradientFusionNode, SaveFusedBundle]
