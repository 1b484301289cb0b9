"""Issue 19: regions and a LoRA per region on the tiny SDXL, checked against brute-force implementations written
here: the regional noise prediction (masks at each layer's real feature size, odd sizes included), one region
covering the image with a concept's model = that merged model, region LoRAs layer by layer, a region empty at a
layer's size, ``y`` global, and per-region control strength on an SDXL ControlNet's three residual sizes."""
import json
import math
from pathlib import Path

import comfy.patcher_extension
import comfy.sample
import pack_nodes as pn
import pytest
import torch
import torch.nn.functional as F
from comfy_env import node
from layer_io import record_layer_io
from lora_files import lora_factors, write_kohya_lora
from safetensors.torch import save_file

import nodes as comfy_nodes
from fusion.families import SDXL

# Written out here (not imported from the pack): SDXL's 70 cross-attention layers and their SpatialTransformers.
LAYERS = [("input", i, j) for i in (4, 5) for j in range(2)] + [("input", i, j) for i in (7, 8) for j in range(10)] \
    + [("middle", 0, j) for j in range(10)] + [("output", i, j) for i in (0, 1, 2) for j in range(10)] \
    + [("output", i, j) for i in (3, 4, 5) for j in range(2)]
POSES = Path(__file__).resolve().parents[2] / "assets" / "poses"
H, W = 72, 96  # pixels: latent 9 x 12; cross-attention feature maps 5 x 6 and 3 x 3 (ComfyUI rounds odd sizes up)
# LoCon layers of the tiny SDXL's ResNet blocks: 3x3 convs, a strided downsampler, a time-embedding projection
XL_LOCON = {"down_blocks.0.resnets.0.conv1": (64, 64, 3, 3), "down_blocks.0.downsamplers.0.conv": (64, 64, 3, 3),
            "down_blocks.1.resnets.0.time_emb_proj": (128, 256)}


def prefix(kind, number):
    return "middle_block.1" if kind == "middle" else f"{kind}_blocks.{number}.1"


def encode(clip, text):
    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


def rn(env):
    return env.pack("nodes.glue.regional")


def sample(model, pos, neg, cfg=5.0, seed=3, seen=None):
    """One Euler step at H x W; ``seen`` (a dict) receives the y of the UNet call."""
    if seen is not None:
        def wrapper(executor, x, timesteps, context, y, *args, **kwargs):
            seen["y"] = y.clone()
            return executor(x, timesteps, context, y, *args, **kwargs)
        model = model.clone()
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.y", wrapper)
    latent = torch.zeros(1, 4, H // 8, W // 8)
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), 1, cfg, "euler", "normal", pos, neg,
                               latent, disable_pbar=True, seed=seed)


def plain_attention(q, k, v, heads):
    d = q.shape[-1] // heads
    return torch.cat([torch.softmax(q[:, i * d:(i + 1) * d] @ k[:, i * d:(i + 1) * d].T / math.sqrt(d), dim=-1)
                      @ v[:, i * d:(i + 1) * d] for i in range(heads)], dim=-1)


def box_rule(box, fh, fw, height=H, width=W):
    """Mix-of-Show's per-layer box: rows ceil(top*h/H):floor(bottom*h/H), columns likewise."""
    top, left, bottom, right = box
    m = torch.zeros(fh, fw)
    m[math.ceil(top * fh / height):math.floor(bottom * fh / height),
      math.ceil(left * fw / width):math.floor(right * fw / width)] = 1
    return m


def area_average(mask, fh, fw):
    """Each cell of an fh x fw map: the mean of the mask over the cell's rectangle of pixels, fractional pixels
    weighted by their overlap (loops)."""
    out = torch.zeros(fh, fw, dtype=torch.float64)
    for i in range(fh):
        y0, y1 = i * H / fh, (i + 1) * H / fh
        for j in range(fw):
            x0, x1 = j * W / fw, (j + 1) * W / fw
            total = 0.0
            for y in range(math.floor(y0), math.ceil(y1)):
                wy = min(y + 1, y1) - max(y, y0)
                for x in range(math.floor(x0), math.ceil(x1)):
                    total += wy * (min(x + 1, x1) - max(x, x0)) * float(mask[y, x])
            out[i, j] = total / ((y1 - y0) * (x1 - x0))
    return out.float()


