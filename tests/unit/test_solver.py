"""Numeric proofs for fusion/solver.py: the closed form is the minimiser the reference L-BFGS finds
(and never worse), on full-rank and rank-deficient problems, for linear and 1×1-conv layers."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from fusion.solver import (  # noqa: E402
    GramAccumulator,
    layer_objective,
    solve_closed_form,
    solve_lbfgs,
)


def _problem(out=8, d=16, rows=(20, 20, 20), rank=2, seed=0, scale=0.3):
    """W0, low-rank deltas (strength folded in) and float32 input rows per concept."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, d, generator=g) / d ** 0.5
    deltas = [scale * torch.randn(out, rank, generator=g) @ torch.randn(rank, d, generator=g) / d ** 0.5
              for _ in rows]
    xs = [torch.randn(n, d, generator=g) for n in rows]
    return w0, deltas, xs


def _grams64(xs):
    """Exact (float64) Grams: objective comparisons must not be limited by float32 Gram rounding."""
    return [x.double().T @ x.double() for x in xs]


def _objectives(w0, deltas, xs, *ws):
    g = _grams64(xs)
    return [layer_objective(w, w0, deltas, g) for w in ws]


def _null_basis(xs, tol=1e-10):
    """Orthonormal basis of the input directions no recorded row touches."""
    X = torch.cat(xs).double()
    _, s, vh = torch.linalg.svd(X, full_matrices=True)
    rank = int((s > tol * s[0]).sum())
    return vh[rank:].T


# --------------------------------------------------------------------------- (a) full rank

def test_closed_form_equals_lbfgs_full_rank():
    w0, deltas, xs = _problem(out=8, d=16, rows=(20, 20, 20))
    wc, info = solve_closed_form(w0, deltas, [x.T @ x for x in xs], return_info=True)
    assert info["method"] == "cholesky"
    wl = solve_lbfgs(w0, deltas, xs, 500)
    torch.testing.assert_close(wc, wl, atol=2e-4, rtol=0)
    oc, ol, o0 = _objectives(w0, deltas, xs, wc, wl, w0)
    assert oc > 0  # three concepts, 60 rows, 16 inputs: a genuine compromise
    assert oc <= ol + 1e-7 * o0
    assert oc < 0.5 * o0


# --------------------------------------------------------------------------- (b) rank-deficient

def test_rank_deficient_is_lbfgs_from_w0_and_minimum_change():
    w0, deltas, xs = _problem(out=8, d=64, rows=(5, 5, 5), seed=1)
    grams = [x.T @ x for x in xs]
    wc, info = solve_closed_form(w0, deltas, grams, return_info=True)
    assert info["method"] == "eigh" and info["rank"] == 15
    wl = solve_lbfgs(w0, deltas, xs, 500)
    torch.testing.assert_close(wc, wl, atol=2e-4, rtol=0)

    # the change lies in the row space: nothing along directions no row visits
    null = _null_basis(xs)
    assert null.shape[1] == 64 - 15
    change = (wc - w0).double()
    assert (change @ null).abs().max() < 1e-5 * change.abs().max()
    # and equals the explicit minimum-norm solution W0 + B G⁺ (float64 pseudo-inverse)
    g64 = _grams64(xs)
    b = sum(d.double() @ g for d, g in zip(deltas, g64))
    ref = w0.double() + b @ torch.linalg.pinv(sum(g64), hermitian=True, rtol=1e-10)
    torch.testing.assert_close(wc.double(), ref, atol=1e-5, rtol=0)

    oc, ol, o0 = _objectives(w0, deltas, xs, wc, wl, w0)
    assert oc <= ol + 1e-9 * o0
    assert oc < 1e-8 * o0  # 15 rows < 64 inputs: every concept can be met exactly


def _accumulators(xs, d):
    accs = []
    for x in xs:
        a = GramAccumulator(d)
        a.add(x)
        accs.append(a)
    return accs


