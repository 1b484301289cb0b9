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


# ------------------------------------------------------------------------------ masks of different sizes

H, W = 64, 128  # pixels of the sampled image; latent 8 x 16


def sample(model, positive, negative, seed=5):
    import comfy.sample

    latent = torch.zeros(1, 4, H // 8, W // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, 2, 5.0, "euler", "normal", positive, negative, latent,
                               disable_pbar=True, seed=seed)


def half_mask(size: int, side: str) -> torch.Tensor:
    """A painted ``size x size`` MASK covering the left or right half (grid-aligned at every layer)."""
    mask = torch.zeros(1, size, size)
    if side == "left":
        mask[:, :, : size // 2] = 1.0
    else:
        mask[:, :, size // 2:] = 1.0
    return mask


def test_regions_whose_masks_have_different_sizes_sample_in_one_sampler(env, tiny):
    """The README promises a MASK of any size: each region's mask is resized to every layer as a single mask would
    be. A 512 x 512 and a 1024 x 1024 half (a pose-sized mask) give the layers exactly what two 512 x 512 halves
    give, so the latents are the same bits."""
    import pack_nodes as pn

    import nodes as comfy_nodes

    model, clip, _ = tiny
    encode = comfy_nodes.CLIPTextEncode().encode
    pos, neg = encode(clip, "two friends")[0], encode(clip, "blurry")[0]
    a, b = encode(clip, "a red coat")[0], encode(clip, "a green hat")[0]
    regional = env.pack("nodes.glue.regional")
    mixed = pn.region(b, neg, half_mask(1024, "right"), pn.region(a, neg, half_mask(512, "left")))
    same = pn.region(b, neg, half_mask(512, "right"), pn.region(a, neg, half_mask(512, "left")))
    got = sample(regional.install_regions(model, mixed), pos, neg)
    assert torch.isfinite(got).all()
    assert torch.equal(got, sample(regional.install_regions(model, same), pos, neg))


def test_each_region_mask_is_resized_as_it_would_be_alone(env, tiny):
    """A 7 x 13 painted mask, a 64 x 64 one and a box mask of the image's size, at every layer size of the image:
    each region's row is what that region alone gets."""
    import pack_nodes as pn

    import nodes as comfy_nodes

    _, clip, _ = tiny
    encode = comfy_nodes.CLIPTextEncode().encode
    pos, neg = encode(clip, "a cat")[0], encode(clip, "blurry")[0]
    odd = torch.rand(1, 7, 13)
    square = torch.zeros(1, 64, 64)
    square[:, 10:50, 5:40] = 1.0
    boxed = pn.box_mask(W, H, 8, 16, 56, 100)
    regions = pn.region(pos, neg, boxed, pn.region(pos, neg, square, pn.region(pos, neg, odd)))
    run = env.pack("nodes.glue.regional").RegionalSampling(regions)
    for fh, fw in ((8, 16), (4, 8), (2, 4), (1, 2)):
        together = run.flat_masks(fh, fw, "cpu")
        assert together.shape == (3, fh * fw)
        for r, region in enumerate(regions):
            alone = env.pack("nodes.glue.regional").RegionalSampling((region,)).flat_masks(fh, fw, "cpu")
            assert torch.equal(together[r], alone[0]), (r, fh, fw)


# ------------------------------------------------------------------------------ save paths

@pytest.mark.parametrize("prefix, why", [("fused\x00bundle", "a NUL or control character is in it"),
                                         ("f" * 300, "it is 300 bytes long; at most 200"),
                                         ("..", "it names no file"),
                                         ("bad\ud800", "it holds a lone surrogate")])
def test_save_paths_no_file_system_takes_are_refused_naming_the_input(env, tiny, write_edlora, prefix, why):
    """Refused before anything is written (was safetensors' 'I/O error: Invalid argument (os error 22)' or 'File
    name too long (os error 36)', naming neither node nor input)."""
    model, clip, _ = tiny
    folder = env.base / "models" / "edloras"
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(ValueError, match=rf"^Save Fused ED-LoRA Bundle, input 'filename_prefix': .* is not a usable "
                                         rf"file name \({why}"):
        node("MixOfShowSaveFusedBundle", model=model, clip=clip, concepts=None, filename_prefix=prefix)
    source = write_edlora("to_convert.pth", tokens=("<cv1>",), seed=71)
    with pytest.raises(ValueError, match=rf"^Convert ED-LoRA to safetensors, input 'output_name': .* is not a "
                                         rf"usable file name \({why}"):
        node("MixOfShowConvertEDLoRA", edlora_name=source, output_name=prefix)
    assert sorted(p.name for p in folder.iterdir()) == sorted({*before, source})
