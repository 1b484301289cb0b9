"""Numeric proofs for fusion/solver.py: the factored closed form is the minimiser the reference L-BFGS
finds (and never worse), equals an independent float64 dense solve (pseudo-inverse, or ridge), on
full-rank and rank-deficient problems, in the row space and against the Gram matrix; the folded inputs
hold what the solve needs and no more."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from fusion.merge.solver import FoldedInputs, LayerProblem, layer_objective, solve_closed_form, solve_lbfgs  # noqa: E402


def _problem(out=8, d=16, rows=(20, 20, 20), rank=2, seed=0, scale=0.3, lora=None):
    """Per concept (up with strength folded in, down) and float32 input rows; ``lora[i]`` False: no LoRA."""
    g = torch.Generator().manual_seed(seed)
    ups = [scale * torch.randn(out, rank, generator=g) / d ** 0.25 for _ in rows]
    downs = [torch.randn(rank, d, generator=g) / d ** 0.25 for _ in rows]
    xs = [torch.randn(n, d, generator=g) for n in rows]
    lora = lora or [True] * len(rows)
    return [(u, v) if on else None for u, v, on in zip(ups, downs, lora, strict=True)], xs


def _fold(deltas, xs, d, *, keep_rows=True, chunk=None, dtype=torch.float32, name="m"):
    acc = FoldedInputs(d, keep_rows=keep_rows, dtype=dtype)
    for delta, x in zip(deltas, xs, strict=True):
        acc.begin_concept({} if delta is None else {name: delta[1]})
        for part in (x.split(chunk) if chunk else [x]):
            acc.add(part)
    return acc, LayerProblem(name, {i: dl[0] for i, dl in enumerate(deltas) if dl is not None})


def _dense(deltas):
    return [None if dl is None else dl[0].double() @ dl[1].double() for dl in deltas]


def _reference_solution(deltas, xs, ridge=0.0, rtol=1e-10):
    """The straightforward float64 formula: (Σ ΔWi Gi)(G + λI)⁻¹ (pseudo-inverse for λ = 0)."""
    grams = [x.double().T @ x.double() for x in xs]
    g = sum(grams)
    b = sum(dw @ gi for dw, gi in zip(_dense(deltas), grams, strict=True) if dw is not None)
    if ridge:
        return b @ torch.linalg.inv(g + ridge * float(g.trace()) / g.shape[0] * torch.eye(g.shape[0], dtype=g.dtype))
    return b @ torch.linalg.pinv(g, hermitian=True, rtol=rtol)


def _objective(change, deltas, xs):
    """Σ_i ‖Xi (Δ − ΔWi)ᵀ‖² from the rows, float64."""
    return sum(float(((x.double() @ (change - (0 if dw is None else dw)).T) ** 2).sum())
               for dw, x in zip(_dense(deltas), xs, strict=True))


def _product(pair):
    return pair[0].double() @ pair[1].double()


def _null_basis(xs, tol=1e-10):
    """Orthonormal basis of the input directions no recorded row touches."""
    X = torch.cat(xs).double()
    _, s, vh = torch.linalg.svd(X, full_matrices=True)
    return vh[int((s > tol * s[0]).sum()):].T


def _lbfgs_on_rows(deltas, xs, iterations, out, d):
    """The published optimiser, verbatim in spirit: W-space L-BFGS on the float64 rows, MSE loss, best iterate."""
    with torch.inference_mode(False), torch.enable_grad():
        X = torch.cat(xs).double()
        T = torch.cat([x.double() @ (torch.zeros(out, d, dtype=torch.float64) if dw is None else dw).T
                       for dw, x in zip(_dense(deltas), xs, strict=True)])
        w = torch.zeros(out, d, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], lr=1, max_iter=iterations, history_size=25, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-16, tolerance_change=1e-16)
        best = {"loss": math.inf, "w": w.detach().clone()}

        def closure():
            opt.zero_grad()
            loss = (F.linear(X, w) - T).square().sum() / (X.shape[0] * out)
            loss.backward()
            if float(loss.detach()) < best["loss"]:
                best.update(loss=float(loss.detach()), w=w.detach().clone())
            return loss

        opt.step(closure)
        state = opt.state[w]
        return best["w"], (state["n_iter"], state["func_evals"])


# --------------------------------------------------------------------------- closed form vs references

@pytest.mark.parametrize("keep_rows", [True, False])
@pytest.mark.parametrize("rows", [(20, 20, 20), (5, 5, 5), (10, 0, 8)])
def test_closed_form_is_the_float64_pseudo_inverse_solution(rows, keep_rows):
    deltas, xs = _problem(out=8, d=16 if sum(rows) > 40 else 64, rows=rows, seed=1)
    d = xs[0].shape[1]
    acc, p = _fold(deltas, xs, d, keep_rows=keep_rows)
    (pair,), info = (lambda r: (list(r[0].values()), r[1]))(solve_closed_form(acc, [p], return_info=True))
    assert info["space"] == ("rows" if keep_rows and sum(rows) <= d else "inputs")
    assert pair[0].shape == (8, 2 * sum(1 for dl in deltas if dl is not None)) and pair[1].shape[1] == d
    ref = _reference_solution(deltas, xs)
    tol = 2e-6 if keep_rows or sum(rows) >= d else 2e-5  # a float32 Gram of rank-deficient rows rounds more
    torch.testing.assert_close(_product(pair), ref, atol=tol * float(ref.abs().max()), rtol=0)
    if sum(rows) < d:  # rank-deficient: nothing along directions no row visits (the minimum change)
        change = _product(pair)
        assert (change @ _null_basis(xs)).abs().max() < 1e-6 * change.abs().max()


@pytest.mark.parametrize("keep_rows", [True, False])
def test_ridge_is_the_float64_direct_solve(keep_rows):
    for rows, d in (((20, 20, 20), 16), ((5, 7, 4), 64)):
        deltas, xs = _problem(out=6, d=d, rows=rows, seed=2)
        # (a float64 Gram: this checks the formula; the float32 rounding of a tiny ridge is not the point)
        acc, p = _fold(deltas, xs, d, keep_rows=keep_rows, dtype=torch.float32 if keep_rows else torch.float64)
        for ridge in (1e-4, 1e-2, 1.0):
            pair = solve_closed_form(acc, [p], ridge=ridge)["m"]
            ref = _reference_solution(deltas, xs, ridge=ridge)
            torch.testing.assert_close(_product(pair), ref, atol=1e-6 * float(ref.abs().max()), rtol=0)
    # more ridge, smaller change; ridge 0 is the unregularised minimiser
    norms = [float(_product(solve_closed_form(acc, [p], ridge=r)["m"]).norm()) for r in (0.0, 1e-3, 1e-1, 10.0)]
    assert norms == sorted(norms, reverse=True)


def test_closed_form_equals_lbfgs_full_rank_and_rank_deficient():
    for rows, d in (((20, 20, 20), 16), ((5, 5, 5), 64)):
        deltas, xs = _problem(out=8, d=d, rows=rows, seed=3)
        acc, p = _fold(deltas, xs, d)
        cf = solve_closed_form(acc, [p])["m"]
        lb, info = solve_lbfgs(acc, p, 500, return_info=True)
        ref = _reference_solution(deltas, xs)
        torch.testing.assert_close(_product(lb), ref, atol=2e-4 * float(ref.abs().max()), rtol=0)
        o_cf, o_lb, o_0 = (layer_objective(acc, p, cf), layer_objective(acc, p, lb), layer_objective(acc, p))
        assert o_cf <= o_lb + 1e-9 * o_0 and o_cf < 0.5 * o_0
        assert info["best_loss"] == pytest.approx(o_lb / (sum(rows) * 8), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("iterations", [3, 8])
def test_lbfgs_in_the_column_space_of_u_has_the_reference_iterates(iterations):
    """Every W-space iterate is U·C, and L-BFGS on the orthonormal coordinates Y (Δ = Q Y, first trial
    step as in W) is the same optimiser: after a few iterations (far from converged, ill-conditioned
    inputs) both give the same weight and spend the same iterations and evaluations."""
    deltas, xs = _problem(out=10, d=24, rows=(40, 30, 35), seed=4, lora=[True, False, True])
    for x in xs:
        x.mul_(torch.logspace(0, -2, 24))
    acc, p = _fold(deltas, xs, 24, keep_rows=False, dtype=torch.float64)
    (q, y), info = solve_lbfgs(acc, p, iterations, return_info=True)
    ref, counts = _lbfgs_on_rows(deltas, xs, iterations, 10, 24)
    assert float((ref - _reference_solution(deltas, xs)).norm()) > 0.5 * float(ref.norm())  # far from converged
    torch.testing.assert_close(_product((q, y)), ref, atol=1e-6 * float(ref.abs().max()), rtol=0)
    assert (info["n_iter"], info["func_evals"]) == counts


@pytest.mark.parametrize("seed", range(4))
def test_closed_form_objective_never_worse_than_lbfgs(seed):
    deltas, xs = _problem(out=6, d=20, rows=(7, 9, 11), seed=10 + seed)
    acc, p = _fold(deltas, xs, 20)
    o_cf = layer_objective(acc, p, solve_closed_form(acc, [p])["m"])
    o_lb = layer_objective(acc, p, solve_lbfgs(acc, p, 200))
    assert o_cf <= o_lb * (1 + 1e-9) + 1e-12


def test_float32_gram_noise_is_not_inverted():
    """Rows confined to a 40-dim subspace of 96 inputs: the float32 Gram's rounding noise in the other 56
    directions must not be inverted into changes there (without the cutoff it is: the change is then
    mostly garbage along unvisited directions)."""
    g = torch.Generator().manual_seed(3)
    d = 96
    basis = torch.linalg.qr(torch.randn(d, 40, generator=g, dtype=torch.float64))[0]
    xs = [(torch.randn(30, 40, generator=g, dtype=torch.float64) @ basis.T * s).float() for s in (1.0, 30.0, 0.1)]
    null = torch.linalg.eigh(torch.eye(d, dtype=torch.float64) - basis @ basis.T)[1][:, -(d - 40):]
    deltas = [(torch.randn(16, 4, generator=g) * 0.1, torch.randn(4, d, generator=g)) for _ in xs]

    def leak(keep_rows, **kw):
        acc, p = _fold(deltas, xs, d, keep_rows=keep_rows)
        pair, info = solve_closed_form(acc, [p], return_info=True, **kw)
        change = _product(pair["m"])
        return float((change @ null).norm() / change.norm()), info

    leak32, info = leak(False)
    assert info["rank"] == 40 and leak32 < 1e-3
    leak_rows, info = leak(True)  # 90 rows ≤ 96 inputs: the row space, no Gram noise
    assert info["space"] == "rows" and info["rank"] == 40 and leak_rows < 1e-5
    no_cutoff, info = leak(False, rcond=1e-16)
    assert info["rank"] > 40 and no_cutoff > 0.1  # what the cutoff prevents
    with_ridge, info = leak(False, ridge=1e-3)
    assert info["method"] == "cholesky" and with_ridge < 1e-3  # the ridge protects the same directions


def test_explicit_rcond_cuts_weak_directions():
    deltas, xs = _problem(out=6, d=12, rows=(30, 30), seed=4)
    for x in xs:
        x[:, 0] *= 1e-2  # one input direction barely visited: eigenvalue ~1e-4 of the largest
    acc, p = _fold(deltas, xs, 12)
    pair, info = solve_closed_form(acc, [p], rcond=1e-3, return_info=True)
    assert info["method"] == "eigh" and info["rank"] == 11
    torch.testing.assert_close(_product(pair["m"]), _reference_solution(deltas, xs, rtol=1e-3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("rows", [(6, 6), (30, 30)])
def test_identical_concepts_fuse_to_that_concept(rows):
    deltas, xs = _problem(out=5, d=16, rows=rows, seed=5)
    deltas = [deltas[0], (deltas[0][0].clone(), deltas[0][1].clone())]  # U has repeated columns
    acc, p = _fold(deltas, xs, 16)
    for pair in (solve_closed_form(acc, [p])["m"], solve_lbfgs(acc, p, 300)):
        err = layer_objective(acc, p, pair)
        assert err < 1e-6 * layer_objective(acc, p)  # 0 up to the float32 Gram's rounding


def test_orthogonal_input_subspaces_are_each_reproduced():
    g = torch.Generator().manual_seed(6)
    d = 24
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    xs = [torch.randn(40, 8, generator=g) @ basis[:, 8 * i:8 * (i + 1)].T for i in range(3)]
    deltas = [(torch.randn(7, 2, generator=g), torch.randn(2, d, generator=g)) for _ in xs]
    acc, p = _fold(deltas, xs, d)
    change = _product(solve_closed_form(acc, [p])["m"])
    for (u, v), x in zip(deltas, xs, strict=True):  # each concept's outputs on its own inputs: exactly its own layer
        torch.testing.assert_close(x.double() @ change.T, x.double() @ (u.double() @ v.double()).T, atol=1e-4, rtol=0)


def test_concepts_without_a_lora_or_rows_and_nothing_recorded():
    deltas, xs = _problem(out=6, d=10, rows=(20, 15, 0), seed=7, lora=[True, False, True])
    acc, p = _fold(deltas, xs, 10)
    pair = solve_closed_form(acc, [p])["m"]
    torch.testing.assert_close(_product(pair), _reference_solution(deltas, xs), atol=1e-6, rtol=0)
    # concept 1 (no LoRA) pulls towards W0 on its rows: the change is smaller there than concept 0's own
    assert float((xs[1].double() @ _product(pair).T).norm()) < float((xs[1].double() @ _dense(deltas)[0].T).norm())
    empty = FoldedInputs(10)
    empty.begin_concept({"m": deltas[0][1]})
    pair, info = solve_closed_form(empty, [LayerProblem("m", {0: deltas[0][0]})], return_info=True)
    assert info["method"] == "zero" and float(pair["m"][1].abs().max()) == 0.0


def test_modules_of_one_group_are_solved_together_with_their_own_results():
    g = torch.Generator().manual_seed(8)
    d = 20
    xs = [torch.randn(15, d, generator=g) for _ in range(3)]
    mods = {m: [(torch.randn(out, 2, generator=g), torch.randn(2, d, generator=g)) if on else None
                for on in present]
            for m, out, present in (("q", 6, (1, 1, 1)), ("k", 4, (1, 0, 1)), ("v", 9, (0, 0, 1)))}
    acc = FoldedInputs(d)
    for i, x in enumerate(xs):
        acc.begin_concept({m: dl[i][1] for m, dl in mods.items() if dl[i] is not None})
        acc.add(x)
    problems = [LayerProblem(m, {i: dl[i][0] for i in range(3) if dl[i] is not None}) for m, dl in mods.items()]
    together = solve_closed_form(acc, problems)
    for m, dl in mods.items():
        torch.testing.assert_close(_product(together[m]), _reference_solution(dl, xs), atol=1e-6, rtol=0)


def test_objective_is_the_sum_of_squared_output_errors():
    deltas, xs = _problem(out=5, d=12, rows=(6, 8, 5), seed=9, lora=[True, False, True])
    change = (torch.randn(5, 3), torch.randn(3, 12))
    expected = _objective(_product(change), deltas, xs)
    for keep_rows in (True, False):
        acc, p = _fold(deltas, xs, 12, keep_rows=keep_rows)
        assert layer_objective(acc, p, change) == pytest.approx(expected, rel=1e-5)
        assert layer_objective(acc, p) == pytest.approx(_objective(torch.zeros(5, 12, dtype=torch.float64), deltas, xs),
                                                        rel=1e-5)


# --------------------------------------------------------------------------- folded inputs

def test_folded_inputs_hold_the_gram_and_right_hand_sides():
    g = torch.Generator().manual_seed(11)
    d = 32
    downs = [torch.randn(3, d, generator=g) for _ in range(3)]
    xs = [torch.randn(n, d, generator=g) for n in (10, 12, 40)]  # 22 rows kept, the third concept folds them
    acc = FoldedInputs(d)
    for i, x in enumerate(xs):
        acc.begin_concept({"a": downs[i][:2], "b": downs[i][2:]})
        for part in x.split(7):
            acc.add(part)
        if i == 1:
            assert acc.in_row_mode and torch.equal(acc.rows(1), xs[1])
    assert not acc.in_row_mode and acc.count == 62 and acc.concepts == 3
    x64 = [x.double() for x in xs]
    torch.testing.assert_close(acc.gram(torch.float64), sum(x.T @ x for x in x64), atol=1e-4, rtol=1e-5)
    for i in range(3):
        torch.testing.assert_close(acc.rhs(i, "a", torch.float64), downs[i][:2].double() @ x64[i].T @ x64[i],
                                   atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(acc.rhs(i, "b", torch.float64), downs[i][2:].double() @ x64[i].T @ x64[i],
                                   atol=1e-3, rtol=1e-5)
    assert acc.rhs(0, "missing") is None
    with pytest.raises(RuntimeError, match="folded"):
        acc.rows(0)


def test_folded_memory_does_not_grow_with_the_number_of_concepts():
    """Gram mode keeps G (in²) plus r×in per concept and module: from 3 to 14 concepts only the small part grows."""
    d, r = 256, 4

    def held_bytes(n):
        g = torch.Generator().manual_seed(n)
        acc = FoldedInputs(d)
        for _ in range(n):
            acc.begin_concept({"q": torch.randn(r, d, generator=g)})
            acc.add(torch.randn(300, d, generator=g))
        held = acc.held_bytes()
        assert held["rows"] == 0 and held["downs"] == r * d * 4  # only the current concept's D is stacked
        return sum(held.values())

    small, large = held_bytes(3), held_bytes(14)
    assert large - small == 11 * r * d * 4  # the M of the 11 extra concepts, nothing else
    assert large < 1.5 * d * d * 4


def test_wide_groups_keep_only_the_upper_triangle_and_rows_while_they_are_smaller():
    """Issue 22: a wide Gram is held as its upper-triangle strips (well under in² floats), rows are kept while they
    take no more than those strips, and the Gram read back is the full symmetric Σ XᵀX."""
    g = torch.Generator().manual_seed(21)
    d = 1280
    acc = FoldedInputs(d)
    limit = acc.row_limit
    assert 0.5 * d < limit < 0.65 * d
    acc.begin_concept({"m": torch.randn(2, d, generator=g)})
    x = torch.randn(limit + 1, d, generator=g)
    acc.add(x[:limit])
    assert acc.in_row_mode and acc.held_bytes()["rows"] == limit * d * 4
    acc.add(x[limit:])
    held = acc.held_bytes()
    assert not acc.in_row_mode and held["rows"] == 0
    assert limit * d * 4 <= held["gram"] < (limit + 1) * d * 4 < 0.65 * d * d * 4
    gram = acc.gram(torch.float64)
    assert torch.equal(gram, gram.mT) and acc.gram_is_mirrored
    torch.testing.assert_close(gram, x.double().T @ x.double(), atol=2e-3, rtol=1e-5)


def test_wide_gram_upper_strips_and_conv_inputs():
    g = torch.Generator().manual_seed(12)
    d = 1100  # several strips
    x = torch.randn(1300, d, generator=g)
    acc = FoldedInputs(d)
    acc.begin_concept({"m": torch.randn(2, d, generator=g)})
    acc.add(x[:700])
    acc.add(x[700:])
    torch.testing.assert_close(acc.gram(torch.float64), x.double().T @ x.double(), atol=2e-3, rtol=1e-5)
    conv = torch.randn(2, 6, 5, 4, generator=g)  # [B, C, H, W]: 40 rows of 6 channels
    acc = FoldedInputs(6, keep_rows=False)
    acc.begin_concept({})
    acc.add(conv, channels_first=True)
    rows = conv.permute(0, 2, 3, 1).reshape(-1, 6)
    assert acc.count == 40
    torch.testing.assert_close(acc.gram(), rows.T @ rows, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        acc.add(torch.randn(1, 5, 2, 2), channels_first=True)


def test_conv_factors_half_precision_and_inference_mode():
    deltas, xs = _problem(out=6, d=10, rows=(30, 25), seed=13)
    conv = [(u[:, :, None, None], v[:, :, None, None]) for u, v in deltas]
    with torch.inference_mode():  # as ComfyUI runs nodes
        acc, p = _fold(conv, [x.half() for x in xs], 10)
        pair = solve_closed_form(acc, [p])["m"]
        lb = solve_lbfgs(acc, p, 50)
    assert pair[0].dtype == torch.float32 and pair[0].shape == (6, 4)
    ref = _reference_solution(deltas, [x.half().float() for x in xs])
    torch.testing.assert_close(_product(pair), ref, atol=1e-4, rtol=0)
    assert layer_objective(acc, p, lb) <= 1.01 * layer_objective(acc, p, pair) + 1e-6


def test_bad_inputs_raise():
    acc = FoldedInputs(8)
    with pytest.raises(RuntimeError, match="begin_concept"):
        acc.add(torch.randn(2, 8))
    with pytest.raises(ValueError, match="8 wide"):
        acc.begin_concept({"m": torch.randn(2, 9)})
    acc.begin_concept({"m": torch.randn(2, 8)})
    with pytest.raises(ValueError, match="last dim"):
        acc.add(torch.randn(3, 7))
    with pytest.raises(ValueError, match="at least one concept"):
        solve_closed_form(acc, [LayerProblem("m", {})])
    with pytest.raises(ValueError, match=">= 0"):
        solve_closed_form(acc, [LayerProblem("m", {0: torch.randn(3, 2)})], ridge=-1.0)
    with pytest.raises(ValueError):
        FoldedInputs(0)
    acc.add(torch.full((2, 8), float("nan")))
    with pytest.raises(ValueError, match="non-finite"):
        solve_closed_form(acc, [LayerProblem("m", {0: torch.randn(3, 2)})])


@pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)
def test_cuda_inputs_are_solved_on_the_device():
    deltas, xs = _problem(out=8, d=32, rows=(40, 40), seed=14)
    dev = torch.device("cuda")
    for keep_rows in (True, False):
        acc, p = _fold([(u.to(dev), v.to(dev)) for u, v in deltas], [x.to(dev) for x in xs], 32, keep_rows=keep_rows)
        pair = solve_closed_form(acc, [p])["m"]
        assert pair[0].device.type == "cuda" and acc.device.type == "cuda"
        torch.testing.assert_close(_product(pair).cpu(), _reference_solution(deltas, xs), atol=1e-5, rtol=0)
        assert solve_lbfgs(acc, p, 20)[1].device.type == "cuda"
