"""Issue 3: pose control with regions — stock ControlNet loader/apply with the regional sampler,
per-region control strength, regions from a reference pose image, masks at every layer, and
region/model concept mismatches."""
import math
from pathlib import Path

import comfy.patcher_extension
import comfy.sample
import numpy as np
import pack_nodes as pn
import pytest
import torch
import torch.nn.functional as F
from boxes import parse_box_file
from PIL import Image
from safetensors.torch import save_file

import nodes as comfy_nodes

POSES = Path(__file__).resolve().parents[2] / "assets" / "poses"  # in the repo (Apache-2.0, see NOTICE)
H, W = 64, 128


@pytest.fixture(scope="module")
def wide(env):
    return env.tiny.build_all("wide", 0)


@pytest.fixture(scope="module")
def controlnet(env):
    path = env.base / "models" / "controlnet" / "tiny_openpose.safetensors"
    if not path.exists():
        save_file(env.tiny.controlnet_state_dict("wide", 5), str(path))
    return comfy_nodes.ControlNetLoader().load_controlnet(path.name)[0]


def rn(env):
    return env.pack("nodes.glue.regional")


def pose_hint():
    g = torch.Generator().manual_seed(0)
    img = torch.zeros(1, H, W, 3)
    img[:, 10:50, 20:30] = torch.rand(3, generator=g)
    img[:, 12:60, 90:100] = torch.rand(3, generator=g)
    return img


def sample(model, pos, neg, seed=3):
    latent = torch.zeros(1, 4, H // 8, W // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, 2, 5.0, "euler", "normal", pos, neg, latent, disable_pbar=True, seed=seed)


def with_control(controlnet, pos, neg, strength=1.0):
    return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, controlnet, pose_hint(), strength, 0.0, 1.0)


