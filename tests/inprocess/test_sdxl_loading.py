"""Issue 19: SDXL ED-LoRAs and SDXL LoRAs onto the tiny SDXL (ComfyUI's own SDXL classes), through ComfyUI's key
maps, checked against the stock LoRA loader; and every family mismatch refused before anything is patched, naming
the file and both families."""
import comfy.lora
import comfy.sd
import pack_nodes as pn
import pytest
import torch
from comfy_env import node
from lora_files import lora_factors, write_diffusers_lora, write_kohya_lora

import nodes as comfy_nodes
from fusion.families import SDXL


def test_an_sdxl_edlora_patches_the_unet_and_both_text_encoders_as_the_stock_loader(env, tiny_xl, write_xl_edlora):
    name = write_xl_edlora("xl_load.pth", tokens=("<xa1>", "<xa2>"), seed=1)
    model, clip, _ = tiny_xl
    before = (dict(model.patches), dict(clip.patcher.patches))
    m, c, concepts = pn.load_edlora(model, clip, name, 0.6, 0.8)
    assert (dict(model.patches), dict(clip.patcher.patches)) == before  # the inputs are untouched
    edlora = concepts.concepts[0].edlora
    assert edlora.family.name == "sdxl" and edlora.tokens == ["<xa1>", "<xa2>"]
    assert concepts.tables_of("clip_g")["<xa1>"].shape == (70, 1, 1280)
    # the same factors, renamed by hand to kohya's SDXL keys, through the stock loader
    state = torch.load(env.base / "models" / "edloras" / name, weights_only=True)["params"]
    lora = {}
    for part, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        for key, tensor in state[part].items():
            module, which = key.rsplit(".lora_", 1)
            lora[f"{prefix}{module.replace('.', '_')}.lora_{which}"] = tensor
    ref_m, ref_c = comfy.sd.load_lora_for_models(model, clip, lora, 0.8, 0.6)  # (UNet, text)
    assert set(m.patches) == set(ref_m.patches) and len(m.patches) == 70 * 10 + 11 * 2
    assert set(c.patcher.patches) == set(ref_c.patcher.patches)
    assert sum(k.startswith("clip_g.") for k in c.patcher.patches) == 3 * 6
    for ours, ref in ((m, ref_m), (c.patcher, ref_c.patcher)):
        for key in list(ref.patches)[::37]:
            (s1, a1, *_), (s2, a2, *_) = ours.patches[key][-1], ref.patches[key][-1]
            assert s1 == s2 and torch.equal(a1.weights[0], a2.weights[0]) and torch.equal(a1.weights[1], a2.weights[1])


@pytest.fixture(scope="module")
def xl_loras(env):
    folder = env.base / "models" / "loras"
    factors = lora_factors(70, family=SDXL, model_channels=64, text_layers=3, text_intermediate=128, scale=0.6)
    write_kohya_lora(folder / "xl_kohya.safetensors", factors)
    write_diffusers_lora(folder / "xl_diffusers.safetensors", factors)
    write_kohya_lora(folder / "sd15_kohya.safetensors", lora_factors(71, model_channels=64, text_layers=3,
                                                                       text_intermediate=128))
    return factors


@pytest.mark.parametrize("name", ["xl_kohya.safetensors", "xl_diffusers.safetensors"])
def test_sdxl_loras_load_as_concepts_like_the_stock_load_lora(env, tiny_xl, xl_loras, name):
    model, clip, _ = tiny_xl
    m, c, concepts = node("MixOfShowLoRAConcept", model=model, clip=clip, lora_name=name,
                          trigger_words="ohwx girl", strength_model=0.9, strength_clip=0.7)
    ref_m, ref_c = comfy_nodes.LoraLoader().load_lora(model, clip, name, 0.9, 0.7)
    assert set(m.patches) == set(ref_m.patches) and set(c.patcher.patches) == set(ref_c.patcher.patches)
    assert {k.split(".")[0] for k in c.patcher.patches} == {"clip_l", "clip_g"}
    concept = concepts.concepts[0]
    assert concept.edlora.family.name == "sdxl" and len(concept.unet_factors) == len(m.patches)


