"""Issue 19: layer-wise (P+) conditioning on the tiny SDXL (ComfyUI's own SDXL classes, both text encoders at full
width), checked against brute-force encodes written here: one stock encode per layer, with that layer's CLIP-L rows
injected into the ``l`` stream and its bigG rows into the ``g`` stream; the pooled vector and ``y``; the stock SDXL
encoder for prompts without concept tokens; and what every attn2 call of the UNet receives."""
import comfy.patcher_extension
import comfy.sample
import pack_nodes as pn
import pytest
import torch
from comfy_env import node

import nodes as comfy_nodes

# Written out here on purpose (not imported from the pack): SDXL's 70 cross-attention layers in run order, as
# ComfyUI keys them (block name, block id, transformer block index).
LAYERS = [("input", i, j) for i in (4, 5) for j in range(2)] + [("input", i, j) for i in (7, 8) for j in range(10)] \
    + [("middle", 0, j) for j in range(10)] + [("output", i, j) for i in (0, 1, 2) for j in range(10)] \
    + [("output", i, j) for i in (3, 4, 5) for j in range(2)]
START, END = 49406, 49407


@pytest.fixture(scope="module")
def loaded(env, tiny_xl, write_xl_edlora):
    name = write_xl_edlora("xlw_a.pth", tokens=("<xw1>", "<xw2>"), seed=21)
    model, clip, _ = tiny_xl
    return pn.load_edlora(model, clip, name, 0.8, 0.7)


def rows(concepts, encoder, layer, tokens):
    tables = concepts.tables_of(encoder)
    return [tables[t][layer, 0] for t in tokens]


def hand_encode(clip, concepts, layer, before, tokens, after):
    """One stock encode of the prompt with this layer's rows injected: start, words, one row per concept token,
    words, end, padding (CLIP-L pads with the end token, bigG with 0)."""
    out = {}
    for key, encoder, pad in (("l", "clip_l", END), ("g", "clip_g", 0)):
        tok = getattr(clip.tokenizer, encoder).tokenizer
        seq = [START] + tok(before)["input_ids"][1:-1] + rows(concepts, encoder, layer, tokens) \
            + tok(after)["input_ids"][1:-1] + [END]
        out[key] = [[(t, 1.0) for t in seq] + [(pad, 1.0)] * (77 - len(seq))]
    cond, pooled = clip.encode_from_tokens(out, return_pooled=True)
    return cond[0], pooled


