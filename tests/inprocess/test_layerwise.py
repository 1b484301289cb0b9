"""Issue 2, §4: layer-wise conditioning is right, checked against a plain implementation of docs/design.md §4.1."""
import comfy.sample
import comfy.sd
import pack_nodes as pn
import pytest
import torch

import nodes as comfy_nodes

# Written out here on purpose (not imported from the pack): ComfyUI's block of each of the 16
# cross-attention layers, in the UNet's run order (docs/design.md §1.2).
BLOCKS = [("input", 1), ("input", 2), ("input", 4), ("input", 5), ("input", 7), ("input", 8), ("middle", 0)] + \
         [("output", i) for i in range(3, 12)]
PREFIXES = [f"input_blocks.{n}.1" for n in (1, 2, 4, 5, 7, 8)] + ["middle_block.1"] + \
           [f"output_blocks.{n}.1" for n in range(3, 12)]


def load(env, tiny, name, te=1.0, unet=1.0, concepts=None):
    model, clip, _ = tiny
    return pn.load_edlora(model, clip, name, te, unet, concepts)


def hand_tokens(clip, before: str, table_rows: list, after: str):
    """Token list built by hand: start, words, one embedding per concept-token row, words, end, pad."""
    tok = clip.tokenizer.clip_l.tokenizer
    ids = tok(before)["input_ids"][1:-1] + [None] * len(table_rows) + tok(after)["input_ids"][1:-1]
    rows = iter(table_rows)
    seq = [(49406, 1.0)] + [(next(rows) if i is None else i, 1.0) for i in ids] + [(49407, 1.0)]
    return {"l": [seq + [(49407, 1.0)] * (77 - len(seq))]}


def hand_contexts(clip, state_tables, tokens, before, after):
    out = []
    for layer in range(16):
        rows = [state_tables[t][layer] for t in tokens]
        out.append(clip.encode_from_tokens(hand_tokens(clip, before, rows, after)))
    return torch.cat(out)  # [16, 77, 768]


def sample(model, pos, neg, steps=2, seed=3, size=64, cfg=5.0):
    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, latent, disable_pbar=True,
                               seed=seed)


def test_encode_matches_hand_encoding_and_each_layer_gets_its_context(env, tiny, write_edlora):
    name = write_edlora("lw_a.pth", tokens=("<a1>", "<a2>"), seed=11)
    model, clip, concepts = load(env, tiny, name)
    cond = pn.text_encode(clip, concepts, "a photo of <a1> <a2> dog")
    stack = env.pack("nodes.glue.layerwise").layerwise_of(cond[0])
    assert stack.shape == (1, 16, 77, 768)
    tables = {t: v[:, 0] for t, v in concepts.tables.items()}
    expected = hand_contexts(clip, tables, ["<a1>", "<a2>"], "a photo of", "dog")
    torch.testing.assert_close(stack[0], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected[0], expected[15])  # layers really differ
    torch.testing.assert_close(cond[0][0][0], expected[0])

    # record what every attn2 sees (its to_k input) during a real sampling step
    seen = {}
    hooks = []
    unet = model.model.diffusion_model
    for layer, prefix in enumerate(PREFIXES):
        mod = unet.get_submodule(prefix + ".transformer_blocks.0.attn2.to_k")
        hooks.append(mod.register_forward_pre_hook(lambda m, a, layer=layer: seen.setdefault(layer, a[0].clone())))
    try:
        neg = comfy_nodes.CLIPTextEncode().encode(clip, "blurry")[0]
        sample(model, cond, neg, steps=1)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(seen) == list(range(16))
    neg_ctx = neg[0][0][0]
    for layer in range(16):
        rows = seen[layer].float()
        # one batched call: one row is the positive's layer context, the other the negative's context
        matches = [torch.allclose(r, expected[layer], atol=1e-5) for r in rows]
        assert sum(matches) == 1, f"layer {layer} did not get its own context"
        other = rows[[not m for m in matches]][0]
        torch.testing.assert_close(other, neg_ctx, atol=1e-5, rtol=1e-5)


