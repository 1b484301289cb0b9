"""Issue 8: each region's own LoRA inside its own region, in one UNet pass, without fusion.

Checked against implementations written here: the stock merged model (ComfyUI's own weight patching)
for a region covering the whole image, and a brute-force per-layer loop on unmerged weights, with the
region masks rasterised by the reference box rule written out here, for two and three regions."""
import math

import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import pack_nodes as pn
import pytest
import torch
import torch.nn.functional as F
from comfy_env import execution_error, node, run_prompt
from layer_io import record_layer_io
from lora_files import TINY_LOCON, lora_factors, write_diffusers_lora, write_kohya_lora, write_loha

import nodes as comfy_nodes

H, W = 64, 128  # pixels; latent 8x16


@pytest.fixture(scope="module")
def loras(env):
    """Three kohya LoRA files for the tiny model (whole transformer blocks, text encoder, and LoCon:
    3x3 convs, a strided conv, time-embedding projections) and a diffusers-format twin of the first."""
    folder = env.base / "models" / "loras"
    names = []
    for i in range(3):
        name = f"rl_char{i}.safetensors"
        write_kohya_lora(folder / name, lora_factors(200 + i, convs=TINY_LOCON, scale=0.7))
        names.append(name)
    write_diffusers_lora(folder / "rl_char0_diffusers.safetensors", lora_factors(200, scale=0.7))
    write_kohya_lora(folder / "rl_char0_kohya_nolocon.safetensors", lora_factors(200, scale=0.7))
    write_loha(folder / "rl_loha.safetensors", lora_factors(209, text=False, attention_only=True))
    return names


def concept(model, clip, name, words, concepts=None, strength=1.0):
    return node("MixOfShowLoRAConcept", model=model, clip=clip, lora_name=name, trigger_words=words,
                strength_model=strength, strength_clip=strength, concepts=concepts)


def encode(clip, text):
    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


def box(top, left, bottom, right):
    return pn.box_mask(W, H, top, left, bottom, right)


def sample(model, pos, neg, steps=1, seed=3, cfg=5.0):
    latent = torch.zeros(1, 4, H // 8, W // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, latent, disable_pbar=True,
                               seed=seed)


def install(env, model, regions):
    return env.pack("nodes.glue.regional").install_regions(model, regions)


def test_one_full_region_equals_the_merged_model(env, tiny, loras):
    """A region covering the whole image with character A's model = sampling A's merged model (the stock
    LoRA loader's weights), including its LoCon convs and time-embedding layers."""
    model, clip, _ = tiny
    model_a, clip_a, _ = concept(model, clip, loras[0], "ohwx man")
    merged, merged_clip = comfy_nodes.LoraLoader().load_lora(model, clip, loras[0], 1.0, 1.0)
    pos, neg = encode(clip_a, "a photo of ohwx man"), encode(clip_a, "blurry")
    torch.testing.assert_close(pos[0][0], encode(merged_clip, "a photo of ohwx man")[0][0])
    regions = pn.region(pos, neg, box(0, 0, H, W), model=model_a)
    # cfg 1: one noise prediction per step (cfg > 1 multiplies float32 rounding by the guidance scale)
    ours = sample(install(env, model, regions), encode(clip, "a room"), encode(clip, "blurry"), cfg=1.0)
    ref = sample(merged, pos, neg, cfg=1.0)
    scale = float(ref.abs().max())
    torch.testing.assert_close(ours, ref, atol=1e-5 * scale, rtol=0)
    plain = sample(install(env, model, pn.region(pos, neg, box(0, 0, H, W))), pos, neg, cfg=1.0)
    assert (plain - ref).abs().max() > 1e-2 * scale  # the LoRA really acts


# --------------------------------------------------------------------------- brute force

def reference_box_mask(b, fh, fw):
    """The reference rule, written out: rows ceil(top*h/H):floor(bottom*h/H), columns likewise."""
    top, left, bottom, right = b
    m = torch.zeros(fh, fw)
    m[math.ceil(top * fh / H):math.floor(bottom * fh / H), math.ceil(left * fw / W):math.floor(right * fw / W)] = 1
    return m


def blend(boxes, fh, fw):
    """Per region, its weight at every pixel of an fh x fw map: m_r * min(S, 1) / S."""
    masks = [reference_box_mask(b, fh, fw) for b in boxes]
    total = sum(masks)
    out = []
    for m in masks:
        w = torch.zeros(fh, fw)
        covered = total > 0
        w[covered] = m[covered] * total[covered].clamp(max=1) / total[covered]
        out.append(w)
    return out