@pytest.mark.parametrize("factored", [False, True])
def test_row_space_path_equals_the_gram_path(factored):
    """Few rows (30 for 256 inputs): accumulators keep them and the solve runs on K = X Xᵀ; the
    result is the Gram path's eigendecomposition result and the float64 pseudo-inverse solution."""
    w0, deltas, xs = _problem(out=12, d=256, rows=(10, 12, 8), seed=2)
    if factored:
        g = torch.Generator().manual_seed(20)
        deltas = [(torch.randn(12, 3, generator=g) * 0.2, torch.randn(3, 256, generator=g) / 16) for _ in xs]
    wr, ir = solve_closed_form(w0, deltas, _accumulators(xs, 256), return_info=True)
    we, ie = solve_closed_form(w0, deltas, [x.T @ x for x in xs], return_info=True)
    assert (ir["space"], ir["method"]) == ("rows", "cholesky") and (ie["space"], ie["method"]) == ("inputs", "eigh")
    assert ie["rank"] == 30
    torch.testing.assert_close(wr, we, atol=1e-5, rtol=0)
    g64 = _grams64(xs)
    dense = [d if torch.is_tensor(d) else d[0] @ d[1] for d in deltas]
    b = sum(d.double() @ g for d, g in zip(dense, g64))
    ref = w0.double() + b @ torch.linalg.pinv(sum(g64), hermitian=True, rtol=1e-10)
    torch.testing.assert_close(wr.double(), ref, atol=1e-6, rtol=0)
    # the change lies in the span of the rows (up to the float32 rounding of the returned weight)
    change = (wr - w0).double()
    assert (change @ _null_basis(xs)).abs().max() < 1e-6 * change.abs().max()


def test_row_space_path_with_dependent_rows():
    """Concepts recorded on the same rows (K singular): the eigendecomposition of K with the cutoff,
    same result as the Gram path; one concept's rows repeated = its Gram doubled."""
    w0, deltas, xs = _problem(out=6, d=64, rows=(9, 9, 9), seed=21)
    xs = [xs[0], xs[0].clone(), torch.cat([xs[1][:4], xs[0][:5]])]
    wr, ir = solve_closed_form(w0, deltas, _accumulators(xs, 64), return_info=True)
    we, ie = solve_closed_form(w0, deltas, [x.T @ x for x in xs], return_info=True)
    assert (ir["space"], ir["method"], ir["rank"]) == ("rows", "eigh", 13) and ie["rank"] == 13
    torch.testing.assert_close(wr, we, atol=1e-5, rtol=0)
    oc, o0 = _objectives(w0, deltas, xs, wr, w0)
    assert oc < o0


def test_rows_are_folded_into_the_gram_beyond_in_features():
    """An accumulator keeps rows up to `in` of them; more rows (one add, or several, or a merge) fold
    them into the Gram; a solve with more than `in` rows in all uses the Gram even if each concept
    still has its rows."""
    g = torch.Generator().manual_seed(22)
    x = torch.randn(70, 32, generator=g, dtype=torch.float64)
    acc = GramAccumulator(32, dtype=torch.float64)
    acc.add(x[:20])
    acc.add(x[20:32])
    assert acc.rows is not None and acc.rows.shape == (32, 32)
    torch.testing.assert_close(acc.gram, x[:32].T @ x[:32])
    acc.add(x[32:33])
    assert acc.rows is None and acc.count == 33
    acc.add(x[33:])
    torch.testing.assert_close(acc.gram, x.T @ x)

    a, b = GramAccumulator(32, dtype=torch.float64), GramAccumulator(32, dtype=torch.float64)
    a.add(x[:10])
    b.add(x[10:30])
    a.merge(b)
    assert a.rows is not None and a.count == 30
    torch.testing.assert_close(a.rows, x[:30])
    c = GramAccumulator(32, dtype=torch.float64)
    c.add(x[30:])  # 40 rows: a Gram from the start
    assert c.rows is None
    a.merge(c)
    assert a.rows is None and a.count == 70
    torch.testing.assert_close(a.gram, x.T @ x)

    w0, deltas, xs = _problem(out=5, d=32, rows=(20, 20), seed=23)
    _, info = solve_closed_form(w0, deltas, _accumulators(xs, 32), return_info=True)
    assert info["space"] == "inputs" and info["method"] == "cholesky"