def test_noise_prediction_matches_plain_implementation(env, tiny, write_edlora):
    """Pack path vs: stock LoRA mechanism with hand-written key names + a hand attn2 patch."""
    name = write_edlora("lw_b.pth", tokens=("<b1>",), seed=12)
    model0, clip0, _ = tiny
    model, clip, concepts = load(env, tiny, name, te=0.8, unet=0.6)
    text = "portrait of <b1> in a garden"
    pos = pn.text_encode(clip, concepts, text)
    neg = comfy_nodes.CLIPTextEncode().encode(clip, "ugly")[0]
    ours = sample(model, pos, neg)

    state = torch.load(env.base / "models" / "edloras" / name, weights_only=True)["params"]
    lora = {}
    for module_name, tensor in state["unet"].items():
        module, which = module_name.rsplit(".lora_", 1)
        lora[f"lora_unet_{module.replace('.', '_')}.lora_{which}"] = tensor
    ref_model, _ = comfy.sd.load_lora_for_models(model0, None, lora, 0.6, 0)
    text_lora = {f"text_encoder.{k}": v for k, v in state["text_encoder"].items()}
    _, ref_clip = comfy.sd.load_lora_for_models(None, clip0, text_lora, 0, 0.8)
    table = state["new_concept_embedding"]["<b1>"]
    contexts = hand_contexts(ref_clip, {"<b1>": table}, ["<b1>"], "portrait of", "in a garden")

    def hand_patch(n, context, value, extra):
        layer = BLOCKS.index(tuple(extra["block"]))
        ctx = context.clone()
        b0 = n.shape[0] // len(extra["cond_or_uncond"])
        for i, cu in enumerate(extra["cond_or_uncond"]):
            if cu == 0:
                ctx[i * b0:(i + 1) * b0] = contexts[layer]
        return n, ctx, ctx

    ref_model = ref_model.clone()
    ref_model.set_model_attn2_patch(hand_patch)
    ref_neg = comfy_nodes.CLIPTextEncode().encode(ref_clip, "ugly")[0]
    ref = sample(ref_model, [[contexts[0:1], {}]], ref_neg)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    plain = sample(model, comfy_nodes.CLIPTextEncode().encode(clip, "portrait of sks in a garden")[0], neg)
    assert (plain - ours).abs().max() > 1e-3  # the layer-wise contexts really act


def test_strength_zero_means_embeddings_only(env, tiny, write_edlora):
    name = write_edlora("lw_c.pth", tokens=("<z1>",), seed=13)
    model0, clip0, _ = tiny
    model, clip, concepts = load(env, tiny, name, te=0.0, unet=0.0)
    assert model.patches == model0.patches and clip.patcher.patches == clip0.patcher.patches
    enc = pn.text_encode
    table = {"<z1>": concepts.tables["<z1>"][:, 0]}
    stack = env.pack("nodes.glue.layerwise").layerwise_of(enc(clip, concepts, "a <z1>")[0])
    torch.testing.assert_close(stack[0], hand_contexts(clip0, table, ["<z1>"], "a", ""), atol=1e-5, rtol=1e-5)


def test_prompt_without_concepts_is_the_stock_encoding(env, tiny, write_edlora):
    name = write_edlora("lw_d.pth", tokens=("<d1>",), seed=14)
    model, clip, concepts = load(env, tiny, name)
    text = "a (red:1.3) house, " + "very " * 90 + "detailed"
    ours = pn.text_encode(clip, concepts, text)
    stock = comfy_nodes.CLIPTextEncode().encode(clip, text)[0]
    assert "model_conds" not in ours[0][1]
    assert torch.equal(ours[0][0], stock[0][0]) and ours[0][0].shape[1] == 154
    neg = comfy_nodes.CLIPTextEncode().encode(clip, "x")[0]
    assert torch.equal(sample(model, ours, neg), sample(model, stock, neg))