def test_seventy_layer_contexts_and_the_pooled_vector_equal_a_brute_force_encode(loaded):
    model, clip, concepts = loaded
    cond = pn.text_encode(clip, concepts, "a photo of <xw1> <xw2> dog")
    stack = cond[0][0].layers
    assert stack.shape == (1, 70, 77, 2048)
    expected, pooled = [], []
    for layer in range(70):
        c, p = hand_encode(clip, concepts, layer, "a photo of", ["<xw1>", "<xw2>"], "dog")
        expected.append(c)
        pooled.append(p)
    expected = torch.stack(expected)
    # both encoders (CLIP-L's 768 channels first, then bigG's 1280) and their concatenation
    torch.testing.assert_close(stack[0, ..., :768], expected[..., :768], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stack[0, ..., 768:], expected[..., 768:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stack[0], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected[0], expected[69])  # the layers really differ
    torch.testing.assert_close(cond[0][0][0], expected[0])  # the plain context is layer 0's
    # the pooled vector is copy 0's (bigG at its end token), which differs from other copies'
    torch.testing.assert_close(cond[0][1]["pooled_output"], pooled[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pooled[0], pooled[69])


def test_a_prompt_without_concept_tokens_is_the_stock_sdxl_encoding(loaded):
    _, clip, concepts = loaded
    text = "a (red:1.3) house, " + "very " * 90 + "detailed"
    ours = pn.text_encode(clip, concepts, text)
    stock = comfy_nodes.CLIPTextEncode().encode(clip, text)[0]
    assert torch.equal(ours[0][0], stock[0][0]) and ours[0][0].shape == (1, 154, 2048)
    assert torch.equal(ours[0][1]["pooled_output"], stock[0][1]["pooled_output"])
    assert {k for k in ours[0][1] if not k.startswith("mixofshow")} == set(stock[0][1])
    # with the size inputs: the stock CLIPTextEncodeSDXL (one text for both encoders)
    sizes = dict(width=832, height=1216, crop_w=8, crop_h=16, target_width=1024, target_height=1024)
    ours = node("MixOfShowTextEncode", clip=clip, concepts=concepts, text=text, **sizes)[0]
    stock = node("CLIPTextEncodeSDXL", clip=clip, text_g=text, text_l=text, **sizes)[0]
    assert torch.equal(ours[0][0], stock[0][0])
    assert {k: v for k, v in ours[0][1].items() if not k.startswith("mixofshow")}.keys() == stock[0][1].keys()
    for key, value in stock[0][1].items():
        assert torch.equal(ours[0][1][key], value) if torch.is_tensor(value) else ours[0][1][key] == value, key


def sample_recording(model, positive, negative, batch=1, cfg=5.0, hooks_on=None):
    """One Euler step; returns (latent, what reached the UNet: {"y": y, "to_k": {(block, id, j): context}})."""
    seen = {"to_k": {}}
    unet = model.model.diffusion_model

    def key_of(path):
        parts = path.split(".")
        if parts[0] == "middle_block":
            return ("middle", 0, int(parts[3]))
        return ("input" if parts[0] == "input_blocks" else "output", int(parts[1]), int(parts[4]))

    def recorder(path):
        def hook(_module, args):
            seen["to_k"].setdefault(key_of(path), args[0].clone())
        return hook

    def wrapper(executor, x, timesteps, context, y, *args, **kwargs):
        seen.setdefault("y", y.clone())
        return executor(x, timesteps, context, y, *args, **kwargs)

    paths = [n for n, _ in unet.named_modules() if n.endswith("attn2.to_k")]
    assert len(paths) == 70
    handles = [unet.get_submodule(p).register_forward_pre_hook(recorder(p)) for p in paths]
    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.y", wrapper)
    try:
        latent = torch.zeros(batch, 4, 8, 12)
        out = comfy.sample.sample(patched, comfy.sample.prepare_noise(latent, 3), 1, cfg, "euler", "normal",
                                  positive, negative, latent, disable_pbar=True, seed=3)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def test_every_attn2_call_receives_its_own_layer_context_and_y_is_as_specified(env, loaded):
    """Each of the 70 layers gets a distinct context (a hand-made stack); the input of every attn2.to_k, keyed by
    (block, id, block_index), is that layer's context for the positive rows (batch of 2) and the negative's for
    the others; y is the pooled vector of copy 0 with ComfyUI's size values."""
    model, clip, concepts = loaded
    layerwise = env.pack("fusion.prompts.layerwise_tensor").LayerwiseContext
    g = torch.Generator().manual_seed(5)
    contexts = torch.randn(1, 70, 77, 2048, generator=g)
    pooled = torch.randn(1, 1280, generator=g)
    positive = [[layerwise(contexts), {"pooled_output": pooled, "width": 640, "height": 448}]]
    negative = comfy_nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    _, seen = sample_recording(model, positive, negative, batch=2)
    assert sorted(seen["to_k"]) == sorted(LAYERS)
    neg = negative[0][0][0]
    for layer, key in enumerate(LAYERS):
        got = seen["to_k"][key].float()  # [4, 77, 2048]: two positive and two negative rows, in some order
        matches = [torch.allclose(r, contexts[0, layer], atol=1e-6) for r in got]
        assert sum(matches) == 2, f"{key} (layer {layer}) did not get its own context"
        for r in got[[not m for m in matches]]:
            torch.testing.assert_close(r, neg, atol=1e-6, rtol=1e-6)
    # y: the positive rows' from copy 0's pooled vector and (height, width, crop 0, 0, target = size)
    y = seen["y"]
    expected = model.model.encode_adm(pooled_output=pooled, width=640, height=448)
    stock_neg = model.model.encode_adm(pooled_output=negative[0][1]["pooled_output"], width=96, height=64)
    rows_pos = [torch.allclose(r, expected[0], atol=1e-6) for r in y]
    assert sum(rows_pos) == 2 and all(torch.allclose(r, stock_neg[0], atol=1e-6)
                                      for r, m in zip(y, rows_pos, strict=True) if not m)


def test_weights_long_prompts_embeddings_repeated_rows_and_the_shared_encodes(env, tiny_xl, write_xl_edlora):
    """A two-section weighted prompt with an SDXL textual inversion (embedding:, both encoders' vectors) and the
    concept in the second section, bigG rows equal in all layers: equal to brute force, and only the distinct
    sequences were encoded (71 CLIP-L sequences, not 140)."""
    from safetensors.torch import save_file

    def same_bigg_rows(state):
        table = state["params"]["new_concept_embedding_2"]
        for tok in table:
            table[tok] = table[tok][:1].expand(70, -1).clone()
    name = write_xl_edlora("xlw_b.pth", tokens=("<xb1>",), seed=22, state=same_bigg_rows)
    folder = env.base / "models" / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(23)
    save_file({"clip_l": torch.randn(2, 768, generator=g) * 0.02, "clip_g": torch.randn(2, 1280, generator=g) * 0.02},
              str(folder / "xlemb.safetensors"))
    model, _, _ = tiny_xl
    clip = env.tiny_xl.build_clip("narrow", 1, embedding_directory=str(folder))
    model, clip, concepts = pn.load_edlora(model, clip, name, 1.0, 1.0)
    text = "a embedding:xlemb " + "tall " * 80 + "(<xb1>:1.2) on a hill"
    calls = []
    encoder = clip.patcher.model.clip_l.transformer
    handle = encoder.register_forward_pre_hook(lambda _m, args, kwargs: calls.append(kwargs["embeds"].shape[0]),
                                               with_kwargs=True)
    try:
        stack = pn.text_encode(clip, concepts, text)[0][0].layers
    finally:
        handle.remove()
    assert stack.shape == (1, 70, 154, 2048)
    # 1 shared first section + 70 copies of the second, plus ComfyUI's one empty sequence for the weights
    assert sum(calls) == 71 + 2 and len(calls) == 2
    tokens = clip.tokenize(text.replace("<xb1>", " sks "))  # the pack's first placeholder word
    sks = clip.tokenizer.clip_l.tokenizer("sks")["input_ids"][1]
    placeholder = [[(s, j) for s, sec in enumerate(tokens[k]) for j, (t, _) in enumerate(sec)
                    if isinstance(t, int) and t == sks] for k in ("l", "g")]
    assert [len(p) for p in placeholder] == [1, 1] and placeholder[0][0][0] == 1
    assert [sum(not isinstance(t, int) for t, _ in tokens[k][0]) for k in "lg"] == [2, 2]  # embedding: vectors
    for layer in (0, 33, 69):
        injected = {}
        for key, enc, where in (("l", "clip_l", placeholder[0][0]), ("g", "clip_g", placeholder[1][0])):
            sections = [list(sec) for sec in tokens[key]]
            s, j = where
            sections[s][j] = (concepts.tables_of(enc)["<xb1>"][layer, 0], sections[s][j][1])
            injected[key] = sections
        expected = clip.encode_from_tokens(injected)[0]
        torch.testing.assert_close(stack[0, layer], expected, atol=1e-5, rtol=1e-5)


def test_stock_conditioning_edits_act_on_all_70_layers(loaded):
    model, clip, concepts = loaded
    to = pn.text_encode(clip, concepts, "a <xw1> <xw2> in a garden")
    frm = pn.text_encode(clip, concepts, "a <xw2> on a boat")
    avg = comfy_nodes.ConditioningAverage().addWeighted(to, frm, 0.3)[0]
    torch.testing.assert_close(avg[0][0].layers, 0.3 * to[0][0].layers + 0.7 * frm[0][0].layers)
    cat = comfy_nodes.ConditioningConcat().concat(to, frm)[0]
    assert cat[0][0].layers.shape == (1, 70, 154, 2048)
    torch.testing.assert_close(cat[0][0].layers, torch.cat([to[0][0].layers, frm[0][0].layers], dim=2))
    zero = comfy_nodes.ConditioningZeroOut().zero_out(to)[0]
    assert zero[0][0].layers.shape == (1, 70, 77, 2048) and not zero[0][0].layers.any()
    _, seen = sample_recording(model, cat, comfy_nodes.CLIPTextEncode().encode(clip, "x")[0], cfg=1.0)
    for layer, key in enumerate(LAYERS):
        torch.testing.assert_close(seen["to_k"][key][0].float(), cat[0][0].layers[0, layer], atol=1e-6, rtol=1e-6)
