"""Issue 23: what a hostile-input run still found, refused (or made to work) naming the file, key, region or node
input — LoRAs as concepts with absurd values or on 1-D weights, regions whose masks have different sizes, long
prompts without concept tokens, save paths no file system takes. Every file here is written as trainers write
them (tests/support/lora_files.py, synthetic.py) and run through the pack's nodes in a real ComfyUI."""
import re

import pytest
import torch
from comfy_env import node
from lora_files import lora_factors, write_kohya_lora

UP = ".lora_up.weight"


def write_lora(env, name: str, factors: dict) -> str:
    write_kohya_lora(env.base / "models" / "loras" / name, factors)
    return name


def lora_concept(model, clip, name: str, words: str = "ohwx person"):
    return node("MixOfShowLoRAConcept", model=model, clip=clip, lora_name=name, trigger_words=words,
                strength_model=1.0, strength_clip=1.0, concepts=None)


# ------------------------------------------------------------------------------ absurd but finite values

@pytest.mark.parametrize("part, value", [("unet", 1e30), ("text", 1e20)])
def test_lora_as_concept_with_values_no_trained_file_has_is_refused(env, tiny, part, value):
    """The hostile run's up factors: finite, and NaN/Inf latents once applied. The ED-LoRA rule applies."""
    model, clip, _ = tiny
    factors = lora_factors(300, attention_only=True)
    module = next(m for m, (p, _, _) in factors.items() if p == part)
    factors[module][1].view(-1)[0] = value
    name = write_lora(env, f"absurd_{part}.safetensors", factors)
    prefix = "lora_unet_" if part == "unet" else "lora_te_"
    key = prefix + module.replace(".", "_") + UP
    with pytest.raises(ValueError, match=re.escape(f"{name}: '{key}' holds a value of {value:.3g}, beyond ±10000")):
        lora_concept(model, clip, name)


def test_lora_as_concept_whose_weight_change_is_absurd_is_refused(env, tiny):
    model, clip, _ = tiny
    factors = lora_factors(301, attention_only=True, text=False)
    module = next(iter(factors))
    factors[module][1].fill_(5e3)
    factors[module][2].fill_(5e3)
    name = write_lora(env, "absurd_change.safetensors", factors)
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}: 'diffusion_model\.[^']*\.weight': its factors can "
                                         r"change a weight by up to .*, beyond ±10000"):
        lora_concept(model, clip, name)


# ------------------------------------------------------------------------------ a LoRA on a 1-D weight

ONE_D = {"down_blocks.0.attentions.0.transformer_blocks.0.norm1": 32,  # LayerNorm of a transformer block
         "down_blocks.0.attentions.0.norm": 32}  # the SpatialTransformer's GroupNorm


@pytest.mark.parametrize("module", list(ONE_D))
def test_ed_lora_on_a_1d_weight_is_refused_naming_file_and_module(env, tiny, write_edlora, module):
    from synthetic import make_edlora_state

    model, clip, _ = tiny
    state = make_edlora_state(("<n1>",), seed=70, model_channels=32, text_layers=2, text_intermediate=512)
    width = ONE_D[module]
    state["params"]["unet"][f"{module}.lora_up.weight"] = torch.randn(width, 2) * 0.1
    state["params"]["unet"][f"{module}.lora_down.weight"] = torch.randn(2, width) * 0.1
    name = f"one_d_{module.rsplit('.', 1)[-1]}.pth"
    torch.save(state, env.base / "models" / "edloras" / name)
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}: unet module '{re.escape(module)}' has a 1-D weight"):
        node("MixOfShowLoadEDLoRA", model=model, clip=clip, edlora_name=name, text_encoder_strength=1.0,
             unet_strength=1.0)


@pytest.mark.parametrize("module", list(ONE_D))
def test_lora_as_concept_on_a_1d_weight_is_refused_naming_file_and_key(env, tiny, module):
    model, clip, _ = tiny
    factors = lora_factors(302, attention_only=True, text=False)
    width = ONE_D[module]
    factors[module] = ("unet", torch.randn(width, 2) * 0.1, torch.randn(2, width) * 0.1)
    name = write_lora(env, f"one_d_{module.rsplit('.', 1)[-1]}.safetensors", factors)
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}: 'diffusion_model\.[^']*\.weight' is a 1-D weight"):
        lora_concept(model, clip, name)


def test_region_lora_on_a_1d_weight_is_refused_naming_the_region(env, tiny):
    """The stock Load LoRA takes such a file (ComfyUI logs an error when it patches and skips the weight); as a
    region's MODEL it is refused naming the region and the layer."""
    import pack_nodes as pn

    import nodes as comfy_nodes

    model, clip, _ = tiny
    module = "down_blocks.0.attentions.0.transformer_blocks.0.norm1"
    name = write_lora(env, "one_d_region.safetensors",
                      {module: ("unet", torch.randn(32, 2) * 0.1, torch.randn(2, 32) * 0.1)})
    stock, _ = comfy_nodes.LoraLoader().load_lora(model, clip, name, 1.0, 0.0)
    encode = comfy_nodes.CLIPTextEncode().encode
    regions = pn.region(encode(clip, "a tree")[0], encode(clip, "blurry")[0], torch.ones(1, 64, 64), model=stock)
    with pytest.raises(ValueError, match=r"^region 1: input_blocks\.1\.1\.transformer_blocks\.0\.norm1 is a "
                                         r"LayerNorm \(a 1-D weight\); a region LoRA applies to linear and "
                                         r"convolution layers"):
        env.pack("nodes.glue.regional").install_regions(model, regions)