def test_float32_gram_noise_is_not_inverted():
    """Rows confined to a 40-dim subspace of 96 inputs: the float32 Gram's rounding noise in the other
    56 directions must not be inverted into changes there (without a cutoff it is: the change is
    then mostly garbage along unvisited directions)."""
    g = torch.Generator().manual_seed(3)
    d = 96
    basis = torch.linalg.qr(torch.randn(d, 40, generator=g, dtype=torch.float64))[0]
    xs = [(torch.randn(30, 40, generator=g, dtype=torch.float64) @ basis.T * s).float() for s in (1.0, 30.0, 0.1)]
    null = torch.linalg.eigh(torch.eye(d, dtype=torch.float64) - basis @ basis.T)[1][:, -(d - 40):]
    w0 = torch.randn(16, d, generator=g)
    deltas = [torch.randn(16, 4, generator=g) @ torch.randn(4, d, generator=g) * 0.1 for _ in xs]

    def leak(grams, **kw):
        wc, info = solve_closed_form(w0, deltas, grams, return_info=True, **kw)
        change = (wc - w0).double()
        return float((change @ null).norm() / change.norm()), info

    leak32, info = leak([x.T @ x for x in xs])
    assert info["rank"] == 40 and leak32 < 1e-3
    leak64, info = leak(_grams64(xs))
    assert info["rank"] == 40 and leak64 < 1e-5
    leak_rows, info = leak(_accumulators(xs, d))  # 90 rows ≤ 96 inputs: the row-space path, no Gram noise
    assert info["space"] == "rows" and info["rank"] == 40 and leak_rows < 1e-5
    no_cutoff, info = leak([x.T @ x for x in xs], rcond=1e-16)
    assert info["rank"] > 40 and no_cutoff > 0.1  # what the cutoff prevents


def test_explicit_rcond_cuts_weak_directions():
    w0, deltas, xs = _problem(out=6, d=12, rows=(30, 30), seed=4)
    for x in xs:
        x[:, 0] *= 1e-2  # one input direction barely visited: eigenvalue ~4e-5 of the largest
    grams = [x.T @ x for x in xs]
    _, full = solve_closed_form(w0, deltas, grams, return_info=True)
    _, cut = solve_closed_form(w0, deltas, grams, rcond=1e-3, return_info=True)
    assert full["rank"] == 12 and cut["rank"] == 11 and cut["method"] == "eigh"


# --------------------------------------------------------------------------- (c)-(e) exact cases