def left_half():
    m = torch.zeros(1, H, W)
    m[:, :, : W // 2] = 1
    return m


def test_per_region_control_strength_equals_hand_scaled_residuals(env, wide, controlnet):
    model, clip, _ = wide
    pos = comfy_nodes.CLIPTextEncode().encode(clip, "two people")[0]
    neg = comfy_nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    rpos = comfy_nodes.CLIPTextEncode().encode(clip, "a knight")[0]
    cpos, cneg = with_control(controlnet, pos, neg)
    scaled = pn.region(rpos, neg, left_half(), None, 0.3)
    unscaled = pn.region(rpos, neg, left_half(), None, 1.0)
    ours = sample(rn(env).install_regions(model, scaled), cpos, cneg)

    def hand_scale(executor, x, timesteps, context, y, control, transformer_options, **kw):
        out = {}
        for kind, residuals in control.items():
            out[kind] = []
            for r in residuals:
                if r is not None:
                    weight = torch.ones_like(r[:, :1])
                    weight[..., : r.shape[-1] // 2] = 0.3  # the left half, at this residual's size
                    r = r * weight
                out[kind].append(r)
        return executor(x, timesteps, context, y, out, transformer_options, **kw)

    ref_model = rn(env).install_regions(model, unscaled)
    ref_model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test", hand_scale)
    ref = sample(ref_model, cpos, cneg)
    torch.testing.assert_close(ours, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
    unscaled_out = sample(rn(env).install_regions(model, unscaled), cpos, cneg)
    assert (ours - unscaled_out).abs().max() > 1e-4  # the strength really acts


def test_full_region_with_zero_control_strength_is_sampling_without_control(env, wide, controlnet):
    model, clip, _ = wide
    pos = comfy_nodes.CLIPTextEncode().encode(clip, "a castle")[0]
    neg = comfy_nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    cpos, cneg = with_control(controlnet, pos, neg)
    full = pn.region(pos, neg, torch.ones(1, H, W), None, 0.0)
    torch.testing.assert_close(sample(rn(env).install_regions(model, full), cpos, cneg),
                               sample(model, pos, neg), atol=1e-6, rtol=0)


def test_masks_reach_every_layer_at_the_right_size_and_place(env):
    """Reference boxes of a 1024x512 pose as painted masks (no box): at each of the 4 feature sizes the
    layer mask is the box scaled down (area-averaged), in row-major token order."""
    masks_of = env.pack("fusion.regions.masks")
    boxes = parse_box_file(POSES / "harry_hermione_thanos.txt")
    masks = torch.stack([masks_of.box_to_mask(512, 1024, *b) for _, b in boxes])
    for fh, fw in ((64, 128), (32, 64), (16, 32), (8, 16)):
        flat = masks_of.region_layer_masks(masks, [None] * len(boxes), fh, fw)
        assert flat.shape == (3, fh * fw)
        for r, (_, (top, left, bottom, right)) in enumerate(boxes):
            f = 512 // fh
            expected = F.avg_pool2d(masks[r][None, None], f)[0, 0].reshape(-1)
            torch.testing.assert_close(flat[r], expected, atol=1e-5, rtol=0)
            grid = flat[r].reshape(fh, fw)
            assert grid[(top + bottom) // 2 // f, (left + right) // 2 // f] == 1.0


def test_box_regions_follow_the_reference_box_rule(env, tiny):
    """Regions made by the box node carry their box: every layer rasterises it as Mix-of-Show does,
    rows ceil(top*h/H):floor(bottom*h/H), columns likewise (written out here), exactly; an edited
    mask (here: inverted twice, a new tensor) is area-averaged like any painted mask."""
    _, clip, _ = tiny
    cond = comfy_nodes.CLIPTextEncode().encode(clip, "a person")[0]
    boxes = parse_box_file(POSES / "harry_hermione_thanos.txt")
    regions = None
    for _, (top, left, bottom, right) in boxes:
        regions = pn.region(cond, cond, pn.box_mask(1024, 512, top, left, bottom, right), regions)
    assert [r.box for r in regions] == [tuple(b) for _, b in boxes]
    data = env.pack("nodes.glue.regional").RegionalSampling(regions)
    for fh, fw in ((64, 128), (32, 64), (16, 32), (8, 16)):
        flat = data.flat_masks(fh, fw, "cpu")
        for r, (_, (top, left, bottom, right)) in enumerate(boxes):
            expected = torch.zeros(fh, fw)
            expected[math.ceil(top * fh / 512):math.floor(bottom * fh / 512),
                     math.ceil(left * fw / 1024):math.floor(right * fw / 1024)] = 1
            assert torch.equal(flat[r].reshape(fh, fw), expected), (r, fh)
    edited = 1.0 - (1.0 - pn.box_mask(1024, 512, *boxes[0][1]))
    assert pn.region(cond, cond, edited)[0].box is None


def test_regions_from_a_reference_pose_image(env, wide, write_edlora):
    image = torch.from_numpy(np.asarray(Image.open(POSES / "harry_hermione_thanos.png").convert("RGB"),
                                        dtype=np.float32) / 255.0)[None]
    _, clip, _ = wide
    regions, masks, _preview = pn.pose_regions(image, clip, "a knight\n\na wizard\na giant", "blurry", 0.05)
    assert len(regions) == 3 and masks.shape == (3, 512, 1024)
    centers = [m.nonzero().float().mean(0)[1].item() for m in masks]
    assert centers == sorted(centers)
    with pytest.raises(ValueError, match="found 3 skeleton"):
        pn.pose_regions(image, clip, "only one line", "", 0.05)


def test_region_encoded_with_another_chain_is_refused(env, wide, write_edlora):
    model, clip, _ = wide
    load = pn.load_edlora
    a = write_edlora("chain_a.pth", tokens=("<ca1>",), seed=60, model_channels=64)
    b = write_edlora("chain_b.pth", tokens=("<cb1>",), seed=61, model_channels=64)
    model_a, clip_a, concepts_a = load(model, clip, a, 0.7, 0.7)
    _, clip_b, concepts_b = load(model, clip, b, 0.7, 0.7)
    enc = pn.text_encode
    neg = comfy_nodes.CLIPTextEncode().encode(clip_a, "blurry")[0]
    ok = pn.region(enc(clip_a, concepts_a, "a <ca1>"), neg, left_half())
    bad = pn.region(enc(clip_b, concepts_b, "a <cb1>"), neg, left_half(), ok)
    rn(env).install_regions(model_a, ok)
    with pytest.raises(ValueError, match=r"^region 2 \(<cb1>\): .*chain_b\.pth"):
        rn(env).install_regions(model_a, bad)
