"""fusion/preview.py: the region preview picture (colours, outlines, labels) without ComfyUI."""
import re
from pathlib import Path

import numpy as np
import pytest

from fusion.regions.preview import CANVAS_GREY, PALETTE, draw_regions, grey_canvas, parse_color, region_color

REPO = Path(__file__).resolve().parents[2]


def box(height, width, top, left, bottom, right):
    m = np.zeros((height, width), np.float32)
    m[top:bottom, left:right] = 1.0
    return m


def near(image, color, tol=12):
    return np.all(np.abs(image.astype(int) - np.array(color)) <= tol, axis=-1)


def test_grey_canvas_with_filled_outlined_boxes_in_their_colours():
    masks = [box(100, 200, 10, 10, 90, 90), box(100, 200, 20, 120, 80, 190)]
    out = draw_regions(masks, ["<a1>", "b"])
    assert out.shape == (100, 200, 3) and out.dtype == np.uint8
    assert tuple(out[0, 100]) == CANVAS_GREY  # outside every box
    for i, m in enumerate(masks):
        color = np.array(region_color(i), np.float32)
        inside = np.rint(np.array(CANVAS_GREY) * 0.65 + color * 0.35)
        ys, xs = np.nonzero(m)
        centre = out[int(ys.mean()) + 15, int(xs.mean())]  # below the label
        assert np.abs(centre.astype(int) - inside).max() <= 1
        assert near(out, region_color(i), tol=0).sum() > 2 * (m.shape[0] // 3)  # outline (and label chip)


def test_labels_are_written_and_overlaps_blend_both_colours():
    masks = [box(120, 240, 0, 0, 120, 150), box(120, 240, 0, 90, 120, 240)]
    plain = draw_regions(masks, ["", ""])
    labelled = draw_regions(masks, ["<potter1>", "<hermione1>"])
    assert (plain != labelled).any(axis=-1).sum() > 50  # text pixels
    overlap = labelled[100, 120].astype(int)
    only_first = labelled[100, 40].astype(int)
    assert not np.array_equal(overlap, only_first)


def test_pose_background_is_kept_outside_and_never_modified():
    pose = np.zeros((64, 128, 3), np.uint8)
    pose[30:34, 5:120] = (255, 0, 0)
    before = pose.copy()
    out = draw_regions([box(64, 128, 0, 64, 64, 128)], ["x"], background=pose)
    assert np.array_equal(pose, before)
    assert np.array_equal(out[32, 10], [255, 0, 0])  # left half: untouched pose
    assert out[32, 100, 0] < 255  # right half: tinted


def test_masks_of_another_size_are_resized_to_the_background():
    out = draw_regions([box(32, 64, 0, 0, 32, 32)], ["left"], background=grey_canvas(64, 128))
    assert out.shape == (64, 128, 3)
    assert tuple(out[60, 120]) == CANVAS_GREY and tuple(out[60, 20]) != CANVAS_GREY


def test_custom_colours_and_non_ascii_labels():
    out = draw_regions([box(50, 50, 0, 0, 50, 50)], ["héllo ✓"], colors=[(0, 255, 0)])
    assert near(out, (0, 255, 0), tol=0).any()


@pytest.mark.parametrize("bad", ["red", "#12345", "#gggggg", 3])
def test_bad_colours_are_refused(bad):
    with pytest.raises(ValueError, match="#rrggbb"):
        parse_color(bad)


def test_mismatched_lists_and_nothing_to_draw_are_refused():
    with pytest.raises(ValueError, match="label"):
        draw_regions([box(8, 8, 0, 0, 4, 4)], [])
    with pytest.raises(ValueError, match="nothing to draw"):
        draw_regions([], [])


def test_the_editor_uses_the_same_palette():
    js = (REPO / "js" / "lib" / "regions.js").read_text()
    listed = re.search(r"PALETTE = \[([^\]]*)\]", js).group(1)
    assert tuple(re.findall(r'"(#[0-9a-f]{6})"', listed)) == PALETTE