def layer_mask(spec, fh, fw):
    return box_rule(spec, fh, fw) if isinstance(spec, tuple) else area_average(spec, fh, fw)


def contexts_of(cond):
    layers = getattr(cond[0][0], "layers", None)
    return layers[0] if layers is not None else cond[0][0][0][None]


def brute_force_model(model, regions):
    """An attn2 replace on each of the 70 layers recomputing, row by row and region by region,
    (1 - c) h + c * sum_r m_r h_r / S at the layer's own feature size (from activations_shape)."""
    unet = model.model.diffusion_model
    ref = model.clone()

    def replace(q, k, v, extra):
        kind, number = extra["block"]
        layer = LAYERS.index((kind, number, extra["block_index"]))
        attn2 = unet.get_submodule(f"{prefix(kind, number)}.transformer_blocks.{extra['block_index']}.attn2")
        heads, (fh, fw) = extra["n_heads"], extra["activations_shape"][-2:]
        chunks = extra["cond_or_uncond"]
        rows = q.shape[0] // len(chunks)
        out = torch.empty_like(q)
        for b in range(q.shape[0]):
            h = plain_attention(q[b], k[b], v[b], heads)
            total, s = torch.zeros_like(h), torch.zeros(q.shape[1], 1)
            for spec, pos, neg in regions:
                ctxs = contexts_of(neg if chunks[b // rows] == 1 else pos)
                ctx = ctxs[layer if ctxs.shape[0] > 1 else 0].to(q.dtype)
                m = layer_mask(spec, fh, fw).reshape(-1, 1)
                total = total + m * plain_attention(q[b], attn2.to_k(ctx), attn2.to_v(ctx), heads)
                s = s + m
            c = s.clamp(max=1.0)
            out[b] = torch.where(s > 0, (1 - c) * h + c * total / s.clamp_min(1e-30), h)
        return out

    for kind, number, j in LAYERS:
        ref.set_model_attn2_replace(replace, kind, number, j)
    return ref


@pytest.fixture(scope="module")
def xl_concepts(env, tiny_xl, write_xl_edlora):
    name = write_xl_edlora("xlr_a.pth", tokens=("<xr1>", "<xr2>"), seed=41)
    model, clip, _ = tiny_xl
    return pn.load_edlora(model, clip, name, 0.7, 0.7)


def test_the_regional_noise_prediction_equals_brute_force_and_y_stays_global(env, xl_concepts):
    model, clip, concepts = xl_concepts
    pos = pn.text_encode(clip, concepts, "<xr1> <xr2> and a friend in a park")  # layer-wise global prompt
    neg = encode(clip, "blurry")
    pos_a = pn.text_encode(clip, concepts, "a photo of <xr1> <xr2>, smiling")
    pos_b = encode(clip, "a knight " + "standing in the rain, " * 20)  # 154 tokens against 77
    neg_b = encode(clip, "lowres")
    painted = torch.zeros(H, W)
    painted[10:66, 44:96] = 1.0
    painted[30:50, 60:80] = 0.5  # soft inside
    box_a = (0, 0, 72, 56)
    regions = pn.region(pos_a, neg, pn.box_mask(W, H, *box_a))
    regions = pn.region(pos_b, neg_b, painted[None], regions)
    seen, seen_ref = {}, {}
    ours = sample(rn(env).install_regions(model, regions), pos, neg, seen=seen)
    ref = sample(brute_force_model(model, [(box_a, pos_a, neg), (painted, pos_b, neg_b)]), pos, neg, seen=seen_ref)
    scale = float(ref.abs().max())
    torch.testing.assert_close(ours, ref, atol=1e-5 * scale, rtol=0)
    assert (sample(model, pos, neg) - ours).abs().max() > 1e-3 * scale  # the regions really act
    # y: one vector per row, the global positive's for positive rows and the global negative's for the others
    # (the regions' own pooled vectors differ and are not used)
    expected = {0: model.model.encode_adm(pooled_output=pos[0][1]["pooled_output"], width=W, height=H)[0],
                1: model.model.encode_adm(pooled_output=neg[0][1]["pooled_output"], width=W, height=H)[0]}
    assert not torch.allclose(pos_a[0][1]["pooled_output"], pos[0][1]["pooled_output"])
    assert seen["y"].shape == (2, 2816) and torch.equal(seen["y"], seen_ref["y"])
    assert sorted(int(torch.allclose(r, expected[1])) for r in seen["y"]) == [0, 1]
    assert all(torch.allclose(r, expected[0]) or torch.allclose(r, expected[1]) for r in seen["y"])


@pytest.fixture(scope="module")
def xl_region_loras(env):
    folder = env.base / "models" / "loras"
    names = []
    for i in range(3):
        name = f"xlr_char{i}.safetensors"
        write_kohya_lora(folder / name, lora_factors(80 + i, family=SDXL, model_channels=64, text_layers=3,
                                                     text_intermediate=128, convs=XL_LOCON, scale=0.7))
        names.append(name)
    return names


def concept(model, clip, name, words, strength=1.0):
    return node("MixOfShowLoRAConcept", model=model, clip=clip, lora_name=name, trigger_words=words,
                strength_model=strength, strength_clip=strength)


def test_one_full_region_with_a_concepts_model_equals_that_merged_model(env, tiny_xl, xl_region_loras):
    model, clip, _ = tiny_xl
    model_a, clip_a, _ = concept(model, clip, xl_region_loras[0], "ohwx man")
    merged, merged_clip = comfy_nodes.LoraLoader().load_lora(model, clip, xl_region_loras[0], 1.0, 1.0)
    pos, neg = encode(clip_a, "a photo of ohwx man"), encode(clip_a, "blurry")
    torch.testing.assert_close(pos[0][0], encode(merged_clip, "a photo of ohwx man")[0][0])
    regions = pn.region(pos, neg, pn.box_mask(W, H, 0, 0, H, W), model=model_a)
    # the global prompt is the region's: SDXL's y (its pooled vector) is global, one per row
    ours = sample(rn(env).install_regions(model, regions), pos, neg, cfg=1.0)
    ref = sample(merged, pos, neg, cfg=1.0)
    scale = float(ref.abs().max())
    torch.testing.assert_close(ours, ref, atol=1e-5 * scale, rtol=0)
    plain = sample(rn(env).install_regions(model, pn.region(pos, neg, pn.box_mask(W, H, 0, 0, H, W))), pos, neg,
                   cfg=1.0)
    assert (plain - ref).abs().max() > 1e-2 * scale  # the LoRA really acts


def test_one_full_region_with_an_sdxl_edlora_equals_that_edloras_model(env, tiny_xl, write_xl_edlora):
    """The same with an SDXL ED-LoRA (Load ED-LoRA's MODEL in the region, its concept prompt: 70 layer contexts)."""
    model, clip, _ = tiny_xl
    name = write_xl_edlora("xlr_full.pth", tokens=("<xf1>",), seed=43)
    model_a, clip_a, concepts = pn.load_edlora(model, clip, name, 0.8, 0.8)
    pos, neg = pn.text_encode(clip_a, concepts, "a photo of <xf1>, smiling"), encode(clip_a, "blurry")
    regions = pn.region(pos, neg, pn.box_mask(W, H, 0, 0, H, W), model=model_a)
    sampling = env.pack("nodes.glue.layerwise")
    base = model.clone()
    sampling.install_layerwise(base)  # the sampling MODEL is the base checkpoint's, with the layer-wise patch
    ours = sample(rn(env).install_regions(base, regions), pos, neg, cfg=1.0)
    ref = sample(model_a, pos, neg, cfg=1.0)
    scale = float(ref.abs().max())
    torch.testing.assert_close(ours, ref, atol=1e-5 * scale, rtol=0)
    assert (sample(base, pos, neg, cfg=1.0) - ref).abs().max() > 1e-2 * scale  # the ED-LoRA's UNet LoRA acts


def blend(boxes, fh, fw):
    masks = [box_rule(b, fh, fw) for b in boxes]
    total = sum(masks)
    covered = total > 0
    out = []
    for m in masks:
        w = torch.zeros(fh, fw)
        w[covered] = m[covered] * total[covered].clamp(max=1) / total[covered]
        out.append(w)
    return out


def dense_deltas(region_model, base):
    """module path below diffusion_model -> dense ΔW of the region model's extra patches."""
    out = {}
    for key, entries in region_model.patches.items():
        for strength, adapter, *_ in [e for e in entries if not any(e is b for b in base.patches.get(key, []))]:
            up, down, alpha = adapter.weights[0].float(), adapter.weights[1].float(), adapter.weights[2]
            scale = strength * (alpha / down.shape[0] if alpha is not None else 1.0)
            path = key[len("diffusion_model."):-len(".weight")]
            shape = base.model.diffusion_model.get_submodule(path).weight.shape
            out[path] = out.get(path, 0) + (scale * (up.flatten(1) @ down.flatten(1))).reshape(shape)
    return out


def test_regions_with_their_own_loras_match_brute_force(env, tiny_xl, xl_region_loras):
    """Three overlapping box regions, each with its own LoRA (transformer blocks, linear proj_in/out, 3x3 and
    strided convs, a time-embedding projection), against every patched layer recomputed as
    W0 x + sum_r w_r delta_r(x) with the blend weights written out here, at each layer's real size."""
    model, clip, _ = tiny_xl
    boxes = [(0, 0, 72, 40), (8, 32, 64, 72), (0, 64, 72, 96)]
    spec, regions = [], None
    for i, b in enumerate(boxes):
        m_i, c_i, _ = concept(model, clip, xl_region_loras[i], f"char{i} person")
        pos_i, neg_i = encode(c_i, f"a photo of char{i} person"), encode(c_i, "blurry")
        spec.append((b, pos_i, neg_i, m_i))
        regions = pn.region(pos_i, neg_i, pn.box_mask(W, H, *b), regions, model=m_i)
    g_pos, g_neg = encode(clip, "people in a park"), encode(clip, "lowres")
    ours = sample(rn(env).install_regions(model, regions), g_pos, g_neg)

    plain_regions = None
    for b, pos_i, neg_i, _ in spec:
        plain_regions = pn.region(pos_i, neg_i, pn.box_mask(W, H, *b), plain_regions)
    patched = rn(env).install_regions(model, plain_regions)  # the regional attention alone (tested above)
    unet = model.model.diffusion_model
    deltas = [dense_deltas(m, model) for *_, m in spec]
    block_hw, sizes = {}, []

    def hw_of_tokens(n):
        h, w = H // 8, W // 8
        while h * w > n:
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    def hook_for(path, module):
        def hook(_m, args, out):
            x, out = args[0], out.clone()
            if path.endswith(("attn2.to_k", "attn2.to_v")):
                # every prompt here is one 77-token chunk; the regions' contexts are the last R * 77 rows
                # (after the global context, or alone: the pack projects them once per sampling)
                start = x.shape[1] - len(spec) * 77
                for r, d in enumerate(deltas):
                    if path in d and start >= 0:
                        seg = slice(start + r * 77, start + (r + 1) * 77)
                        out[:, seg] += F.linear(x[:, seg], d[path].to(x.dtype))
                return out
            if path.endswith("emb_layers.1"):
                fh, fw = block_hw[path]
                out4 = out[:, :, None, None].expand(-1, -1, fh, fw).clone()
                for r, d in enumerate(deltas):
                    out4 += blend(boxes, fh, fw)[r][None, None] * F.linear(x, d[path].to(x.dtype))[:, :, None, None]
                return out4
            if isinstance(module, torch.nn.Conv2d):
                sizes.append(tuple(out.shape[-2:]))
                for r, d in enumerate(deltas):
                    y = F.conv2d(x, d[path].to(x.dtype), stride=module.stride, padding=module.padding)
                    out += blend(boxes, *out.shape[-2:])[r][None, None] * y
                return out
            fh, fw = hw_of_tokens(x.shape[1])
            sizes.append((fh, fw))
            for r, d in enumerate(deltas):
                out += blend(boxes, fh, fw)[r].reshape(1, -1, 1) * F.linear(x, d[path].to(x.dtype))
            return out
        return hook

    handles = []
    for path in sorted({p for d in deltas for p in d}):
        handles.append(unet.get_submodule(path).register_forward_hook(hook_for(path, unet.get_submodule(path))))
        if path.endswith("emb_layers.1"):
            handles.append(unet.get_submodule(path[:-len(".emb_layers.1")]).register_forward_pre_hook(
                lambda _m, args, p=path: block_hw.__setitem__(p, tuple(args[0].shape[-2:]))))
    try:
        ref = sample(patched, g_pos, g_neg)
    finally:
        for h in handles:
            h.remove()
    assert {(5, 6), (3, 3), (9, 12)} <= set(sizes)  # both cross-attention sizes (odd ones) and the latent's
    scale = float(ref.abs().max())
    torch.testing.assert_close(ours, ref, atol=1e-5 * scale, rtol=0)
    assert (sample(patched, g_pos, g_neg) - ours).abs().max() > 1e-3 * scale  # the LoRAs act


def test_a_region_empty_at_a_layers_size_leaves_that_layer_exact(env, tiny_xl, xl_region_loras):
    """A 24x24 box vanishes at the 3x3 maps (reference box rule) and covers one cell of the 5x6 maps."""
    model, clip, _ = tiny_xl
    m_a, c_a, _ = concept(model, clip, xl_region_loras[0], "ohwx man")
    regions = pn.region(encode(c_a, "ohwx man"), encode(c_a, "blurry"), pn.box_mask(W, H, 0, 0, 24, 24), model=m_a)
    assert box_rule((0, 0, 24, 24), 3, 3).sum() == 0 and box_rule((0, 0, 24, 24), 5, 6).sum() == 1
    unet = model.model.diffusion_model
    watched = {"middle_block.1.transformer_blocks.4.attn1.to_q", "output_blocks.1.1.transformer_blocks.9.ff.net.2",
               "input_blocks.7.1.proj_in", "input_blocks.4.1.transformer_blocks.1.attn1.to_q"}
    patched = rn(env).install_regions(model, regions)
    seen = record_layer_io(patched, unet, watched)
    sample(patched, encode(clip, "a room"), encode(clip, "blurry"))
    for p in watched:
        x, out = seen[p]
        if p.startswith("input_blocks.4"):
            assert not torch.equal(out, unet.get_submodule(p)(x)), p  # at 5 x 6 the box is there
        else:
            assert torch.equal(out, unet.get_submodule(p)(x)), p


@pytest.fixture(scope="module")
def xl_controlnet(env):
    path = env.base / "models" / "controlnet" / "tiny_xl_openpose.safetensors"
    if not path.exists():
        save_file(env.tiny_xl.controlnet_state_dict(5), str(path))
    return comfy_nodes.ControlNetLoader().load_controlnet(path.name)[0]


def test_per_region_control_strength_at_the_three_residual_sizes(env, tiny_xl, xl_controlnet):
    model, clip, _ = tiny_xl
    pos, neg, rpos = encode(clip, "two people"), encode(clip, "blurry"), encode(clip, "a knight")
    hint = torch.zeros(1, H, W, 3)
    hint[:, 10:60, 20:30] = 0.8
    cpos, cneg = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, xl_controlnet, hint, 1.0, 0.0, 1.0)
    left = torch.zeros(1, H, W)
    left[:, :, :W // 2] = 1
    ours = sample(rn(env).install_regions(model, pn.region(rpos, neg, left, None, 0.3)), cpos, cneg)
    sizes = set()

    def hand_scale(executor, x, timesteps, context, y, control, transformer_options, **kw):
        out = {}
        for kind, residuals in control.items():
            out[kind] = []
            for r in residuals:
                if r is not None:
                    sizes.add(tuple(r.shape[-2:]))
                    m = area_average(left[0], *r.shape[-2:])  # the left half at this residual's size (3 x 3: 1.5 cells)
                    r = r * ((1 - m) + m * 0.3).to(r.dtype)
                out[kind].append(r)
        return executor(x, timesteps, context, y, out, transformer_options, **kw)

    ref_model = rn(env).install_regions(model, pn.region(rpos, neg, left, None, 1.0))
    ref_model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test", hand_scale)
    ref = sample(ref_model, cpos, cneg)
    assert sizes == {(9, 12), (5, 6), (3, 3)}  # latent/1, /2, /4
    torch.testing.assert_close(ours, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
    assert (sample(rn(env).install_regions(model, pn.region(rpos, neg, left, None, 1.0)), cpos, cneg) - ours) \
        .abs().max() > 1e-4  # the strength really acts


def test_the_editor_pose_regions_and_previews_at_sdxl_sizes(env, tiny_xl):
    """The Regions Editor at 1344x768 and Regions from Pose on the reference pose scaled to 1024x1024 (SDXL sizes);
    a regional sampling at 1344x768 reads each region's masks at the layers' real sizes (84x48 and 42x24)."""
    import numpy as np
    from PIL import Image

    model, clip, _ = tiny_xl
    boxes = [{"top": 40, "left": 16 + 440 * i, "bottom": 740, "right": 440 * (i + 1), "prompt": f"person {i}",
              "negative": "blurry", "control_strength": 1.0, "label": "", "color": "#3cb44b"} for i in range(3)]
    regions, masks, preview = node("MixOfShowRegionsEditor", clip=clip, width=1344, height=768,
                                   regions_json=json.dumps(boxes))
    assert len(regions) == 3 and masks.shape == (3, 768, 1344) and preview.shape == (1, 768, 1344, 3)
    pose = Image.open(POSES / "harry_hermione_thanos.png")
    square = torch.from_numpy(np.asarray(pose.convert("RGB").resize((1024, 1024), Image.NEAREST))).float()[None] / 255
    pose_regions, pose_masks = node("MixOfShowPoseRegions", image=square, clip=clip, prompts="a\nb\nc",
                                    negative="blurry", margin=0.05)[:2]
    assert len(pose_regions) == 3 and pose_masks.shape == (3, 1024, 1024)
    patched = rn(env).install_regions(model, regions)
    run = next(p for p in patched.model_options["transformer_options"]["patches"]["attn2_patch"]
               if hasattr(p, "run")).run
    latent = torch.zeros(1, 4, 96, 168)
    comfy.sample.sample(patched, comfy.sample.prepare_noise(latent, 0), 1, 5.0, "euler", "normal",
                        encode(clip, "three people"), encode(clip, "blurry"), latent, disable_pbar=True, seed=0)
    sizes = {key[:2] for key in run._masks if len(key) == 3}
    assert sizes == {(48, 84), (24, 42)}
    for fh, fw in sizes:  # every box keeps its place at both sizes (the reference box rule)
        expected = torch.stack([box_rule((b["top"], b["left"], b["bottom"], b["right"]), fh, fw, 768, 1344)
                                for b in boxes]).reshape(3, -1)
        assert torch.equal(run.flat_masks(fh, fw, "cpu"), expected)