def dense_deltas(env, region_model, base):
    """diffusion-model module path -> ΔW (dense, unmerged: strength * alpha/rank * up @ down)."""
    out = {}
    for key, entries in region_model.patches.items():
        extra = [e for e in entries if not any(e is b for b in base.patches.get(key, []))]
        for strength, adapter, *_ in extra:
            up, down, alpha = adapter.weights[0].float(), adapter.weights[1].float(), adapter.weights[2]
            scale = strength * (alpha / down.shape[0] if alpha is not None else 1.0)
            d = scale * (up.flatten(1) @ down.flatten(1))
            path = key[len("diffusion_model."):-len(".weight")]
            shape = base.model.diffusion_model.get_submodule(path).weight.shape
            out[path] = out.get(path, 0) + d.reshape(shape)
    return out


def brute_force(env, base, regions_spec):
    """The pack's regional attention (tested on its own elsewhere) plus, written here, every patched
    layer as W0 x + sum_r w_r delta_r(x) by explicit per-region loops on unmerged weights."""
    boxes = [b for b, _, _, _ in regions_spec]
    regions = None
    for b, pos, neg, _ in regions_spec:
        regions = pn.region(pos, neg, box(*b), regions)
    patched = install(env, base, regions)
    unet = base.model.diffusion_model
    deltas = [dense_deltas(env, m, base) if m is not None else {} for *_, m in regions_spec]
    latent_hw = (H // 8, W // 8)
    block_hw = {}
    handles = []

    def hw_of_tokens(n):
        h, w = latent_hw
        while h * w > n:
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    def hook_for(path, module):
        def hook(_m, args, out):
            x = args[0]
            out = out.clone()
            if path.endswith(("attn2.to_k", "attn2.to_v")):
                # every prompt here is one 77-token chunk; the regions' contexts are the last R * 77 rows
                # (after the global context, or alone: the pack projects them once per sampling)
                start = x.shape[1] - len(regions_spec) * 77
                for r, d in enumerate(deltas):
                    if path in d and start >= 0:
                        seg = slice(start + r * 77, start + (r + 1) * 77)
                        out[:, seg] += F.linear(x[:, seg], d[path].to(x.dtype))
                return out
            if path.endswith("emb_layers.1"):
                fh, fw = block_hw[path]
                weights = blend(boxes, fh, fw)
                out4 = out[:, :, None, None].expand(-1, -1, fh, fw).clone()
                for r, d in enumerate(deltas):
                    if path in d:
                        out4 += weights[r][None, None] * F.linear(x, d[path].to(x.dtype))[:, :, None, None]
                return out4
            if isinstance(module, torch.nn.Conv2d):
                weights = blend(boxes, out.shape[-2], out.shape[-1])
                for r, d in enumerate(deltas):
                    if path in d:
                        y = F.conv2d(x, d[path].to(x.dtype), stride=module.stride, padding=module.padding)
                        out += weights[r][None, None] * y
                return out
            fh, fw = hw_of_tokens(x.shape[1])
            weights = blend(boxes, fh, fw)
            for r, d in enumerate(deltas):
                if path in d:
                    out += weights[r].reshape(1, -1, 1) * F.linear(x, d[path].to(x.dtype))
            return out
        return hook

    paths = sorted({p for d in deltas for p in d})
    for path in paths:
        module = unet.get_submodule(path)
        handles.append(module.register_forward_hook(hook_for(path, module)))
        if path.endswith("emb_layers.1"):
            handles.append(unet.get_submodule(path[:-len(".emb_layers.1")]).register_forward_pre_hook(
                lambda _m, args, p=path: block_hw.__setitem__(p, tuple(args[0].shape[-2:]))))
    return patched, handles


@pytest.mark.parametrize("count", [2, 3])
def test_regions_with_their_own_loras_match_brute_force(env, tiny, loras, count):
    model, clip, _ = tiny
    spec = []
    boxes = [(0, 0, 64, 56), (8, 40, 60, 96), (0, 88, 64, 128)][:count]  # overlapping, soft at coarse layers
    for i, b in enumerate(boxes):
        m_i, c_i, _ = concept(model, clip, loras[i], f"char{i} person")
        spec.append((b, encode(c_i, f"a photo of char{i} person"), encode(c_i, "blurry"), m_i))
    regions = without = None
    for b, pos, neg, m in spec:
        regions = pn.region(pos, neg, box(*b), regions, model=m)
        without = pn.region(pos, neg, box(*b), without)
    g_pos, g_neg = encode(clip, "people in a park"), encode(clip, "lowres")
    ours = sample(install(env, model, regions), g_pos, g_neg, steps=2)
    ref_model, handles = brute_force(env, model, spec)
    try:
        ref = sample(ref_model, g_pos, g_neg, steps=2)
    finally:
        for h in handles:
            h.remove()
    scale = float(ref.abs().max())
    torch.testing.assert_close(ours, ref, atol=1e-5 * scale, rtol=0)
    assert (sample(install(env, model, without), g_pos, g_neg, steps=2) - ours).abs().max() > 1e-3 * scale  # LoRAs act


def test_a_region_empty_at_a_layer_leaves_that_layer_exact(env, tiny, loras):
    """A 16x16 box vanishes at the 2x4 and 1x2 feature maps (reference box rule): there every patched
    layer's output is exactly the sampling model's output for its input."""
    model, clip, _ = tiny
    m_a, c_a, _ = concept(model, clip, loras[0], "ohwx man")
    regions = pn.region(encode(c_a, "ohwx man"), encode(c_a, "blurry"), box(0, 0, 16, 16), model=m_a)
    assert reference_box_mask((0, 0, 16, 16), 1, 2).sum() == 0 and reference_box_mask((0, 0, 16, 16), 4, 8).sum() > 0
    unet = model.model.diffusion_model
    watched = {"middle_block.1.transformer_blocks.0.attn1.to_q", "middle_block.1.transformer_blocks.0.ff.net.2",
               "middle_block.1.proj_in", "input_blocks.1.1.transformer_blocks.0.attn1.to_q"}
    patched = install(env, model, regions)
    seen = record_layer_io(patched, unet, watched)
    sample(patched, encode(clip, "a room"), encode(clip, "blurry"))
    for p in watched:
        x, out = seen[p]
        base_out = unet.get_submodule(p)(x)  # no hooks now: the sampling model's layer alone
        if p.startswith("middle_block"):
            assert torch.equal(out, base_out), p
        else:
            assert not torch.equal(out, base_out), p  # at 8x16 the box is there: the LoRA acts


def test_kohya_and_diffusers_files_give_identical_results(env, tiny, loras):
    model, clip, _ = tiny
    out = []
    for name in ("rl_char0_kohya_nolocon.safetensors", "rl_char0_diffusers.safetensors"):
        m, c, _ = concept(model, clip, name, "ohwx man")
        regions = pn.region(encode(c, "ohwx man"), encode(c, "blurry"), box(0, 0, 64, 64), model=m)
        out.append(sample(install(env, model, regions), encode(clip, "a room"), encode(clip, "blurry")))
    torch.testing.assert_close(out[0], out[1], atol=1e-6 * float(out[0].abs().max()), rtol=0)


def test_loha_and_other_bases_are_refused_clearly(env, tiny, loras):
    model, clip, _ = tiny
    with pytest.raises(ValueError, match=r"rl_loha\.safetensors: .*'loha' patch; only plain low-rank LoRA"):
        concept(model, clip, "rl_loha.safetensors", "loha person")
    # the stock loader takes the LoHa; as a region's model it is refused naming the region and the patch type
    loha_model, _ = comfy_nodes.LoraLoader().load_lora(model, clip, "rl_loha.safetensors", 1.0, 0.0)
    regions = pn.region(encode(clip, "x"), encode(clip, "y"), box(0, 0, 64, 64), model=loha_model)
    with pytest.raises(ValueError, match=r"^region 1: diffusion_model\..*'loha' patch"):
        install(env, model, regions)
    # a region model on another checkpoint
    other, other_clip, _ = env.tiny.build_all("narrow", 1)
    m_other, other_clip, other_concepts = concept(other, other_clip, loras[1], "char1 person")
    regions = pn.region(encode(clip, "a dog"), encode(clip, "y"), box(0, 0, 64, 64))
    regions = pn.region(pn.text_encode(other_clip, other_concepts, "char1 person waving"), encode(clip, "y"),
                        box(0, 0, 64, 64), regions, model=m_other)
    # counted from 1 as the editor and the previews count, with its label and the file its MODEL was loaded with
    with pytest.raises(ValueError, match=r"^region 2 \(char1 person waving; its MODEL has rl_char1\.safetensors "
                                         r"\([0-9a-f]{8}\)\): its MODEL is not the sampling MODEL's base"):
        install(env, model, regions)
    # trigger words colliding between two concepts name both files
    m1, c1, cs = concept(model, clip, loras[0], "ohwx man")
    with pytest.raises(ValueError, match=r"'ohwx'.*rl_char1.*'ohwx man'.*rl_char0|rl_char1.*collide.*rl_char0"):
        concept(m1, c1, loras[1], "ohwx", cs)


def test_regions_without_a_model_are_unchanged_bit_for_bit(env, tiny, loras):
    """The fused/base path: a region without model, and a region whose model has no patch beyond the
    sampling model, sample exactly the same, and no region-LoRA wrapper is installed."""
    model, clip, _ = tiny
    sampling, s_clip, _ = concept(model, clip, loras[0], "ohwx man")
    pos, neg = encode(s_clip, "ohwx man"), encode(s_clip, "blurry")
    plain = pn.region(pos, neg, box(0, 0, 64, 64))
    same = pn.region(pos, neg, box(0, 0, 64, 64), model=sampling)
    a, b = install(env, sampling, plain), install(env, sampling, same)
    key = env.pack("nodes.names").REGIONAL_WRAPPER
    for patched in (a, b):
        wrappers = patched.model_options["transformer_options"].get("wrappers", {})
        assert all(key not in per_key for per_key in wrappers.values())
    g = encode(s_clip, "a room")
    assert torch.equal(sample(a, g, neg), sample(b, g, neg))


def test_three_characters_each_lora_in_its_region_through_the_executor(env, loras):
    """The graph users build: the base checkpoint, one LoRA as Concept chain per character, each region's
    prompt encoded with its chain's CLIP and given its chain's MODEL, the Regional KSampler on the base."""
    tiny = {"class_type": "TinySD15Loader", "inputs": {"unet": "narrow", "seed": 0}}
    g = {"1": tiny, "30": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "lowres"}},
         "31": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "three friends"}}}
    regions = None
    for i, (top, left, bottom, right) in enumerate([(0, 0, 64, 48), (0, 40, 64, 88), (0, 80, 64, 128)]):
        c, e, m, r = str(10 + i), str(15 + i), str(20 + i), str(25 + i)
        g[c] = {"class_type": "MixOfShowLoRAConcept", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": loras[i], "trigger_words": f"char{i} person",
            "strength_model": 1.0, "strength_clip": 1.0}}
        g[e] = {"class_type": "MixOfShowTextEncode", "inputs": {"clip": [c, 1], "concepts": [c, 2],
                                                                "text": f"a photo of char{i} person"}}
        g[m] = {"class_type": "MixOfShowBoxMask", "inputs": {"width": W, "height": H, "top": top, "left": left,
                                                             "bottom": bottom, "right": right}}
        g[r] = {"class_type": "MixOfShowRegion",
                "inputs": {"positive": [e, 0], "negative": ["30", 0], "mask": [m, 0], "model": [c, 0],
                           **({"regions": regions} if regions else {})}}
        regions = [r, 0]
    g["40"] = {"class_type": "EmptyLatentImage", "inputs": {"width": W, "height": H, "batch_size": 1}}
    g["41"] = {"class_type": "MixOfShowRegionalSampler", "inputs": {
        "model": ["1", 0], "positive": ["31", 0], "negative": ["30", 0], "latent_image": ["40", 0], "regions": regions,
        "seed": 1, "steps": 2, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    g["42"] = {"class_type": "VAEDecode", "inputs": {"samples": ["41", 0], "vae": ["1", 2]}}
    g["43"] = {"class_type": "SaveImage", "inputs": {"images": ["42", 0], "filename_prefix": "region_loras"}}
    ex, _ = run_prompt(g, "region-loras")
    assert ex.success, execution_error(ex) or ex.validation
    assert len(ex.history_result["outputs"]["43"]["images"]) == 1


def test_full_size_sd15_full_region_equals_the_merged_model(env, sd15):
    """The same proof on the full-size SD1.5 layout (rank-4 whole-block LoRA, 256x256, one noise
    prediction): the region's LoRA applied in its region = ComfyUI's merged weights."""
    model, clip = sd15
    name = "rl_full_sd15.safetensors"
    write_kohya_lora(env.base / "models" / "loras" / name,
                     lora_factors(300, model_channels=320, text_layers=12, text_intermediate=3072, scale=0.5))
    model_a, clip_a, _ = concept(model, clip, name, "ohwx man")
    merged, _ = comfy_nodes.LoraLoader().load_lora(model, clip, name, 1.0, 1.0)
    pos, neg = encode(clip_a, "a photo of ohwx man"), encode(clip_a, "blurry")
    regions = pn.region(pos, neg, pn.box_mask(256, 256, 0, 0, 256, 256), model=model_a)
    latent = torch.zeros(1, 4, 32, 32)
    noise = comfy.sample.prepare_noise(latent, 11)

    def run(m, p, n):
        return comfy.sample.sample(m, noise, 1, 1.0, "euler", "normal", p, n, latent, disable_pbar=True, seed=11)

    ours = run(install(env, model, regions), encode(clip, "a room"), encode(clip, "blurry"))
    ref = run(merged, pos, neg)
    scale = float(ref.abs().max())
    torch.testing.assert_close(ours, ref, atol=1e-5 * scale, rtol=0)
    assert (run(model, pos, neg) - ref).abs().max() > 1e-3 * scale  # the LoRA really acts


def test_region_contexts_are_projected_once_per_sampling(env, tiny, loras):
    """The regions' contexts are the same in every step: each layer's to_k/to_v projects them (with the
    regions' LoRA deltas) once per sampling, and every UNet call projects the global context alone; a
    second sampling projects them again (its weights may differ)."""
    model, clip, _ = tiny
    regions = None
    for i, b in enumerate([(0, 0, 64, 72), (0, 56, 64, 128)]):
        m_i, c_i, _ = concept(model, clip, loras[i], f"char{i} person")
        regions = pn.region(encode(c_i, f"a photo of char{i} person"), encode(c_i, "blurry"), box(*b), regions,
                            model=m_i)
    patched = install(env, model, regions)
    unet = model.model.diffusion_model
    lengths: dict[str, list[int]] = {}
    handles = [module.register_forward_hook(lambda _m, args, _out, p=path: lengths.setdefault(p, []).append(
        args[0].shape[1])) for path, module in unet.named_modules() if path.endswith("attn2.to_k")]
    try:
        pos, neg = encode(clip, "two people"), encode(clip, "lowres")
        sample(patched, pos, neg, steps=3)
        first = {p: list(v) for p, v in lengths.items()}
        sample(patched, pos, neg, steps=3)
    finally:
        for h in handles:
            h.remove()
    assert first and all(v.count(2 * 77) == 1 and v.count(77) == 3 and len(v) == 4 for v in first.values())
    assert all(v.count(2 * 77) == 2 and v.count(77) == 6 for v in lengths.values())


def test_a_lora_changed_between_samplings_with_the_same_sigmas_is_seen(env, tiny, loras):
    """The regions' projected keys and values are kept for one sampling only. A SIGMAS output cached by
    ComfyUI is the same tensor in the next queue run, while a stock Load LoRA after the regions may have
    changed to_k/to_v in between: the second sampling must use the new weights (equal to a sampling whose
    sigmas are a fresh tensor), not the first one's keys and values."""
    model, clip, _ = tiny
    regions = None
    for b, text in [((0, 0, 64, 72), "a knight"), ((0, 56, 64, 128), "a witch")]:
        regions = pn.region(encode(clip, text), encode(clip, "blurry"), box(*b), regions)
    patched = install(env, model, regions)
    lora_d = comfy_nodes.LoraLoader().load_lora(patched, clip, loras[1], 1.0, 0.0)[0]
    pos, neg = encode(clip, "two people"), encode(clip, "lowres")
    latent = torch.zeros(1, 4, H // 8, W // 8)
    noise = comfy.sample.prepare_noise(latent, 5)
    sigmas = patched.get_model_object("model_sampling").sigma(torch.tensor([999.0, 500.0, 1.0]))
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    sampler = comfy.samplers.sampler_object("euler")

    def run(m, s):
        return comfy.sample.sample_custom(m, noise, 5.0, sampler, s, pos, neg, latent, disable_pbar=True, seed=5)

    first = run(patched, sigmas)
    same_sigmas = run(lora_d, sigmas)
    fresh_sigmas = run(lora_d, sigmas.clone())
    assert torch.equal(same_sigmas, fresh_sigmas)
    assert (same_sigmas - first).abs().max() > 1e-3 * first.abs().max()  # the LoRA really changed to_k/to_v
