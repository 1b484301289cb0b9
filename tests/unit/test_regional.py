"""Tests for fusion/regional.py (regional masks, per-layer resizing, blend, pose boxes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from boxes import boxes_to_masks, parse_box_file

from fusion.regions.blend import blend_regions
from fusion.regions.masks import box_to_mask, feature_hw_for_tokens, layer_masks, resize_masks
from fusion.regions.pose import find_pose_boxes

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]

POSES = REPO / "assets" / "poses"  # Mix-of-Show's reference poses and box files (Apache-2.0, see NOTICE.md)

BOX_FILES = ["harry_hermione_thanos.txt", "bengio_lecun_bengio.txt", "dogA_catA_dogB.txt", "harry+catA+dogA.txt"]
# Feature-map sizes of the SD1.5 UNet for a 512 (h) x 1024 (w) image.
LAYER_SIZES = [(64, 128), (32, 64), (16, 32), (8, 16)]


def _iou(a, b) -> float:
    ih = min(a[2], b[2]) - max(a[0], b[0])
    iw = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(ih, 0) * max(iw, 0)
    area = lambda x: (x[2] - x[0]) * (x[3] - x[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


# --------------------------------------------------------------------------- box_to_mask


def test_box_to_mask_basic_and_clamp():
    m = box_to_mask(6, 8, 1, 2, 4, 7)
    assert m.shape == (6, 8) and m.dtype == torch.float32
    ref = torch.zeros(6, 8)
    ref[1:4, 2:7] = 1
    assert torch.equal(m, ref)
    # clamped to the image
    m = box_to_mask(6, 8, -5, -3, 100, 100)
    assert torch.equal(m, torch.ones(6, 8))
    assert set(torch.unique(m).tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("box", [(3, 0, 3, 5), (0, 4, 6, 2), (10, 0, 20, 8), (0, -9, 6, -1)])
def test_box_to_mask_empty_raises(box):
    with pytest.raises(ValueError, match=r"\[" + ", ".join(str(v) for v in box) + r"\]"):
        box_to_mask(6, 8, *box)


# --------------------------------------------------------------------------- resize_masks


def test_resize_integer_factor_matches_area_pool():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(3, 48, 80, generator=g)
    out = resize_masks(m, 12, 10)
    ref = F.interpolate(m[None], size=(12, 10), mode="area")[0]
    assert out.shape == (3, 12, 10) and out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=1e-6)


def test_resize_upsample_matches_bilinear_and_2d_input():
    g = torch.Generator().manual_seed(1)
    m = torch.rand(5, 7, generator=g)
    out = resize_masks(m, 16, 20)
    ref = F.interpolate(m[None, None], size=(16, 20), mode="bilinear", align_corners=False)[0]
    assert out.shape == (1, 16, 20)
    assert torch.allclose(out, ref, atol=1e-6)


def test_resize_mixed_axes_and_clamp():
    m = torch.full((2, 4, 30), 1.5)  # out of range on purpose
    m[1] = -0.5
    out = resize_masks(m, 8, 7)  # grows in h, shrinks in w
    assert out.shape == (2, 8, 7)
    assert torch.equal(out[0], torch.ones(8, 7)) and torch.equal(out[1], torch.zeros(8, 7))


def test_resize_non_integer_factor_preserves_area():
    m = box_to_mask(100, 90, 13, 7, 61, 80)[None]
    out = resize_masks(m, 30, 27)
    assert out.min() >= 0 and out.max() <= 1
    assert out.sum().item() == pytest.approx(m.sum().item() * (30 * 27) / (100 * 90), rel=1e-6)


@pytest.mark.parametrize("box_file", BOX_FILES)
def test_resize_reference_boxes_per_layer(box_file):
    boxes = [b for _, b in parse_box_file(POSES / box_file)]
    assert boxes
    img_h, img_w = 512, 1024
    for fh, fw in LAYER_SIZES:
        f = img_h // fh
        assert f == img_w // fw
        for top, left, bottom, right in boxes:
            # the author's box, snapped outwards to the layer grid -> exactly binary and scaled
            t, l_ = (top // f) * f, (left // f) * f
            b, r = -(-min(bottom, img_h) // f) * f, -(-min(right, img_w) // f) * f
            aligned = resize_masks(box_to_mask(img_h, img_w, t, l_, b, r), fh, fw)[0]
            assert torch.equal(aligned, box_to_mask(fh, fw, t // f, l_ // f, b // f, r // f))
            # the author's own (non-aligned) box -> soft edges, area scaled by 1/f^2
            mask = box_to_mask(img_h, img_w, top, left, bottom, right)
            soft = resize_masks(mask, fh, fw)[0]
            assert soft.shape == (fh, fw)
            assert soft.min() >= 0 and soft.max() <= 1
            assert soft.sum().item() == pytest.approx(mask.sum().item() / f**2, rel=1e-5)
            # cells fully inside are 1, cells fully outside are 0
            inner = box_to_mask(fh, fw, -(-top // f), -(-left // f), bottom // f, right // f)
            assert torch.all(soft[inner > 0] == 1)
            assert torch.all(soft[aligned == 0] == 0)


# --------------------------------------------------------------------------- layer_masks


def test_layer_masks_token_order_matches_unet_flatten():
    g = torch.Generator().manual_seed(2)
    masks = torch.rand(2, 64, 128, generator=g)
    for fh, fw in LAYER_SIZES:
        flat = layer_masks(masks, fh, fw)
        assert flat.shape == (2, fh * fw)
        fmap = resize_masks(masks, fh, fw)[None]  # treat regions as channels: [1, R, h, w]
        tokens = fmap.flatten(2).transpose(1, 2)  # b c h w -> b (h w) c
        assert torch.equal(flat, tokens[0].T)
        # token k is (row k // fw, col k % fw)
        assert flat[1, 3 * fw + 5].item() == fmap[0, 1, 3, 5].item()


def test_feature_hw_for_tokens():
    for fh, fw in LAYER_SIZES:
        assert feature_hw_for_tokens(fh * fw, 512, 1024) == (fh, fw)
        assert feature_hw_for_tokens(fh * fw, 64, 128) == (fh, fw)
    assert feature_hw_for_tokens(64 * 64, 512, 512) == (64, 64)
    # odd latent sizes: ceil-halving (e.g. 600x800 -> latent 75x100 -> 38x50 -> 19x25 -> 10x13)
    assert feature_hw_for_tokens(10 * 13, 75, 100) == (10, 13)
    # fallback: best-aspect factorisation
    assert feature_hw_for_tokens(6 * 12, 100, 200) == (6, 12)


# --------------------------------------------------------------------------- blend_regions


def _blend_brute(h, h_regions, masks):
    """Per-pixel, per-region loop in float64, straight from the formula."""
    h = h.double()
    h_regions = h_regions.double()
    masks = masks.double()
    n_regions, batch, n_tokens, _ = h_regions.shape
    out = torch.empty_like(h)
    for b in range(batch):
        for n in range(n_tokens):
            s = 0.0
            acc = torch.zeros_like(h[b, n])
            for r in range(n_regions):
                m = float(masks[r, n])
                s += m
                acc = acc + m * h_regions[r, b, n]
            if s == 0.0:
                out[b, n] = h[b, n]
            else:
                c = min(s, 1.0)
                out[b, n] = (1 - c) * h[b, n] + c * acc / s
    return out


@pytest.mark.parametrize("kind", ["soft", "binary"])
def test_blend_matches_brute_force(kind):
    g = torch.Generator().manual_seed(3 if kind == "soft" else 4)
    R, B, N, C = 3, 2, 48, 8
    h = torch.randn(B, N, C, generator=g)
    hr = torch.randn(R, B, N, C, generator=g)
    if kind == "soft":
        masks = torch.rand(R, N, generator=g)
        masks[:, :6] = 0  # uncovered tokens
        masks[0, 6:10] = 1.0  # a full and a partial overlap
        masks[1, 6:8] = 1.0
        masks[2, 40:] = torch.rand(8, generator=g) * 0.3  # single weak region: S < 1
        masks[:2, 40:] = 0
    else:
        masks = (torch.rand(R, N, generator=g) > 0.5).float()
        masks[:, :5] = 0
        masks[:, 5:10] = 1  # triple overlap
    out = blend_regions(h, hr, masks)
    ref = _blend_brute(h, hr, masks)
    assert out.shape == (B, N, C) and out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=1e-6, rtol=0)
    if kind == "binary":
        # reference rule, spelled out
        cover = masks.sum(0)
        for n in range(N):
            if cover[n] == 0:
                assert torch.equal(out[:, n], h[:, n])
            else:
                avg = hr[masks[:, n] > 0, :, n].mean(0)
                assert torch.allclose(out[:, n], avg, atol=1e-6)


def test_blend_identical_full_masks_average():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 16, 4, generator=g)
    hr = torch.randn(2, 2, 16, 4, generator=g)
    out = blend_regions(h, hr, torch.ones(2, 16))
    assert torch.allclose(out, (hr[0] + hr[1]) / 2, atol=1e-6)


def test_blend_zero_masks_is_exactly_h():
    g = torch.Generator().manual_seed(6)
    h = torch.randn(2, 16, 4, generator=g)
    hr = torch.randn(3, 2, 16, 4, generator=g)
    assert torch.equal(blend_regions(h, hr, torch.zeros(3, 16)), h)
    assert torch.equal(blend_regions(h, hr[:0], torch.zeros(0, 16)), h)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_blend_preserves_dtype(dtype):
    g = torch.Generator().manual_seed(7)
    h = torch.randn(2, 32, 8, generator=g)
    hr = torch.randn(3, 2, 32, 8, generator=g)
    masks = torch.rand(3, 32, generator=g)
    out = blend_regions(h.to(dtype), hr.to(dtype), masks)
    assert out.dtype == dtype
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-6}[dtype]
    assert torch.allclose(out.double(), _blend_brute(h, hr, masks), atol=tol)


def test_blend_per_batch_masks_and_shape_errors():
    g = torch.Generator().manual_seed(8)
    h = torch.randn(2, 10, 4, generator=g)
    hr = torch.randn(2, 2, 10, 4, generator=g)
    masks = torch.rand(2, 2, 10, generator=g)
    out = blend_regions(h, hr, masks)
    for b in range(2):
        ref = _blend_brute(h[b : b + 1], hr[:, b : b + 1], masks[:, b])
        assert torch.allclose(out[b : b + 1].double(), ref, atol=1e-6)
    with pytest.raises(ValueError):
        blend_regions(h, hr, torch.rand(3, 10))
    with pytest.raises(ValueError):
        blend_regions(h, hr[:, :1], torch.rand(2, 10))
    with pytest.raises(ValueError):
        blend_regions(h[0], hr, torch.rand(2, 10))


def test_blend_end_to_end_with_layer_masks():
    """Box masks at 512x1024 -> 16x32 layer -> blend: tokens inside one box get that region exactly."""
    masks = boxes_to_masks(512, 1024, [[0, 0, 512, 512], [256, 256, 512, 768]])
    flat = layer_masks(masks, 16, 32)
    g = torch.Generator().manual_seed(9)
    h = torch.randn(1, 16 * 32, 4, generator=g)
    hr = torch.randn(2, 1, 16 * 32, 4, generator=g)
    out = blend_regions(h, hr, flat).reshape(1, 16, 32, 4)
    hr_ = hr.reshape(2, 1, 16, 32, 4)
    h_ = h.reshape(1, 16, 32, 4)
    assert torch.allclose(out[:, :8, :16], hr_[0, :, :8, :16])  # region 0 only
    assert torch.allclose(out[:, 8:, 8:16], (hr_[0, :, 8:, 8:16] + hr_[1, :, 8:, 8:16]) / 2)  # overlap
    assert torch.allclose(out[:, 8:, 16:24], hr_[1, :, 8:, 16:24])  # region 1 only
    assert torch.equal(out[:, :, 24:], h_[:, :, 24:])  # uncovered


# --------------------------------------------------------------------------- box files


def test_parse_reference_box_files():
    got = {name: parse_box_file(POSES / name) for name in BOX_FILES}
    assert got["bengio_lecun_bengio.txt"] == [
        ("box1", [6, 51, 512, 293]),
        ("box2", [1, 350, 512, 618]),
        ("box3", [3, 657, 512, 923]),
    ]
    assert got["harry+catA+dogA.txt"] == [
        ("box1", [0, 0, 512, 400]),
        ("region3", [60, 501, 350, 706]),
        ("region4", [57, 692, 343, 940]),
        ("region5", [280, 423, 508, 983]),
    ]
    assert [len(v) for v in got.values()] == [3, 3, 3, 4]


def test_parse_box_file_formats(tmp_path):
    p = tmp_path / "boxes.txt"
    p.write_text(
        "char1='<a1> <a2>'\n"
        "box1='[1, 2, 3, 4]'\n"
        'box2 = "[ 5,6 ,7, 8 ]"\n'
        "box3='[1, 2, 3]'\n"  # not 4 ints: ignored
        "box4='[1, 2, 3, x]'\n"
        "\n"
        "region9='[-1, 0, 10, 20]'\n"
    )
    assert parse_box_file(p) == [("box1", [1, 2, 3, 4]), ("box2", [5, 6, 7, 8]), ("region9", [-1, 0, 10, 20])]


# --------------------------------------------------------------------------- pose boxes


def _load_rgb(name):
    import cv2
    img = cv2.imread(str(POSES / name), cv2.IMREAD_COLOR)
    assert img is not None, name
    return img[:, :, ::-1].copy()


@pytest.mark.parametrize(
    "image, box_file",
    [
        ("harry_hermione_thanos.png", "harry_hermione_thanos.txt"),
        ("bengio_lecun_bengio.png", "bengio_lecun_bengio.txt"),
        ("dogA_catA_dogB.jpg", "dogA_catA_dogB.txt"),
    ],
)
def test_find_pose_boxes_reference(image, box_file):
    img = _load_rgb(image)
    found = find_pose_boxes(img)
    authors = [b for _, b in parse_box_file(POSES / box_file)]
    assert len(found) == 3, found
    assert [b[1] for b in found] == sorted(b[1] for b in found)
    for box, ref in zip(found, authors, strict=True):
        assert _iou(box, ref) >= 0.5, (box, ref)
    # same answer from a ComfyUI-style float tensor [1, H, W, 3]
    as_tensor = torch.from_numpy(img).float().div(255)[None]
    assert find_pose_boxes(as_tensor) == found


def test_find_pose_boxes_single_person():
    found = find_pose_boxes(_load_rgb("harry+catA+dogA_pose.png"))
    assert len(found) >= 1
    for top, left, bottom, right in found:
        assert 0 <= top < bottom <= 512 and 0 <= left < right <= 1024


def test_find_pose_boxes_synthetic():
    """Two stick figures, one with a detached forearm and head, a frame line, and specks."""
    import cv2
    import numpy as np
    img = np.zeros((256, 512, 3), np.uint8)
    cv2.rectangle(img, (0, 0), (511, 255), (80, 120, 200), 2)  # frame touching the figures
    for cx, detached in ((120, False), (360, True)):
        cv2.line(img, (cx, 60), (cx, 160), (255, 0, 0), 4)  # body
        cv2.line(img, (cx, 160), (cx - 30, 255), (0, 255, 0), 4)  # legs reach the frame
        cv2.line(img, (cx, 160), (cx + 30, 255), (0, 255, 0), 4)
        cv2.line(img, (cx - 40, 80), (cx + 40, 80), (0, 0, 255), 4)  # shoulders
        start = 95 if detached else 80
        cv2.line(img, (cx + 40, start), (cx + 50, 130), (255, 255, 0), 4)  # forearm
        head_y = 30 if detached else 50
        cv2.circle(img, (cx, head_y), 12, (255, 0, 255), 4)
    img[10, 250] = 255  # specks
    img[200:202, 240:242] = 255
    found = find_pose_boxes(img, margin=0.0)
    assert len(found) == 2, found
    (t0, l0, b0, r0), (t1, l1, b1, r1) = found
    assert l0 < 120 < r0 < l1 < 360 < r1
    assert r0 < 240 and l1 > 251 and t0 > 10  # far specks dropped, not merged
    assert t1 <= 30 - 12 and r1 >= 360 + 50  # head and forearm merged into the second figure
    assert find_pose_boxes(np.zeros((64, 64, 3), np.uint8)) == []


def _dots(n_side: int, size: int = 1024, step: int = 23):
    """An image of ``n_side**2`` white 4x4 dots on black, ``step`` px apart."""
    import numpy as np
    img = np.zeros((size, size, 3), np.uint8)
    for y in range(8, 8 + n_side * step, step):
        for x in range(8, 8 + n_side * step, step):
            img[y:y + 4, x:x + 4] = 255
    return img


def test_find_pose_boxes_thousands_of_dots_is_bounded_work():
    """The issue's pose image of thousands of dots took 53 s: one pass over the pixels now, no per-dot loop."""
    import cv2
    import numpy as np

    from fusion.regions.pose import MAX_POSE_SHAPES, _component_boxes

    img = _dots(44)  # 1936 dots, all pieces (too small to be a person), so no box
    calls = []
    assert find_pose_boxes(img, check_interrupt=lambda: calls.append(1)) == []
    assert len(calls) <= 5  # once per stage: nothing runs per component
    fg = (img.max(axis=2) > 40).astype(np.uint8)
    _, labels = cv2.connectedComponents(cv2.dilate(fg, np.ones((5, 5), np.uint8)), connectivity=8)
    counts, boxes = _component_boxes(fg, labels, 10.0)
    assert len(boxes) == 1936 <= MAX_POSE_SHAPES and set(counts.tolist()) == {16}
    assert boxes[:2].tolist() == [[8, 8, 12, 12], [31, 8, 35, 12]]
    with pytest.raises(ValueError, match=r"pose image has 2025 separate shapes \(at most 2000 are searched\): "
                                         r"this does not look like an OpenPose image"):
        find_pose_boxes(_dots(45, step=22))