def test_weights_long_prompts_and_several_concepts(env, tiny, write_edlora):
    a = write_edlora("lw_e1.pth", tokens=("<e1>", "<e2>"), seed=15)
    b = write_edlora("lw_e2.pth", tokens=("<f1>",), seed=16)
    model, clip, concepts = load(env, tiny, a)
    model, clip, concepts = pn.load_edlora(model, clip, b, 1.0, 1.0, concepts)
    enc = pn.text_encode
    layerwise_of = env.pack("nodes.glue.layerwise").layerwise_of
    text = "(<e1> <e2>:1.2) and <f1>, " + "tall " * 80 + "end <f1>"
    stack = layerwise_of(enc(clip, concepts, text)[0])
    assert stack.shape == (1, 16, 154, 768)
    unweighted = layerwise_of(enc(clip, concepts, text.replace("(<e1> <e2>:1.2)", "<e1> <e2>"))[0])
    assert not torch.allclose(stack, unweighted)
    neg = comfy_nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    out = sample(model, enc(clip, concepts, text), neg)
    assert torch.isfinite(out).all()


def test_pure_module_map_agrees_with_comfyui(tiny):
    """The SD1.5 profile's diffusers -> ldm names (pure) vs ComfyUI's own unet_to_diffusers, every LoRA module."""
    import comfy.utils

    from fusion.families import SD15
    diffusers_unet_to_ldm = SD15.ldm_unet_module
    from synthetic import unet_module_shapes

    model, _, _ = tiny
    comfy_map = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    for module in unet_module_shapes(32):
        assert comfy_map[module + ".weight"] == diffusers_unet_to_ldm(module) + ".weight", module


def test_prompt_length_is_bounded(env, tiny, write_edlora):
    """A 100,000-character concept prompt is refused at once; one over 32 x 77 tokens too (it would be encoded
    16 times). The messages name the node and input, and say how long the prompt may be."""
    name = write_edlora("lw_long.pth", tokens=("<lg1>",), seed=17)
    _, clip, concepts = load(env, tiny, name)
    with pytest.raises(ValueError, match=r"^Text Encode with Concepts, input 'text': this prompt holds concept tokens "
                                         r"and is 100,000 characters long; a prompt with concept tokens may be at "
                                         r"most 20,000 characters and 32 × 77 tokens"):
        pn.text_encode(clip, concepts, "<lg1> " + "x" * 99994)
    with pytest.raises(ValueError, match=r"^Text Encode with Concepts, input 'text': this prompt holds concept tokens "
                                         r"and is 33 × 77 tokens long; a prompt with concept tokens may be at most "
                                         r"20,000 characters and 32 × 77 tokens"):
        pn.text_encode(clip, concepts, "<lg1> " + "tall " * (33 * 75 - 2))
    assert pn.text_encode(clip, concepts, "<lg1> " + "tall " * 200)[0][0].layers.shape[2] == 3 * 77


def test_a_long_prompt_without_concept_tokens_is_the_stock_encoders(env, tiny, write_edlora):
    """The README's promise: without concept tokens the output is exactly the stock node's — at any length (the
    caps are for prompts with concept tokens, which are encoded once per layer); 25,000 characters are past both
    (the hostile run's 10,000 were past the token cap)."""
    import nodes as comfy_nodes

    name = write_edlora("lw_free.pth", tokens=("<fr1>",), seed=18)
    _, clip, concepts = load(env, tiny, name)
    text = ("a tall tree by a quiet lake, " * 1000)[:25_000]
    ours = pn.text_encode(clip, concepts, text)
    stock = comfy_nodes.CLIPTextEncode().encode(clip, text)[0]
    assert ours[0][0].shape[1] > 32 * 77
    assert torch.equal(ours[0][0], stock[0][0])
    assert torch.equal(ours[0][1]["pooled_output"], stock[0][1]["pooled_output"])
