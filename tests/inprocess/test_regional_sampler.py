"""Issue 3, docs/design.md §9: regional sampling, checked against a brute-force implementation written here."""
import importlib
import math
from pathlib import Path

import comfy.sample
import pack_nodes as pn
import pytest
import torch
import torch.nn.functional as F
from boxes import parse_box_file
from comfy_env import execution_error, run_prompt

import nodes as comfy_nodes

# Written out here on purpose (not imported from the pack).
BLOCKS = [("input", 1), ("input", 2), ("input", 4), ("input", 5), ("input", 7), ("input", 8), ("middle", 0)] + \
         [("output", i) for i in range(3, 12)]
PREFIXES = [f"input_blocks.{n}.1" for n in (1, 2, 4, 5, 7, 8)] + ["middle_block.1"] + \
           [f"output_blocks.{n}.1" for n in range(3, 12)]
H, W = 64, 128  # pixels; latent 8x16


def rn(env):
    return env.pack("nodes.glue.regional")


def encode(clip, text):
    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


def box(h, w, top, left, bottom, right):
    m = torch.zeros(1, h, w)
    m[:, top:bottom, left:right] = 1.0
    return m


def sample(model, pos, neg, steps=2, seed=3, cfg=5.0):
    latent = torch.zeros(1, 4, H // 8, W // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, latent, disable_pbar=True,
                               seed=seed)


