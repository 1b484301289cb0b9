"""fusion/regional_lora.py: the stacked masked low-rank products equal a per-region loop on dense deltas."""
import torch
import torch.nn.functional as F

from fusion.regions.blend import blend_weights
from fusion.regions.lowrank import LowRankBank

g = torch.Generator().manual_seed(0)


def randn(*shape):
    """float32 values held as float64: the bank stores float32 factors and computes in the input's dtype"""
    return torch.randn(*shape, generator=g).double()


def pairs(n_regions, out_f, in_f, ranks=(2, 4, 3), kernel=None):
    out = {}
    for r in range(n_regions):
        up = randn(out_f, ranks[r])
        down = randn(ranks[r], in_f, *kernel) if kernel else randn(ranks[r], in_f)
        out[r] = (up, down)
    return out


def test_blend_weights_are_the_attention_blend():
    masks = torch.tensor([[1.0, 1.0, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.25, 0.0]])
    w = blend_weights(masks)
    expected = torch.tensor([[1.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.5, 0.0, 0.25, 0.0]])
    torch.testing.assert_close(w, expected)  # overlap averaged, soft masks keep (1 - c) for the global output


def test_linear_equals_a_loop_over_regions():
    p = {0: pairs(3, 12, 10)[0], 2: pairs(3, 12, 10)[2]}  # region 1 has no LoRA on this layer
    x = randn(2, 6, 10)
    weights = blend_weights(torch.rand(3, 6, generator=g)).double()
    got = LowRankBank(p).linear(x, weights)
    expected = torch.zeros(2, 6, 12, dtype=torch.float64)
    for r, (up, down) in p.items():
        expected += weights[r][None, :, None] * (x @ (up @ down).T)
    torch.testing.assert_close(got, expected)
    assert LowRankBank(p).regions == [0, 2]


def test_conv_with_stride_and_padding_equals_a_loop():
    p = pairs(2, 5, 4, kernel=(3, 3))
    x = randn(2, 4, 9, 7)
    out_hw = (5, 4)  # stride 2, padding 1
    weights = blend_weights(torch.rand(2, 20, generator=g)).double()
    got = LowRankBank(p).conv(x, weights, (2, 2), (1, 1), (1, 1), out_hw)
    expected = torch.zeros(2, 5, *out_hw, dtype=torch.float64)
    for r, (up, down) in p.items():
        dense = torch.einsum("or,rikl->oikl", up, down)
        expected += weights[r].reshape(1, 1, *out_hw) * F.conv2d(x, dense, stride=2, padding=1)
    torch.testing.assert_close(got, expected)


def test_segments_apply_each_region_to_its_own_context_only():
    p = pairs(2, 8, 6)
    x = randn(3, 5 + 2 * 4, 6)  # global 5 tokens, then two regions of 4
    rows = {0: slice(5, 9), 1: slice(9, 13)}
    got = LowRankBank(p).segments(x, rows)
    expected = torch.zeros(3, 13, 8, dtype=torch.float64)
    for r, (up, down) in p.items():
        expected[:, rows[r]] = x[:, rows[r]] @ (up @ down).T
    torch.testing.assert_close(got, expected)
    assert torch.count_nonzero(got[:, :5]) == 0


def test_broadcast_puts_a_per_row_delta_on_every_pixel_by_weight():
    p = pairs(2, 7, 9)
    x = randn(2, 9)
    weights = blend_weights(torch.rand(2, 6, generator=g)).double()
    got = LowRankBank(p).broadcast(x, weights)
    expected = torch.zeros(2, 7, 6, dtype=torch.float64)
    for r, (up, down) in p.items():
        expected += (x @ (up @ down).T)[:, :, None] * weights[r][None, None, :]
    torch.testing.assert_close(got, expected)



def test_in_place_add_equals_the_output_plus_the_product():
    """The layer hooks add the up-projection into the layer's output in place: equal to the per-region loop,
    and in float32 bit for bit equal to ``out + linear(x)`` (the rounding the pinned latents have)."""
    p = {0: pairs(3, 12, 10)[0], 2: pairs(3, 12, 10)[2]}
    bank = LowRankBank(p)
    assert bank.rank == 2 + 3
    weights = blend_weights(torch.rand(3, 6, generator=g)).double()
    x, base = randn(2, 6, 10), randn(2, 6, 12)
    got = bank.add_up(bank.project(x, weights), base.clone())
    expected = base.clone()
    for r, (up, down) in p.items():
        expected += weights[r][None, :, None] * (x @ (up @ down).T)
    torch.testing.assert_close(got, expected)
    for x32, base32, w32 in ((x.float(), base.float(), weights.float()),
                             (torch.randn(2, 2048, 320), torch.randn(2, 2048, 2560), torch.rand(3, 2048))):
        bank32 = LowRankBank({r: (torch.randn(base32.shape[-1], 4), torch.randn(4, x32.shape[-1])) for r in (0, 2)})
        into = base32.clone()
        assert bank32.add_up(bank32.project(x32, w32), into).data_ptr() == into.data_ptr()  # in place
        assert torch.equal(into, base32 + bank32.linear(x32, w32))
        strided = base32.mT.contiguous().mT  # the same values, not contiguous: added through a temporary
        assert not strided.is_contiguous()
        assert torch.equal(bank32.add_up(bank32.project(x32, w32), strided), into)
