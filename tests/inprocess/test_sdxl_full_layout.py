"""Issue 19: the full-size SDXL layout — key names and shapes — where detection, key maps and LoRA keys are at stake,
without loading weights: the checkpoint layout tools/host/make_sdxl_random.py writes (ComfyUI's own SDXL classes on
the meta device) is what the stock loader detects as SDXL and the pack as its SDXL family; full-size Concept
Conductor ED-LoRAs and kohya/diffusers SDXL LoRAs map onto it through ComfyUI's key maps; the generated file, when it
is there, has exactly that layout (its header only)."""
from pathlib import Path

import comfy.lora
import comfy.model_detection
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import make_sdxl_random
import pytest
import torch
from lora_files import lora_factors, write_diffusers_lora, write_kohya_lora
from safetensors import safe_open
from synthetic import FULL_SDXL_TEXT, make_edlora_state

from fusion.families import SDXL

CHECKPOINT = Path(__file__).resolve().parents[2] / ".host" / "models" / "sdxl_random_fp16.safetensors"
UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def full(env):
    """(layout, the stock loader's model config, a MODEL and a CLIP with full-size SDXL shapes on the meta device)."""
    layout = make_sdxl_random.layout()
    config = comfy.model_detection.model_config_from_unet(layout, UNET)
    with torch.device("meta"):
        base = config.get_model(layout, UNET, device="meta")
        clip = comfy.sd.CLIP(no_init=True)
        clip.cond_stage_model = config.clip_target(layout).clip(device="meta", dtype=torch.float16)
    model = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    return layout, config, model, clip


def test_the_checkpoint_layout_is_sdxl_for_comfyui_and_the_pack(env, full):
    layout, config, model, clip = full
    assert type(config) is comfy.supported_models.SDXL  # not the refiner, SSD-1B, Vega, ...
    family = env.pack("nodes.glue.family")
    assert family.unet_shape(model) == (2048, 70) and family.family_of_model(model).name == "sdxl"
    assert family.clip_encoders(clip) == {"clip_l": 768, "clip_g": 1280} and family.family_of_clip(clip).name == "sdxl"
    # every CLIP weight of the file lands in ComfyUI's SDXL CLIP (what a real SDXL checkpoint also lacks aside)
    clip_sd = config.process_clip_state_dict(dict(layout))  # it renames keys in place: the fixture is shared
    own = clip.cond_stage_model.state_dict()
    assert set(own) - set(clip_sd) <= {"clip_l.transformer.text_projection.weight", "clip_l.logit_scale"}
    assert all(tuple(clip_sd[k].shape) == tuple(own[k].shape) for k in own if k in clip_sd)
    # the profile's 70 layers are the UNet's attn2 modules, in run order, with their widths
    unet = model.model.diffusion_model
    attn2 = [n for n, _ in unet.named_modules() if n.endswith(".attn2")]
    paths = [f"{t.ldm}.transformer_blocks.{j}.attn2" for t in SDXL.transformers for j in range(t.depth)]
    assert sorted(paths) == sorted(attn2) and len(paths) == 70
    for t in SDXL.transformers:
        to_q = unet.get_submodule(f"{t.ldm}.transformer_blocks.0.attn2.to_q").weight
        to_k = unet.get_submodule(f"{t.ldm}.transformer_blocks.0.attn2.to_k").weight
        assert to_q.shape[0] == SDXL.model_channels * t.channel_mult and to_k.shape[1] == SDXL.context_dim
    # diffusers <-> ldm: the profile's renaming agrees with ComfyUI's unet_to_diffusers on every transformer module
    comfy_map = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    inside = {k: v for k, v in comfy_map.items() if ".attentions." in k}
    assert len(inside) > 1400 and all(SDXL.ldm_unet_module(k[:-len(".weight")]) + ".weight" == v
                                      for k, v in inside.items() if k.endswith(".weight"))


def test_a_full_size_concept_conductor_edlora_maps_onto_every_weight(env, full):
    _, _, model, clip = full
    state = make_edlora_state(("<c_1>", "<c_2>"), seed=7, family=SDXL, model_channels=320, whole_block=False,
                              text_sizes=FULL_SDXL_TEXT)
    edlora = env.pack("fusion.files.edlora").parse_edlora(state, "mitsuha_full.pth")
    lora_patch = env.pack("nodes.glue.lora_patch")
    unet, text = lora_patch.unet_patches(edlora, model), lora_patch.clip_patches(edlora, clip)
    assert len(unet) == 560 and len(text) == 48 + 128
    assert "diffusion_model.output_blocks.5.1.transformer_blocks.1.attn2.to_k.weight" in unet
    assert "diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_out.0.weight" in unet
    assert "clip_g.transformer.text_model.encoder.layers.31.self_attn.out_proj.weight" in text
    assert sum(k.startswith("clip_l.") for k in text) == 48