@pytest.mark.parametrize("rows", [(30, 30, 30), (4, 3, 5)])
def test_identical_concepts_fuse_to_that_concept(rows):
    w0, deltas, xs = _problem(out=8, d=16, rows=rows, seed=5)
    same = [deltas[0]] * len(rows)
    wc = solve_closed_form(w0, same, [x.T @ x for x in xs])
    for x in xs:  # every concept's tuned outputs reproduced
        torch.testing.assert_close(x @ wc.T, x @ (w0 + same[0]).T, atol=1e-4, rtol=0)
    if sum(rows) >= 16:  # full rank: exactly that concept's weight
        torch.testing.assert_close(wc, w0 + same[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [40, 6])
def test_single_concept_reproduces_its_outputs(n):
    w0, deltas, xs = _problem(out=10, d=20, rows=(n,), seed=6)
    wc = solve_closed_form(w0, deltas, [xs[0].T @ xs[0]])
    torch.testing.assert_close(xs[0] @ wc.T, xs[0] @ (w0 + deltas[0]).T, atol=1e-4, rtol=0)
    assert layer_objective(wc, w0, deltas, _grams64(xs)) < 1e-9 * layer_objective(w0, w0, deltas, _grams64(xs))


def test_orthogonal_input_subspaces_are_each_reproduced():
    g = torch.Generator().manual_seed(7)
    d, k = 24, 8
    q = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    xs = [torch.randn(50, k, generator=g) @ q[:, i * k:(i + 1) * k].T for i in range(3)]
    w0 = torch.randn(12, d, generator=g)
    deltas = [torch.randn(12, 4, generator=g) @ torch.randn(4, d, generator=g) * 0.2 for _ in range(3)]
    wc = solve_closed_form(w0, deltas, [x.T @ x for x in xs])
    for x, dlt in zip(xs, deltas):
        torch.testing.assert_close(x @ wc.T, x @ (w0 + dlt).T, atol=1e-4, rtol=0)


def test_empty_concept_and_none_delta():
    w0, deltas, xs = _problem(out=6, d=10, rows=(30, 30), seed=8)
    grams = [x.T @ x for x in xs]
    base = solve_closed_form(w0, deltas, grams)
    # a third concept without rows changes nothing, whatever its delta
    with_empty = solve_closed_form(w0, deltas + [torch.randn(6, 10)], grams + [torch.zeros(10, 10)])
    torch.testing.assert_close(with_empty, base, atol=1e-6, rtol=0)
    # a concept without LoRA here (None) pulls towards W0 on its rows
    none_w = solve_closed_form(w0, [deltas[0], None], grams)
    zero_w = solve_closed_form(w0, [deltas[0], torch.zeros(6, 10)], grams)
    torch.testing.assert_close(none_w, zero_w)
    # no data at all, or no deltas at all → W0
    torch.testing.assert_close(solve_closed_form(w0, deltas, [torch.zeros(10, 10)] * 2), w0)
    torch.testing.assert_close(solve_closed_form(w0, [None, None], grams), w0)


def test_factored_deltas_equal_dense():
    g = torch.Generator().manual_seed(9)
    w0 = torch.randn(20, 12, generator=g)
    ups = [torch.randn(20, 4, generator=g) for _ in range(3)]
    downs = [torch.randn(4, 12, generator=g) * 0.1 for _ in range(3)]
    for rows in ((40, 40, 40), (3, 3, 2)):
        xs = [torch.randn(n, 12, generator=g) for n in rows]
        grams = [x.T @ x for x in xs]
        dense = solve_closed_form(w0, [u @ d for u, d in zip(ups, downs)], grams)
        fact = solve_closed_form(w0, list(zip(ups, downs)), grams)
        mixed = solve_closed_form(w0, [(ups[0], downs[0]), ups[1] @ downs[1], None], grams)
        torch.testing.assert_close(fact, dense, atol=1e-5, rtol=0)
        assert mixed.shape == dense.shape
        assert layer_objective(fact, w0, list(zip(ups, downs)), grams) == pytest.approx(
            layer_objective(dense, w0, [u @ d for u, d in zip(ups, downs)], grams), rel=1e-6)


def test_objective_is_sum_of_squared_output_errors():
    w0, deltas, xs = _problem(out=5, d=9, rows=(7, 11), seed=10)
    w = w0 + 0.1 * torch.randn(5, 9, generator=torch.Generator().manual_seed(0))
    direct = sum(((x.double() @ (w.double() - w0.double() - d.double()).T) ** 2).sum() for x, d in zip(xs, deltas))
    assert layer_objective(w, w0, deltas, _grams64(xs)) == pytest.approx(float(direct), rel=1e-10)
    assert layer_objective(w, w0, deltas, [x.T @ x for x in xs]) == pytest.approx(float(direct), rel=1e-5)
    accs = _accumulators(xs, 9)  # 7 rows kept, 11 rows folded into a Gram
    assert accs[0].rows is not None and accs[1].rows is None
    assert layer_objective(w, w0, deltas, accs) == pytest.approx(float(direct), rel=1e-5)
    only_rows = _accumulators([xs[0]], 9)
    assert layer_objective(w, w0, deltas[:1], only_rows) == pytest.approx(
        float(((xs[0].double() @ (w.double() - w0.double() - deltas[0].double()).T) ** 2).sum()), rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_closed_form_objective_never_worse_than_lbfgs(seed):
    g = torch.Generator().manual_seed(100 + seed)
    d = int(torch.randint(6, 40, (1,), generator=g))
    out = int(torch.randint(3, 24, (1,), generator=g))
    rows = tuple(int(r) for r in torch.randint(1, 2 * d, (3,), generator=g))
    w0, deltas, xs = _problem(out=out, d=d, rows=rows, seed=seed, rank=3)
    xs = [x * torch.rand(d, generator=g) * 3 for x in xs]  # unequal input scales
    wc = solve_closed_form(w0, deltas, [x.T @ x for x in xs])
    wl = solve_lbfgs(w0, deltas, xs, 300)
    oc, ol, o0 = _objectives(w0, deltas, xs, wc, wl, w0)
    assert oc <= ol + 1e-8 * o0, (d, out, rows, oc, ol)


# --------------------------------------------------------------------------- (f) Gram accumulation

def test_gram_accumulator_chunks_and_merge():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 50, 24, generator=g)
    acc = GramAccumulator(24)
    acc.add(x[0, :7])
    acc.add(x[0, 7:])               # 2-D chunks
    acc.add(x[1:].reshape(1, 5, 10, 24))  # any leading dims are rows
    rows = x.reshape(-1, 24).double()
    torch.testing.assert_close(acc.gram.double(), rows.T @ rows, rtol=1e-5, atol=1e-4)
    assert acc.count == 100 and acc.gram.dtype == torch.float32

    a, b = GramAccumulator(24), GramAccumulator(24)
    a.add(x[0])
    b.add(x[1])
    a.merge(b).merge(GramAccumulator(24))  # merging an empty one is a no-op
    torch.testing.assert_close(a.gram, acc.gram, rtol=1e-5, atol=1e-4)
    assert a.count == 100

    acc64 = GramAccumulator(24, dtype=torch.float64)
    acc64.add(x.half())  # low-precision inputs are up-cast
    assert acc64.gram.dtype == torch.float64
    xr = x.half().double().reshape(-1, 24)
    torch.testing.assert_close(acc64.gram, xr.T @ xr)

    assert torch.equal(GramAccumulator(5).gram, torch.zeros(5, 5))
    with pytest.raises(ValueError):
        acc.add(torch.randn(3, 23))
    with pytest.raises(ValueError):
        a.merge(GramAccumulator(23))


def test_wide_gram_accumulator_upper_strips():
    """Wide inputs accumulate only upper-triangle strips; the Gram read back is the full XᵀX,
    also after reading it, adding more rows and merging."""
    g = torch.Generator().manual_seed(17)
    d = 700  # > 2 strips
    x = torch.randn(3, 300, d, generator=g, dtype=torch.float64)
    acc = GramAccumulator(d, dtype=torch.float64)
    acc.add(x[0])
    acc.add(x[1])  # 600 rows: still kept
    r0 = x[:2].reshape(-1, d)
    torch.testing.assert_close(acc.gram, r0.T @ r0)
    assert torch.equal(acc.gram, acc.gram.T)
    other = GramAccumulator(d, dtype=torch.float64)
    other.add(x[2].T.reshape(1, d, 300, 1), channels_first=True)
    acc.merge(other)  # 900 rows: folded into the strips
    assert acc.rows is None
    rows = x.reshape(-1, d)
    torch.testing.assert_close(acc.gram, rows.T @ rows)
    assert torch.equal(acc.gram, acc.gram.T) and acc.count == 900


def test_gram_accumulator_conv_input():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 16, 5, 7, generator=g)  # [B, C, H, W] input of a 1×1 conv
    acc = GramAccumulator(16)
    acc.add(x, channels_first=True)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 16).double()  # B·H·W pixels
    torch.testing.assert_close(acc.gram.double(), rows.T @ rows, rtol=1e-5, atol=1e-4)
    assert acc.count == 3 * 5 * 7
    with pytest.raises(ValueError):
        acc.add(torch.randn(2, 15, 4, 4), channels_first=True)