def _message(call, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        call(*args, **kwargs)
    return str(info.value)


def _assert_names(msg, *pieces):
    for piece in pieces:
        assert piece in msg, (piece, msg)


def test_family_mismatches_are_refused_naming_the_file_and_both_families(env, tiny, tiny_xl, write_edlora,
                                                                        write_xl_edlora, xl_loras):
    sd15_name = write_edlora("mm_sd15.pth", tokens=("<m15>",), seed=2)
    xl_name = write_xl_edlora("mm_xl.pth", tokens=("<mxl>",), seed=3)
    model15, clip15, _ = tiny
    model_xl, clip_xl, _ = tiny_xl
    sd15_model = "SD1.x-type (16 cross-attention layers, 768-wide)"
    xl_model = "SDXL-type (70 cross-attention layers, 2048-wide)"
    # an SD1.5 file on SDXL and the reverse
    _assert_names(_message(lambda: pn.load_edlora(model_xl, clip_xl, sd15_name)), "mm_sd15.pth: made for SD1.x",
                  f"the connected MODEL is {xl_model}")
    _assert_names(_message(lambda: pn.load_edlora(model15, clip15, xl_name)), "mm_xl.pth: made for SDXL",
                  f"the connected MODEL is {sd15_model}")
    # the MODEL is SDXL but the CLIP is SD1.5's
    _assert_names(_message(lambda: pn.load_edlora(model_xl, clip15, xl_name)), "mm_xl.pth: made for SDXL",
                  "the connected CLIP is SD1.x-type (clip_l 768 wide)")
    # the refiner, a distilled SDXL with fewer blocks, SD2.x: of no family the pack knows
    for kind, described in (("refiner", "44 cross-attention layers, context 1280"),
                            ("ssd1b", "34 cross-attention layers, context 2048"),
                            ("sd2", "16 cross-attention layers, context 1024")):
        other, other_clip, _ = env.tiny_xl.build_all(kind, 0)
        for name, family in ((xl_name, "SDXL"), (sd15_name, "SD1.x")):
            _assert_names(_message(pn.load_edlora, other, other_clip, name), f"{name}: made for {family}",
                          f"the connected MODEL is of no family this pack knows ({described})")
    # an SD2.x file (1024-wide tables) on SD1.5 and on SDXL
    sd2 = write_edlora("mm_sd2.pth", tokens=("<m2>",), seed=4, text_lora=False, unet_lora=False)
    state = torch.load(env.base / "models" / "edloras" / sd2, weights_only=True)
    state["params"]["new_concept_embedding"]["<m2>"] = torch.zeros(16, 1024)
    torch.save(state, env.base / "models" / "edloras" / sd2)
    for model, clip, described in ((model15, clip15, sd15_model), (model_xl, clip_xl, xl_model)):
        _assert_names(_message(pn.load_edlora, model, clip, sd2), "mm_sd2.pth: ", "SD1.x ED-LoRA token table",
                      "SD2.x", f"the connected MODEL is {described}")
    # inconsistent tables: 70-row CLIP-L tables with an SD1.x cross-attention LoRA
    def sd15_kv(s):
        s["params"]["unet"] = {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_down.weight":
                               torch.zeros(4, 768), "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
                               ".lora_up.weight": torch.zeros(128, 4)}
    mixed = write_xl_edlora("mm_mixed.pth", tokens=("<mix>",), seed=5, state=sd15_kv)
    _assert_names(_message(lambda: pn.load_edlora(model_xl, clip_xl, mixed)), "mm_mixed.pth: inconsistent ED-LoRA",
                  "(SD1.x)", "(SDXL)", f"the connected MODEL is {xl_model}")
    # a plain SD1.5 LoRA on SDXL, and an SDXL LoRA on SD1.5
    _assert_names(_message(lambda: node("MixOfShowLoRAConcept", model=model_xl, clip=clip_xl,
                                        lora_name="sd15_kohya.safetensors", trigger_words="x", strength_model=1.0,
                                        strength_clip=1.0)),
                  "sd15_kohya.safetensors: its LoRA on", "a LoRA for another base model",
                  f"the connected MODEL is {xl_model}")
    msg = _message(lambda: node("MixOfShowLoRAConcept", model=model15, clip=clip15, lora_name="xl_kohya.safetensors",
                                trigger_words="x", strength_model=1.0, strength_clip=1.0))
    _assert_names(msg, "xl_kohya.safetensors: ", "another base model", "SD1.x")
    # concepts of two families in one set
    _, _, xl_set = pn.load_edlora(model_xl, clip_xl, xl_name)
    _assert_names(_message(lambda: pn.load_edlora(model15, clip15, sd15_name, concepts=xl_set)),
                  "'mm_sd15.pth' is an SD1.x concept but the concept set holds 'mm_xl.pth', an SDXL one")


def test_a_concept_encoded_with_a_clip_of_another_family_is_refused(env, tiny, tiny_xl, write_edlora):
    name = write_edlora("mm_enc15.pth", tokens=("<me15>",), seed=7)
    model15, clip15, _ = tiny
    _, _, concepts = pn.load_edlora(model15, clip15, name)
    _assert_names(_message(pn.text_encode, tiny_xl[1], concepts, "a photo of <me15>"),
                  "<me15> (mm_enc15.pth) is an SD1.x concept; this CLIP is SDXL")