def test_pose_box_merging_takes_rounds_not_restarts():
    """A chain of 400 stacked pieces merges in one round of one all-pairs test, not in 399 merge-and-rescan steps."""
    import numpy as np

    from fusion.regions.pose import _merge_large

    chain = np.array([[100, 10 * i, 140, 10 * i + 8] for i in range(400)])  # nested, 2 px apart
    merged, rounds = _merge_large(chain, 4000, 0.5, 0.8, 0.1)
    assert merged.tolist() == [[100, 0, 140, 3998]] and rounds == 1
    apart = np.array([[50 * i, 0, 50 * i + 40, 40] for i in range(400)])  # side by side: nothing merges
    merged, rounds = _merge_large(apart, 4000, 0.5, 0.8, 0.1)
    assert np.array_equal(merged, apart) and rounds == 1


def test_find_pose_boxes_checks_for_interrupts():
    import cv2
    import numpy as np
    img = np.zeros((256, 512, 3), np.uint8)
    for cx in (120, 360):
        cv2.line(img, (cx, 60), (cx, 200), (255, 0, 0), 4)
        cv2.line(img, (cx - 40, 80), (cx + 40, 80), (0, 0, 255), 4)
        cv2.circle(img, (cx, 30), 12, (255, 0, 255), 4)  # a detached head: one merging round
    calls = []
    found = find_pose_boxes(img, margin=0.0, check_interrupt=lambda: calls.append(1))
    assert len(found) == 2 and len(calls) >= 4

    class Interrupted(Exception):
        pass

    def stop():
        raise Interrupted

    with pytest.raises(Interrupted):
        find_pose_boxes(img, check_interrupt=stop)