# --------------------------------------------------------------------------- (g) conv shapes

def test_conv_weight_shapes():
    w0, deltas, xs = _problem(out=8, d=12, rows=(10, 10), seed=13)
    pix = [x.reshape(2, 5, 12).permute(0, 2, 1).reshape(2, 12, 5, 1) for x in xs]  # same rows as convs
    accs = []
    for p in pix:
        a = GramAccumulator(12)
        a.add(p, channels_first=True)
        accs.append(a)
    w0c = w0[:, :, None, None]
    d4 = [d[:, :, None, None] for d in deltas]
    wc4 = solve_closed_form(w0c, d4, [a.gram for a in accs])
    assert wc4.shape == (8, 12, 1, 1) and wc4.dtype == torch.float32
    wc2 = solve_closed_form(w0, deltas, [x.T @ x for x in xs])
    torch.testing.assert_close(wc4.reshape(8, 12), wc2, atol=1e-5, rtol=0)
    # 4-D LoRA factors [out, r, 1, 1] / [r, in, 1, 1]
    up, down = torch.randn(8, 2, 1, 1), torch.randn(2, 12, 1, 1)
    wf = solve_closed_form(w0c, [(up, down), d4[1]], [a.gram for a in accs])
    assert wf.shape == (8, 12, 1, 1)
    assert layer_objective(wf, w0c, [(up, down), d4[1]], [a.gram for a in accs]) >= 0

    wl4 = solve_lbfgs(w0c, d4, pix, 300, channels_first=True)
    assert wl4.shape == (8, 12, 1, 1)
    torch.testing.assert_close(wl4, wc4, atol=2e-4, rtol=0)
    with pytest.raises(ValueError):
        solve_closed_form(torch.randn(8, 12, 3, 3), d4, [a.gram for a in accs])


