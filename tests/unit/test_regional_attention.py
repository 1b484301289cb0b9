"""The regional attention's pure parts (fusion/regions/attention.py) against straightforward loops: the
packed region contexts, the k/v split, and the blended attention computed region by region with a plain
softmax attention written here."""
from __future__ import annotations

import math

import torch

from fusion.regions.attention import ContextLayout, pack_region_contexts, region_rows, regional_attention, split_regions
from fusion.regions.blend import blend_regions


def plain_attention(q, k, v, heads, mask=None):
    """softmax(q kᵀ / √d + mask) v, head by head."""
    b, n, dim = q.shape
    d = dim // heads
    out = torch.empty(b, n, dim, dtype=q.dtype)
    for i in range(b):
        for h in range(heads):
            s = q[i, :, h * d:(h + 1) * d] @ k[i, :, h * d:(h + 1) * d].T / math.sqrt(d)
            if mask is not None:
                s = s + mask[i]
            out[i, :, h * d:(h + 1) * d] = torch.softmax(s, dim=-1) @ v[i, :, h * d:(h + 1) * d]
    return out


def test_region_contexts_are_padded_to_the_longest_and_masked():
    g = torch.Generator().manual_seed(0)
    # two regions, two chunks (positive rows, negative rows), lengths 5/3 and 7/5
    contexts = [[torch.randn(1, 5, 4, generator=g), torch.randn(1, 3, 4, generator=g)],
                [torch.randn(1, 7, 4, generator=g), torch.randn(1, 5, 4, generator=g)]]
    packed, mask, tokens = pack_region_contexts(contexts, rows_per_chunk=2, device="cpu", dtype=torch.float32)
    assert tokens == 7 and packed.shape == (4, 14, 4) and mask.shape == (8, 1, 7)
    for r, region in enumerate(contexts):
        for chunk, c in enumerate(region):
            for row in range(2):
                b = chunk * 2 + row
                got = packed[b, r * 7:(r + 1) * 7]
                assert torch.equal(got[:c.shape[1]], c[0]) and not got[c.shape[1]:].any()
                m = mask[r * 4 + b, 0]
                assert (m[:c.shape[1]] == 0).all() and (m[c.shape[1]:] < -1e30).all()
    same = [[torch.ones(1, 3, 4)], [torch.zeros(1, 3, 4)]]
    assert pack_region_contexts(same, 1, "cpu", torch.float32)[1] is None  # nothing padded: no mask


def test_split_gives_the_global_and_each_regions_keys():
    layout = ContextLayout(global_tokens=4, region_tokens=3, mask=None)
    x = torch.arange(2 * (4 + 2 * 3) * 5, dtype=torch.float32).reshape(2, 10, 5)
    global_part, regions = split_regions(x, layout, 2)
    assert torch.equal(global_part, x[:, :4])
    for r in range(2):
        for b in range(2):
            assert torch.equal(regions[r * 2 + b], x[b, layout.region_slice(r)])


def test_regional_attention_equals_a_loop_over_regions():
    g = torch.Generator().manual_seed(1)
    b, n, heads, dim, tg = 2, 6, 2, 8, 4
    q = torch.randn(b, n, dim, generator=g)
    contexts = [[torch.randn(1, 3, dim, generator=g)], [torch.randn(1, 5, dim, generator=g)]]
    packed, mask, t = pack_region_contexts(contexts, b, "cpu", torch.float32)
    k = torch.cat([torch.randn(b, tg, dim, generator=g), packed], dim=1)
    v = torch.cat([torch.randn(b, tg, dim, generator=g), packed * 0.5], dim=1)
    masks = torch.tensor([[1, 1, 0.5, 0, 0, 0], [0, 1, 0.5, 1, 0, 0]], dtype=torch.float32)
    got = regional_attention(q, k, v, heads, ContextLayout(tg, t, mask), 2, region_rows(masks), plain_attention)
    h = plain_attention(q, k[:, :tg], v[:, :tg], heads)
    expected = h.clone()
    for p in range(n):
        s = masks[:, p].sum()
        if s == 0:
            continue
        mixed = torch.zeros(b, dim)
        for r, region in enumerate(contexts):
            length = region[0].shape[1]
            kr, vr = region[0].expand(b, -1, -1), region[0].expand(b, -1, -1) * 0.5
            hr = plain_attention(q[:, p:p + 1], kr, vr, heads)[:, 0]
            mixed += masks[r, p] * hr
            assert length <= t
        c = min(float(s), 1.0)
        expected[:, p] = (1 - c) * h[:, p] + c * mixed / s
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def row_by_row(q, k, v, heads, mask=None):
    """An attention computed one query row at a time: a row's result cannot depend on which other rows
    are computed with it (the property ComfyUI's attention has, checked on the real model by the
    behaviour digests)."""
    return torch.cat([plain_attention(q[:, p:p + 1], k, v, heads, mask) for p in range(q.shape[1])], dim=1)


def test_regional_attention_on_each_regions_rows_is_the_all_rows_blend_bit_for_bit():
    """Each region's attention on its own rows only, blended row by row, gives the same bits as every
    region's attention on every row blended by blend_regions: rows no region covers, rows one region
    covers fully or partly (soft masks), rows several regions share, a region absent at this size."""
    g = torch.Generator().manual_seed(2)
    b, n, heads, dim, tg, regions = 2, 24, 2, 8, 4, 4
    q = torch.randn(b, n, dim, generator=g)
    contexts = [[torch.randn(1, 3 + r, dim, generator=g)] for r in range(regions)]
    packed, mask, t = pack_region_contexts(contexts, b, "cpu", torch.float32)
    k = torch.cat([torch.randn(b, tg, dim, generator=g), packed], dim=1)
    v = torch.cat([torch.randn(b, tg, dim, generator=g), packed * 0.5], dim=1)
    masks = torch.zeros(regions, n)
    masks[0, 2:10] = 1          # alone, then shared with region 1
    masks[1, 8:14] = 1
    masks[1, 14:17] = 0.25      # soft: partly covered
    masks[2, 16:20] = 0.5       # shared with the soft part, and alone at 0.5
    # region 3 is absent at this size; rows 0-1 and 20-23 are covered by none
    layout = ContextLayout(tg, t, mask)
    rows = region_rows(masks)
    assert len(rows.alone_rows) and len(rows.single_rows) and len(rows.shared_rows)
    got = regional_attention(q, k, v, heads, layout, regions, rows, row_by_row)
    h = row_by_row(q, k[:, :tg], v[:, :tg], heads)
    kr, vr = split_regions(k, layout, regions)[1], split_regions(v, layout, regions)[1]
    every = row_by_row(q.repeat(regions, 1, 1), kr, vr, heads, mask).reshape(regions, b, n, dim)
    assert torch.equal(got, blend_regions(h, every, masks))


def test_regions_reaching_fewer_than_four_rows_are_computed_on_every_row():
    """Below 4 query rows the CPU BLAS rounds differently: such a size keeps the every-row attention."""
    masks = torch.zeros(2, 10)
    masks[0, :3], masks[1, 3:5] = 1, 1
    rows = region_rows(masks)
    assert torch.equal(rows.gather, torch.arange(10).expand(2, -1))
    masks[0, :6] = 1
    rows = region_rows(masks)
    assert torch.equal(rows.gather[0], torch.arange(6)) and torch.equal(rows.gather[1, :2], torch.tensor([3, 4]))
    assert torch.equal(rows.shared_rows, torch.tensor([3, 4]))
    assert torch.equal(rows.alone_rows, torch.tensor([0, 1, 2, 5]))