def stock_ksampler(model, pos, neg, seed=4):
    latent = {"samples": torch.zeros(1, 4, H // 8, W // 8)}
    return comfy_nodes.KSampler().sample(model, seed, 2, 6.0, "euler", "normal", pos, neg, latent)[0]["samples"]


def regional_ksampler(env, model, pos, neg, regions, seed=4):
    latent = {"samples": torch.zeros(1, 4, H // 8, W // 8)}
    kw = {} if regions is None else {"regions": regions}
    return pn.regional_ksampler(model, seed, 2, 6.0, "euler", "normal", pos, neg, latent, 1.0, **kw)["samples"]


def contexts_of(cond):
    """[L, T, C] contexts of a CONDITIONING's first entry (L = 16 for layer-wise, else 1)."""
    layers = getattr(cond[0][0], "layers", None)
    return layers[0] if layers is not None else cond[0][0][0][None]


def plain_attention(q, k, v, heads):
    """q [N, D], k/v [T, D] -> [N, D], softmax attention head by head."""
    d = q.shape[-1] // heads
    outs = []
    for i in range(heads):
        qi, ki, vi = q[:, i * d:(i + 1) * d], k[:, i * d:(i + 1) * d], v[:, i * d:(i + 1) * d]
        outs.append(torch.softmax(qi @ ki.T / math.sqrt(d), dim=-1) @ vi)
    return torch.cat(outs, dim=-1)


def reference_box_mask(box, image_h, image_w, fh, fw):
    """Mix-of-Show's per-layer box: rows ceil(top*h/H):floor(bottom*h/H), columns likewise, hard 0/1."""
    top, left, bottom, right = box
    m = torch.zeros(fh, fw)
    m[math.ceil(top * fh / image_h):math.floor(bottom * fh / image_h),
      math.ceil(left * fw / image_w):math.floor(right * fw / image_w)] = 1
    return m


def layer_mask(mask_or_box, fh, fw, image_hw):
    if isinstance(mask_or_box, tuple):
        return reference_box_mask(mask_or_box, *image_hw, fh, fw).reshape(-1, 1)
    return F.avg_pool2d(mask_or_box[None], (mask_or_box.shape[-2] // fh, mask_or_box.shape[-1] // fw)).reshape(-1, 1)


def brute_force_model(model, regions, image_hw=(H, W)):
    """Clone of ``model`` with an attn2 replace on every cross-attention layer that recomputes, region by
    region and row by row, ``(1-c) h + c * sum_r m_r h_r / S``: a mask is area-averaged to the layer, a
    box ``(top, left, bottom, right)`` rasterised by the reference rule."""
    unet = model.model.diffusion_model
    ref = model.clone()

    def replace(q, k, v, extra):
        layer = BLOCKS.index(tuple(extra["block"]))
        attn2 = unet.get_submodule(PREFIXES[layer] + ".transformer_blocks.0.attn2")
        heads = extra["n_heads"]
        fh, fw = extra["activations_shape"][-2:]
        chunks = extra["cond_or_uncond"]
        b0 = q.shape[0] // len(chunks)
        out = torch.empty_like(q)
        for b in range(q.shape[0]):
            h = plain_attention(q[b], k[b], v[b], heads)
            total = torch.zeros_like(h)
            s = torch.zeros(q.shape[1], 1)
            for mask, pos, neg in regions:
                ctxs = contexts_of(neg if chunks[b // b0] == 1 else pos)
                ctx = ctxs[layer if ctxs.shape[0] > 1 else 0].to(q.dtype)
                h_r = plain_attention(q[b], attn2.to_k(ctx), attn2.to_v(ctx), heads)
                m = layer_mask(mask, fh, fw, image_hw)
                total = total + m * h_r
                s = s + m
            c = s.clamp(max=1.0)
            out[b] = torch.where(s > 0, (1 - c) * h + c * total / s.clamp_min(1e-30), h)
        return out

    for kind, number in BLOCKS:
        ref.set_model_attn2_replace(replace, kind, number)
    return ref


def load_two(env, tiny, write_edlora):
    a = write_edlora("rg_a.pth", tokens=("<ra1>", "<ra2>"), seed=31)
    b = write_edlora("rg_b.pth", tokens=("<rb1>",), seed=32)
    model, clip, _ = tiny
    model, clip, concepts = pn.load_edlora(model, clip, a, 0.7, 0.7)
    model, clip, concepts = pn.load_edlora(model, clip, b, 0.7, 0.7, concepts)
    return model, clip, concepts


def test_fast_path_matches_brute_force(env, tiny, write_edlora):
    model, clip, concepts = load_two(env, tiny, write_edlora)
    pos = pn.text_encode(clip, concepts, "<ra1> <ra2> and a <rb1> in a park")  # layer-wise global prompt too
    neg = encode(clip, "blurry")
    pos_a = pn.text_encode(clip, concepts, "a photo of <ra1> <ra2>, smiling")
    pos_b = pn.text_encode(clip, concepts, "a <rb1> " + "standing in the rain, " * 20)  # 154 tokens vs 77
    neg_b = encode(clip, "lowres")
    assert contexts_of(pos_a).shape[0] == 16 and contexts_of(pos_b).shape[1] == 154
    # overlapping boxes; the 1x2 feature map sees soft values (0.25) from the overlap
    mask_a, mask_b = box(H, W, 0, 0, 64, 80), box(H, W, 8, 48, 56, 128)
    regions = pn.region(pos_a, neg, mask_a)
    regions = pn.region(pos_b, neg_b, mask_b, regions)

    patched = rn(env).install_regions(model, regions)
    pack_patches = [p for p in patched.model_options["transformer_options"]["patches"]["attn2_patch"]
                    if isinstance(p, env.pack("nodes.glue.layerwise").LayerwiseAttn2Patch)]
    assert len(pack_patches) == 1 and isinstance(pack_patches[0], rn(env).RegionalAttn2Patch)
    ours = sample(patched, pos, neg)
    ref_model = brute_force_model(model, [(mask_a[0], pos_a, neg), (mask_b[0], pos_b, neg_b)])
    ref = sample(ref_model, pos, neg)
    # The tiny random model's latents reach ~1e3, so float32 rounding alone (SDPA vs the plain softmax
    # above) is ~1e-6 of that: compare relative to the output scale.
    scale = float(ref.abs().max())
    torch.testing.assert_close(ours, ref, atol=1e-5 * scale, rtol=0)
    plain = sample(model, pos, neg)
    assert (plain - ours).abs().max() > 1e-3  # the regions really act


def test_box_regions_match_brute_force_with_the_reference_box_rule(env, tiny):
    """The 1024x512 reference boxes (harry_hermione_thanos) made by the box node: the regional noise
    prediction equals the brute force with the reference's per-layer box rule."""
    model, clip, _ = tiny
    boxes = [tuple(b) for _, b in parse_box_file(
        Path(__file__).resolve().parents[2] / "assets" / "poses" / "harry_hermione_thanos.txt")]
    pos, neg = encode(clip, "three people near a lake"), encode(clip, "blurry")
    prompts = [encode(clip, t) for t in ("a wizard in a robe", "a witch, smiling", "a giant in armour")]
    regions = None
    for b, p in zip(boxes, prompts, strict=True):
        regions = pn.region(p, neg, pn.box_mask(1024, 512, *b), regions)
    latent = torch.zeros(1, 4, 64, 128)
    noise = comfy.sample.prepare_noise(latent, 7)

    def run(m):
        return comfy.sample.sample(m, noise, 1, 5.0, "euler", "normal", pos, neg, latent, disable_pbar=True, seed=7)

    ours = run(rn(env).install_regions(model, regions))
    ref = run(brute_force_model(model, [(b, p, neg) for b, p in zip(boxes, prompts, strict=True)],
                                image_hw=(512, 1024)))
    torch.testing.assert_close(ours, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
    area = run(brute_force_model(model, [(box(512, 1024, *b)[0], p, neg) for b, p in zip(boxes, prompts, strict=True)],
                                 image_hw=(512, 1024)))
    assert (area - ours).abs().max() > 1e-4 * float(ref.abs().max())  # the rule is not area averaging


def test_zero_regions_is_stock(env, tiny):
    model, clip, _ = tiny
    pos, neg = encode(clip, "a castle"), encode(clip, "blurry")
    before = model.model_options["transformer_options"].copy()
    assert torch.equal(regional_ksampler(env, model, pos, neg, None), stock_ksampler(model, pos, neg))
    assert torch.equal(regional_ksampler(env, model, pos, neg, ()), stock_ksampler(model, pos, neg))
    assert model.model_options["transformer_options"] == before


def test_pose_box_mask(env):
    image = torch.zeros(1, 64, 128, 3)
    image[0, 10:60, 100:110, 0] = 1.0  # right "person" (red limb)
    image[0, 5:50, 20:30, 1] = 1.0  # left "person" (green limb)
    left, count = pn.pose_box_mask(image, 0, 0.0)
    right, _ = pn.pose_box_mask(image, 1, 0.0)
    assert count == 2 and left.shape == (1, 64, 128)
    assert left[0, 5:50, 20:30].min() == 1 and left[0, :, 60:].max() == 0
    assert right[0, 10:60, 100:110].min() == 1 and right[0, :, :60].max() == 0
    # the input counts from 0; the message says which person that is, counted from 1 like everything a person reads
    with pytest.raises(ValueError, match=r"^Pose Box to Mask: index 2 is the 3rd person from the left, but only 2 "
                                         r"people were found"):
        pn.pose_box_mask(image, 2, 0.0)


def test_one_full_image_region_with_global_prompts_is_stock(env, tiny):
    model, clip, _ = tiny
    pos, neg = encode(clip, "a castle on a hill"), encode(clip, "blurry")
    regions = pn.region(pos, neg, torch.ones(1, H, W))
    ours = regional_ksampler(env, model, pos, neg, regions)
    stock = stock_ksampler(model, pos, neg)
    # Inside a full mask the blend is 0 * h + 1 * h_r, and h_r is the same attention as h. (On CPU the k/v
    # projection of the concatenated context gives the same bits; a GPU GEMM might not.)
    assert torch.equal(ours, stock)


def test_attention_without_activations_shape_falls_back_to_the_token_count(env, tiny):
    """A UNet that does not report ``activations_shape`` (another model code, another ComfyUI) samples the same:
    the feature size comes from the token count, as when the reported size does not match."""
    model, clip, _ = tiny
    pos, neg = encode(clip, "a castle on a hill"), encode(clip, "blurry")
    regions = pn.region(encode(clip, "a red door"), neg, box(H, W, 0, 0, H, W // 2))
    regions = pn.region(encode(clip, "a tree"), neg, box(H, W, 16, 40, 64, 128), regions)
    patched = rn(env).install_regions(model, regions)

    def without_shape(replace):
        def call(q, k, v, extra_options):
            return replace(q, k, v, {key: value for key, value in extra_options.items()
                                     if key not in ("activations_shape", "original_shape")})
        return call

    options = patched.model_options["transformer_options"]
    replaces = {key: without_shape(r) for key, r in options["patches_replace"]["attn2"].items()}
    stripped = patched.clone()
    stripped.model_options = {**patched.model_options, "transformer_options": {
        **options, "patches_replace": {**options["patches_replace"], "attn2": replaces}}}
    assert torch.equal(sample(stripped, pos, neg), sample(patched, pos, neg))


def test_all_zero_mask_raises(env, tiny):
    _, clip, _ = tiny
    pos, neg = encode(clip, "a cat"), encode(clip, "blurry")
    with pytest.raises(ValueError, match=r"^region 1: the mask is all zero"):
        pn.region(pos, neg, torch.zeros(1, H, W))
    first = pn.region(pos, neg, box(H, W, 0, 0, 8, 8))
    with pytest.raises(ValueError, match=r"^region 2: the mask is all zero"):
        pn.region(pos, neg, torch.zeros(H, W), first)
    assert len(first) == 1  # chaining never mutates


def test_non_square_two_box_regions(env, tiny):
    model, clip, _ = tiny
    pos, neg = encode(clip, "two animals"), encode(clip, "blurry")
    left = pn.box_mask(W, H, 0, 0, 64, 64)
    right = pn.box_mask(W, H, 0, 64, 64, 128)
    assert left.shape == (1, H, W) and float(left.sum()) == 64 * 64
    regions = pn.region(encode(clip, "a cat"), neg, left)
    regions = pn.region(encode(clip, "a dog"), neg, right, regions)
    patches_before = list(model.model_options["transformer_options"].get("patches", {}).get("attn2_patch", []))
    out = regional_ksampler(env, model, pos, neg, regions)
    assert out.shape == (1, 4, H // 8, W // 8) and torch.isfinite(out).all()
    assert (out - stock_ksampler(model, pos, neg)).abs().max() > 1e-4
    assert model.model_options["transformer_options"].get("patches", {}).get("attn2_patch", []) == patches_before
    # the guider path gives the same result as the sampler path
    guider = pn.regional_guider(model, pos, neg, regions, 6.0)
    latent = torch.zeros(1, 4, H // 8, W // 8)
    noise = comfy.sample.prepare_noise(latent, 4)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 2)
    g = guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=4, disable_pbar=True)
    torch.testing.assert_close(g.cpu(), out, atol=1e-6, rtol=0)


def test_api_prompt_two_edloras_two_regions(env, write_edlora):
    a = write_edlora("rgp_a.pth", tokens=("<pa1>", "<pa2>"), seed=41)
    b = write_edlora("rgp_b.safetensors", tokens=("<pb1>",), seed=42)
    g = {
        "1": {"class_type": "TinySD15Loader", "inputs": {"unet": "narrow", "seed": 0}},
        "2": {"class_type": "MixOfShowLoadEDLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "edlora_name": a, "text_encoder_strength": 0.7, "unet_strength": 0.7}},
        "3": {"class_type": "MixOfShowLoadEDLoRA", "inputs": {
            "model": ["2", 0], "clip": ["2", 1], "concepts": ["2", 2], "edlora_name": b,
            "text_encoder_strength": 0.7, "unet_strength": 0.7}},
        "4": {"class_type": "MixOfShowTextEncode", "inputs": {"clip": ["3", 1], "concepts": ["3", 2],
                                                               "text": "a <pa1> <pa2> on the left"}},
        "5": {"class_type": "MixOfShowTextEncode", "inputs": {"clip": ["3", 1], "concepts": ["3", 2],
                                                               "text": "a <pb1> on the right"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 1], "text": "blurry, lowres"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 1], "text": "two friends in a park"}},
        "8": {"class_type": "MixOfShowBoxMask", "inputs": {"width": W, "height": H, "top": 0, "left": 0,
                                                            "bottom": 64, "right": 64}},
        "9": {"class_type": "MixOfShowBoxMask", "inputs": {"width": W, "height": H, "top": 0, "left": 64,
                                                            "bottom": 64, "right": 128}},
        "10": {"class_type": "MixOfShowRegion",
               "inputs": {"positive": ["4", 0], "negative": ["6", 0], "mask": ["8", 0]}},
        "11": {"class_type": "MixOfShowRegion", "inputs": {"positive": ["5", 0], "negative": ["6", 0], "mask": ["9", 0],
                                                            "regions": ["10", 0]}},
        "12": {"class_type": "EmptyLatentImage", "inputs": {"width": W, "height": H, "batch_size": 2}},
        "13": {"class_type": "MixOfShowRegionalSampler", "inputs": {
            "model": ["3", 0], "positive": ["7", 0], "negative": ["6", 0], "latent_image": ["12", 0],
            "regions": ["11", 0], "seed": 5, "steps": 2, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["1", 2]}},
        "15": {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": "mos_regional"}},
    }
    ex, _ = run_prompt(g, "regional")
    assert ex.success, execution_error(ex) or ex.validation
    assert len(ex.history_result["outputs"]["15"]["images"]) == 2


def test_xywh_box_equals_tlbr_box_and_denoise_below_one(env, tiny):
    a = pn.box_mask(W, H, 8, 16, 40, 72)
    b = pn.box_mask_xywh(W, H, 16, 8, 56, 32)
    assert torch.equal(a, b) and a.shape == (1, H, W) and a.sum() == 32 * 56
    model, clip, _ = tiny
    pos, neg = encode(clip, "two people"), encode(clip, "blurry")
    regions = pn.region(encode(clip, "a knight"), neg, a)
    start = {"samples": torch.randn(2, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(0))}
    out = pn.regional_ksampler(model, 4, 4, 6.0, "dpmpp_2m", "karras", pos, neg, start, 0.5,
                               regions=regions)["samples"]
    stock = comfy_nodes.KSampler().sample(model, 4, 4, 6.0, "dpmpp_2m", "karras", pos, neg, start, 0.5)[0]["samples"]
    assert out.shape == start["samples"].shape and torch.isfinite(out).all()
    assert 0 < (out - stock).abs().max() < (start["samples"] - stock).abs().max()  # img2img, regions act


def test_another_packs_attn2_replace_is_chained_not_overwritten(env, tiny):
    """A stand-in for an IPAdapter-like pack (test fixture node StandInAttn2Replace) has an attn2 replace
    on every cross-attention block: with regions it still runs, on the global prompt's keys only, and
    its effect stays in the result; with a zero term the result equals regions without it."""
    fixtures = env.nodes.NODE_CLASS_MAPPINGS["StandInAttn2Replace"]
    calls = importlib.import_module(fixtures.__module__).ATTN2_CALLS
    model, clip, _ = tiny
    pos, neg = encode(clip, "two people"), encode(clip, "blurry")
    long_prompt = encode(clip, "a knight " + "in shining armour, " * 20)  # 154 tokens: padded + masked
    regions = pn.region(long_prompt, neg, box(H, W, 0, 0, 64, 48))  # the middle stays global
    regions = pn.region(encode(clip, "a dragon"), neg, box(H, W, 0, 80, 64, 128), regions)
    plain = regional_ksampler(env, model, pos, neg, regions)
    calls.clear()
    zero = fixtures().patch(model, 0.0)[0]
    assert torch.equal(regional_ksampler(env, zero, pos, neg, regions), plain)
    assert {block for block, _, _ in calls} == set(BLOCKS) and {(k, v) for _, k, v in calls} == {(77, 77)}
    shifted = regional_ksampler(env, fixtures().patch(model, 0.5)[0], pos, neg, regions)
    assert (shifted - plain).abs().max() > 1e-3
    # installing the regions twice on one model cannot be chained: refused, naming the patch
    twice = rn(env).install_regions(model, regions)
    with pytest.raises(ValueError, match="already carries Mix-of-Show's regional attention"):
        rn(env).install_regions(twice, regions)
