"""Issue 10 §1: stock conditioning nodes act on all 16 layer-wise contexts of a concept prompt, as they act
on a plain prompt. Checked where it matters: the context each cross-attention layer receives while
sampling (the input of every attn2.to_k, recorded with forward pre-hooks), against the expected edit of
the 16 contexts written out here."""
import comfy.sample
import pack_nodes as pn
import pytest
import torch
from lora_files import lora_factors, write_kohya_lora

import nodes as comfy_nodes

PREFIXES = [f"input_blocks.{n}.1" for n in (1, 2, 4, 5, 7, 8)] + ["middle_block.1"] + \
           [f"output_blocks.{n}.1" for n in range(3, 12)]


@pytest.fixture(scope="module")
def chain(env, tiny, write_edlora):
    a = write_edlora("ce_a.pth", tokens=("<ea1>", "<ea2>"), seed=91)
    b = write_edlora("ce_b.pth", tokens=("<eb1>",), seed=92)
    model, clip, _ = tiny
    model, clip, concepts = pn.load_edlora(model, clip, a, 1.0, 1.0)
    return pn.load_edlora(model, clip, b, 1.0, 1.0, concepts)


def seen_contexts(model, positive) -> torch.Tensor:
    """[16, T, C]: what every cross-attention layer attends to during one sampling step (cfg 1: only the
    positive rows run)."""
    seen = {}
    unet = model.model.diffusion_model

    def recorder(layer):
        def hook(_module, args):
            seen.setdefault(layer, args[0][0].clone())  # returns None: the input is left alone
        return hook

    hooks = [unet.get_submodule(p + ".transformer_blocks.0.attn2.to_k").register_forward_pre_hook(recorder(layer))
             for layer, p in enumerate(PREFIXES)]
    try:
        latent = torch.zeros(1, 4, 8, 8)
        comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), 1, 1.0, "euler", "normal", positive,
                            positive, latent, disable_pbar=True, seed=0)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(seen) == list(range(16))
    return torch.stack([seen[layer].float() for layer in range(16)])


def stack(cond) -> torch.Tensor:
    layers = cond[0][0].layers
    assert layers is not None and layers.shape[1] == 16
    return layers[0].float()


def test_average_acts_on_every_layer(chain):
    model, clip, concepts = chain
    to = pn.text_encode(clip, concepts, "a <ea1> <ea2> in a garden")
    frm = pn.text_encode(clip, concepts, "a <eb1> on a boat")
    plain = comfy_nodes.CLIPTextEncode().encode(clip, "a lighthouse")[0]
    average = comfy_nodes.ConditioningAverage().addWeighted
    torch.testing.assert_close(seen_contexts(model, average(to, frm, 1.0)[0]), stack(to), atol=1e-5, rtol=0)
    torch.testing.assert_close(seen_contexts(model, average(to, frm, 0.0)[0]), stack(frm), atol=1e-5, rtol=0)
    torch.testing.assert_close(seen_contexts(model, average(to, frm, 0.3)[0]), 0.3 * stack(to) + 0.7 * stack(frm),
                               atol=1e-5, rtol=0)
    # a plain 'from' is the same context in every layer
    expected = 0.6 * stack(to) + 0.4 * plain[0][0][0].float()
    torch.testing.assert_close(seen_contexts(model, average(to, plain, 0.6)[0]), expected, atol=1e-5, rtol=0)
    # and a plain 'to' with a layer-wise 'from' becomes layer-wise
    expected = 0.6 * plain[0][0][0].float() + 0.4 * stack(frm)
    torch.testing.assert_close(seen_contexts(model, average(plain, frm, 0.6)[0]), expected, atol=1e-5, rtol=0)


def test_zero_out_zeroes_every_layer(chain):
    model, clip, concepts = chain
    cond = pn.text_encode(clip, concepts, "a <ea1> <ea2>")
    zeroed = comfy_nodes.ConditioningZeroOut().zero_out(cond)[0]
    seen = seen_contexts(model, zeroed)
    assert seen.shape == (16, 77, 768) and torch.count_nonzero(seen) == 0


def test_concat_gives_every_layer_the_concatenated_tokens(chain):
    model, clip, concepts = chain
    to = pn.text_encode(clip, concepts, "a <ea1> <ea2>")
    frm = pn.text_encode(clip, concepts, "and a <eb1>")
    plain = comfy_nodes.CLIPTextEncode().encode(clip, "at sunset")[0]
    concat = comfy_nodes.ConditioningConcat().concat
    seen = seen_contexts(model, concat(to, frm)[0])
    torch.testing.assert_close(seen, torch.cat([stack(to), stack(frm)], dim=1), atol=1e-5, rtol=0)
    seen = seen_contexts(model, concat(to, plain)[0])
    torch.testing.assert_close(seen, torch.cat([stack(to), plain[0][0][0].float().expand(16, -1, -1)], dim=1),
                               atol=1e-5, rtol=0)


def test_timestep_range_and_mask_keep_the_stack(chain):
    model, clip, concepts = chain
    cond = pn.text_encode(clip, concepts, "a <ea1> <ea2> reading")
    ranged = comfy_nodes.ConditioningSetTimestepRange().set_range(cond, 0.0, 1.0)[0]
    torch.testing.assert_close(seen_contexts(model, ranged), stack(cond), atol=1e-5, rtol=0)
    masked = comfy_nodes.ConditioningSetMask().append(cond, torch.ones(1, 64, 64), "default", 1.0)[0]
    torch.testing.assert_close(seen_contexts(model, masked), stack(cond), atol=1e-5, rtol=0)


def test_clip_hook_schedule_gives_one_entry_per_keyframe(env, chain):
    """Set CLIP Hooks with schedule_clip: the stock encoder returns one entry per keyframe; so does the
    concept encoder, each entry's 16 contexts encoded with that keyframe's hook strength."""
    import comfy_extras.nodes_hooks as hooks_nodes

    _, clip, concepts = chain
    write_kohya_lora(env.base / "models" / "loras" / "ce_hook.safetensors", lora_factors(95, unet=False, scale=2.0))
    hook = hooks_nodes.CreateHookLora().create_hook("ce_hook.safetensors", 1.0, 1.0)[0]
    keyframes = hooks_nodes.CreateHookKeyframe().create_hook_keyframe(0.0, 0.0)[0]
    keyframes = hooks_nodes.CreateHookKeyframe().create_hook_keyframe(1.0, 0.5, keyframes)[0]
    hook = hooks_nodes.SetHookKeyframes().set_hook_keyframes(hook, keyframes)[0]
    hooked = hooks_nodes.SetClipHooks().apply_hooks(clip, True, True, hook)[0]
    text = "a <ea1> <ea2> in the rain"
    stock = comfy_nodes.CLIPTextEncode().encode(hooked, "a cat in the rain")[0]
    ours = pn.text_encode(hooked, concepts, text)
    assert len(stock) == len(ours) == 2
    for s, o in zip(stock, ours, strict=True):
        assert (o[1]["clip_start_percent"], o[1]["clip_end_percent"]) == \
               (s[1]["clip_start_percent"], s[1]["clip_end_percent"])
        assert o[1].get("hooks") is s[1].get("hooks") is not None
    unhooked = stack(pn.text_encode(clip, concepts, text))
    # keyframe strength 0 -> the unhooked encoder; strength 1 -> a different one
    torch.testing.assert_close(ours[0][0].layers[0], unhooked, atol=1e-5, rtol=0)
    assert (ours[1][0].layers[0] - unhooked).abs().max() > 1e-3