# --------------------------------------------------------------------------- (h) inference mode

def test_both_solvers_work_under_inference_mode():
    w0, deltas, xs = _problem(out=6, d=10, rows=(15, 15), seed=14)
    expected = solve_closed_form(w0, deltas, [x.T @ x for x in xs])
    outside = GramAccumulator(10)
    outside.add(xs[0])
    with torch.inference_mode():
        w0i, di, xi = w0.clone(), [d.clone() for d in deltas], [x.clone() for x in xs]
        assert w0i.is_inference()
        accs = [GramAccumulator(10) for _ in xi]
        for a, x in zip(accs, xi):
            a.add(x)
        outside.add(xi[1])  # buffer made outside, updated inside
        wc = solve_closed_form(w0i, di, accs)
        wl = solve_lbfgs(w0i, di, xi, 200)
        obj = layer_objective(wc, w0i, di, accs)
    accs[0].add(xs[0])  # buffer made inside, updated outside: must not raise
    torch.testing.assert_close(wc, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(wl, expected, atol=2e-4, rtol=0)
    assert obj >= 0 and outside.count == 30 and accs[0].count == 30


# --------------------------------------------------------------------------- (i), (j) edge cases

def test_zero_concepts_and_mismatches_raise():
    w0 = torch.randn(4, 5)
    with pytest.raises(ValueError):
        solve_closed_form(w0, [], [])
    with pytest.raises(ValueError):
        solve_lbfgs(w0, [], [], 10)
    with pytest.raises(ValueError):
        solve_closed_form(w0, [torch.zeros(4, 5)], [torch.eye(5), torch.eye(5)])
    with pytest.raises(ValueError):
        solve_closed_form(w0, [torch.zeros(4, 6)], [torch.eye(5)])
    with pytest.raises(ValueError):
        solve_closed_form(w0, [torch.zeros(4, 5)], [torch.eye(6)])
    with pytest.raises(ValueError):
        solve_lbfgs(w0, [torch.zeros(4, 5)], [torch.randn(3, 6)], 10)


def test_half_precision_inputs_give_float32():
    w0, deltas, xs = _problem(out=8, d=16, rows=(20, 20, 20), seed=15)
    grams = [x.T @ x for x in xs]
    ref = solve_closed_form(w0.half().float(), [d.half().float() for d in deltas],
                            [g.half().float() for g in grams])
    wh = solve_closed_form(w0.half(), [d.half() for d in deltas], [g.half() for g in grams])
    assert wh.dtype == torch.float32 and wh.shape == w0.shape
    torch.testing.assert_close(wh, ref, atol=1e-4, rtol=1e-4)
    wb = solve_closed_form(w0.bfloat16(), [d.bfloat16() for d in deltas], grams)
    assert wb.dtype == torch.float32
    wl = solve_lbfgs(w0.half(), [d.half() for d in deltas], [x.half() for x in xs], 20)
    assert wl.dtype == torch.float32 and wl.shape == w0.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_stay_on_device():
    w0, deltas, xs = _problem(out=8, d=64, rows=(30, 30, 5), seed=16)
    dev = torch.device("cuda")
    accs = []
    for x in xs:
        a = GramAccumulator(64)
        a.add(x.to(dev))
        accs.append(a)
    wc = solve_closed_form(w0.to(dev), [d.to(dev) for d in deltas], accs)
    assert wc.device.type == "cuda"
    ref = solve_closed_form(w0, deltas, [x.T @ x for x in xs])
    torch.testing.assert_close(wc.cpu(), ref, atol=1e-4, rtol=0)
    few = [xs[0][:20], xs[1][:20], xs[2]]  # 45 rows ≤ 64 inputs: the row-space path, on the GPU
    wr, info = solve_closed_form(w0.to(dev), [d.to(dev) for d in deltas], _accumulators([x.to(dev) for x in few], 64),
                                 return_info=True)
    assert info["space"] == "rows" and wr.device.type == "cuda"
    torch.testing.assert_close(wr.cpu(), solve_closed_form(w0, deltas, [x.T @ x for x in few]), atol=1e-4, rtol=0)
    wl = solve_lbfgs(w0.to(dev), [d.to(dev) for d in deltas], [x.to(dev) for x in xs], 100)
    assert wl.device.type == "cuda"
