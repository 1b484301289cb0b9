"""Issue 2 §4 on the full-size SD1.5 layout: every LoRA key maps, every patched weight is W0 + s·up@down."""
import os

import comfy.model_management
import pytest
import torch
from synthetic import make_edlora_state
from weights import effective_weight


@pytest.mark.parametrize("spelling", ["main", "research"])
def test_every_key_maps_and_patched_weights_are_exact(env, sd15, spelling):
    model, clip = sd15
    edlora_mod = env.pack("fusion.files.edlora")
    lora_patch = env.pack("nodes.glue.lora_patch")
    state = make_edlora_state(("<p1>", "<p2>"), seed=7, spelling=spelling)
    flat_keys = len(state["params"]["unet"]) + len(state["params"]["text_encoder"])
    edlora = edlora_mod.parse_edlora(state, f"full_{spelling}.pth")
    assert 2 * (len(edlora.unet) + len(edlora.text["clip_l"])) == flat_keys
    unet = lora_patch.unet_patches(edlora, model)
    text = lora_patch.clip_patches(edlora, clip)
    assert len(unet) == len(edlora.unet) == 192  # 16 blocks x 12 modules, zero unmapped
    assert len(text) == len(edlora.text["clip_l"]) == 72  # 12 layers x 6 linears

    s_unet, s_text = 0.7, 0.4
    patched = model.clone()
    patched.add_patches(unet, s_unet)
    w0 = {k: v[0][0].float().clone() for k, v in model.get_key_patches().items() if k in unet}
    comfy.model_management.load_models_gpu([patched])  # what sampling does
    try:
        for module, (up, down) in edlora.unet.items():
            key = lora_patch.model_key_map(model)[lora_patch.unet_lora_name(module)]
            expected = w0[key] + s_unet * (up.flatten(1) @ down.flatten(1)).reshape(w0[key].shape)
            got = effective_weight(patched.model.get_submodule(key[: -len(".weight")]))
            torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)
    finally:
        comfy.model_management.unload_all_models()

    clip_p = clip.clone()
    clip_p.add_patches(text, s_text)
    keymap = lora_patch.clip_key_map(clip)
    w0 = {k: v[0][0].float().clone() for k, v in clip.get_key_patches().items() if k in text}
    clip_p.load_model()  # what encoding does
    try:
        for module, (up, down) in edlora.text["clip_l"].items():
            key = keymap[lora_patch.text_lora_name(module, edlora.family.text_encoders[0])]
            expected = w0[key] + s_text * up @ down
            got = effective_weight(clip_p.cond_stage_model.get_submodule(key[: -len(".weight")]))
            torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)
    finally:
        comfy.model_management.unload_all_models()
    # the base weights are back (nothing of the input was changed for good)
    for key, ((w, _conv), *_) in list(model.get_key_patches().items())[:5]:
        assert torch.equal(model.model.get_parameter(key), w)


def test_textual_inversion_embeddings_and_concepts_together(env, sd15):
    """``embedding:`` files keep working next to concept tokens (positions shift correctly)."""
    import folder_paths
    from safetensors.torch import save_file

    _, clip = sd15
    folder = folder_paths.get_folder_paths("embeddings")[0]
    os.makedirs(folder, exist_ok=True)
    ti = torch.randn(2, 768, generator=torch.Generator().manual_seed(1)) * 0.02
    save_file({"emb_params": ti}, os.path.join(folder, "mos_ti.safetensors"))
    concepts = env.pack("fusion.prompts.concepts").ConceptSet().add(env.pack("fusion.prompts.concepts").Concept(
        env.pack("fusion.files.edlora").parse_edlora(make_edlora_state(("<q1>",), seed=9, text_lora=False,
                                                                 unet_lora=False), "q.pth"), 0.0, 0.0))
    cond = env.pack("nodes.glue.layerwise").encode_with_concepts(clip, "a embedding:mos_ti <q1> dog", concepts)
    stack = env.pack("nodes.glue.layerwise").layerwise_of(cond[0])[0]
    tok = clip.tokenizer.clip_l.tokenizer
    table = concepts.tables["<q1>"][:, 0]
    for layer in (0, 9):
        seq = [(49406, 1.0), (tok("a")["input_ids"][1], 1.0), (ti[0], 1.0), (ti[1], 1.0), (table[layer], 1.0),
               (tok("dog")["input_ids"][1], 1.0), (49407, 1.0)]
        hand = clip.encode_from_tokens({"l": [seq + [(49407, 1.0)] * (77 - len(seq))]})
        torch.testing.assert_close(stack[layer], hand[0], atol=1e-4, rtol=1e-4)