def test_full_size_sdxl_loras_load_and_an_sd15_lora_is_refused(env, full):
    _, _, model, clip = full
    folder = env.base / "models" / "loras"
    factors = lora_factors(90, family=SDXL, model_channels=320, text_sizes=FULL_SDXL_TEXT, attention_only=True,
                           rank=2)
    write_kohya_lora(folder / "full_xl_kohya.safetensors", factors)
    write_diffusers_lora(folder / "full_xl_diffusers.safetensors", factors)
    load = env.pack("nodes.glue.lora_patch").load_plain_lora
    for name in ("full_xl_kohya.safetensors", "full_xl_diffusers.safetensors"):
        unet, text, unused = load(str(folder / name), model, clip)
        assert (len(unet), len(text), unused) == (560, 48 + 128, []), name
    write_kohya_lora(folder / "full_sd15.safetensors", lora_factors(91, model_channels=320, text_layers=12,
                                                                    text_intermediate=3072, attention_only=True))
    with pytest.raises(ValueError, match=r"full_sd15\.safetensors: its LoRA on diffusion_model\..* a LoRA for another "
                                         r"base model"):
        load(str(folder / "full_sd15.safetensors"), model, clip)


@pytest.mark.skipif(not CHECKPOINT.is_file(), reason="no full-size random SDXL (bash tools/host/make_models.sh --sdxl)")
def test_the_generated_checkpoint_has_that_layout(full):
    layout = full[0]
    with safe_open(str(CHECKPOINT), "pt") as f:  # the header only: no weight is read
        keys = set(f.keys())
        assert keys == set(layout)
        for key in list(layout)[::50] + [k for k in layout if "position_ids" in k]:
            sliced = f.get_slice(key)
            assert (tuple(sliced.get_shape()), sliced.get_dtype()) == (tuple(layout[key].shape), {
                torch.float16: "F16", torch.int64: "I64"}[layout[key].dtype]), key


def test_a_fused_sdxl_bundle_has_kohya_sdxl_names_the_stock_loader_maps_on_the_full_layout(env, full):
    """Issue 20: on the full-size layout (meta tensors), a fused bundle of every fusable weight -- each UNet
    transformer-block linear and proj_in/out, each linear of both text encoders' 32 + 12 layers -- names its modules
    as kohya's SDXL LoRAs do (``lora_unet_<ldm path>``, ``lora_te1_`` CLIP-L, ``lora_te2_`` bigG), and the stock
    loader's key map (comfy.lora.load_lora) puts every module back on its weight at its shape."""
    import re

    from fusion.prompts.concepts import ConceptSet

    _, _, model, clip = full
    unet_linear = re.compile(r"^diffusion_model\..*\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.to_(q|k|v|"
                             r"out\.0)|ff\.net\.(0\.proj|2)))\.weight$")
    text_linear = re.compile(r"^clip_[lg]\.transformer\.text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj"
                             r"|mlp\.fc[12])\.weight$")

    def deltas(root, pattern):
        return {k: (torch.empty(v.shape[0], 4, device="meta"), torch.empty(4, *v.shape[1:], device="meta"))
                for k, v in root.state_dict().items() if pattern.match(k)}

    model_deltas, clip_deltas = deltas(model.model, unet_linear), deltas(clip.cond_stage_model, text_linear)
    assert len(model_deltas) == 70 * 10 + 2 * 11 and len(clip_deltas) == (12 + 32) * 6
    bundle = env.pack("nodes.glue.fused_patches").bundle_of(model_deltas, clip_deltas, model, clip,
                                                            {"concepts": []}, ConceptSet())
    expected = {"lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_"): k for k in model_deltas}
    for k in clip_deltas:
        encoder, _, rest = k.partition(".transformer.")
        expected[("lora_te1_" if encoder == "clip_l" else "lora_te2_") + rest[:-len(".weight")].replace(".", "_")] = k
    assert set(bundle.lora) == set(expected)
    lora = {}
    for name, (up, down) in bundle.lora.items():
        lora.update({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                     f"{name}.alpha": torch.tensor(float(down.shape[0]))})
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    patches = comfy.lora.load_lora(lora, key_map)
    assert {k: v.weights[0].shape[0] for k, v in patches.items()} == \
        {k: v[0].shape[0] for k, v in {**model_deltas, **clip_deltas}.items()}
    shapes = {**{k: v.shape for k, v in model.model.state_dict().items()},
              **{k: v.shape for k, v in clip.cond_stage_model.state_dict().items()}}
    for key, patch in patches.items():
        up, down = patch.weights[0], patch.weights[1]
        assert (up.shape[0], down.flatten(1).shape[1]) == (shapes[key][0], shapes[key][1:].numel()), key
