"""The pack's nodes called the way a prompt calls them (their V3 ``execute``, looked up by node id in
ComfyUI's registry), with positional arguments in each node's input order, for terse tests."""
from __future__ import annotations

from comfy_env import node, node_ui


def load_edlora(model, clip, edlora_name, text_encoder_strength=0.7, unet_strength=0.7, concepts=None):
    return node("MixOfShowLoadEDLoRA", model=model, clip=clip, edlora_name=edlora_name,
                text_encoder_strength=text_encoder_strength, unet_strength=unet_strength, concepts=concepts)


def load_edlora_ui(model, clip, edlora_name, text_encoder_strength=0.7, unet_strength=0.7, concepts=None):
    return node_ui("MixOfShowLoadEDLoRA", model=model, clip=clip, edlora_name=edlora_name,
                   text_encoder_strength=text_encoder_strength, unet_strength=unet_strength, concepts=concepts)


def text_encode(clip, concepts, text):
    return node("MixOfShowTextEncode", clip=clip, concepts=concepts, text=text)[0]


def region(positive, negative, mask, regions=None, control_strength=1.0, model=None):
    return node("MixOfShowRegion", positive=positive, negative=negative, mask=mask, regions=regions,
                control_strength=control_strength, model=model)[0]


def box_mask(width, height, top, left, bottom, right):
    return node("MixOfShowBoxMask", width=width, height=height, top=top, left=left, bottom=bottom, right=right)[0]


def box_mask_xywh(width, height, x, y, box_width, box_height):
    return node("MixOfShowBoxMaskXYWH", width=width, height=height, x=x, y=y, box_width=box_width,
                box_height=box_height)[0]


def pose_box_mask(image, index, margin):
    return node("MixOfShowPoseBoxMask", image=image, index=index, margin=margin)


def pose_regions(image, clip, prompts, negative, margin, concepts=None, regions=None, control_strength=1.0):
    return node("MixOfShowPoseRegions", image=image, clip=clip, prompts=prompts, negative=negative, margin=margin,
                concepts=concepts, regions=regions, control_strength=control_strength)


def regional_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                      denoise=1.0, regions=None):
    return node("MixOfShowRegionalSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
                scheduler=scheduler, positive=positive, negative=negative, latent_image=latent_image,
                denoise=denoise, regions=regions)[0]


def regional_guider(model, positive, negative, regions, cfg):
    return node("MixOfShowRegionalGuider", model=model, positive=positive, negative=negative, regions=regions,
                cfg=cfg)[0]


def save_fused_bundle(model, clip, concepts, filename_prefix):
    return node("MixOfShowSaveFusedBundle", model=model, clip=clip, concepts=concepts,
                filename_prefix=filename_prefix)[0]
