"""Issue 4 (pure part): gradient-fusion orchestration helpers and fused bundles."""
import pytest
import torch

from fusion import gradient_fusion as gf
from fusion.bundle import FusedBundle, is_bundle, load_bundle, save_bundle
from fusion.edlora import EDLoRAError


def test_prompts_use_tokens_in_file_order():
    assert gf.concept_prompts(["<c1>", "<c2>"]) == ("photo of a <c1> <c2>", "<c1> <c2>")
    assert gf.concept_prompts(["<x>"]) == ("photo of a <x>", "<x>")
    with pytest.raises(ValueError):
        gf.concept_prompts([])


def test_lora_delta_linear_and_conv():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)
    torch.testing.assert_close(gf.lora_delta(up, down, 0.7), 0.7 * up @ down)
    d4 = gf.lora_delta(up[:, :, None, None], down[:, :, None, None], 0.7)
    assert d4.shape == (6, 5)
    torch.testing.assert_close(d4, 0.7 * up @ down)
    w = torch.randn(6, 5, 1, 1)
    assert gf.restore_shape(gf.as_matrix(w), w).shape == w.shape


def test_input_groups_share_recordings():
    groups = gf.group_modules([
        "a.attn1.to_q", "a.attn1.to_k", "a.attn1.to_v", "a.attn1.to_out.0", "a.attn2.to_k", "a.attn2.to_v",
        "a.attn2.to_q", "l.0.self_attn.k_proj", "l.0.self_attn.v_proj", "l.0.mlp.fc1"])
    assert groups["a.attn1.to_q"] == ["a.attn1.to_k", "a.attn1.to_q", "a.attn1.to_v"]
    assert groups["a.attn2.to_k"] == ["a.attn2.to_k", "a.attn2.to_v"]
    assert groups["l.0.self_attn.q_proj"] == ["l.0.self_attn.k_proj", "l.0.self_attn.v_proj"]  # q not LoRA'd
    assert groups["a.attn2.to_q"] == ["a.attn2.to_q"] and groups["l.0.mlp.fc1"] == ["l.0.mlp.fc1"]


def test_gram_sqrt_reproduces_the_gram():
    x = torch.randn(7, 12, dtype=torch.float64)
    g = x.T @ x  # rank 7 of 12
    r = gf.gram_sqrt(g)
    torch.testing.assert_close(r.T @ r, g, atol=1e-9, rtol=1e-9)


def test_cache_keys_change_with_every_input():
    s = gf.FusionSettings()
    base = gf.cache_key("base", [("d1", 1.0, 1.0), ("d2", 1.0, 1.0)], s)
    assert base == gf.cache_key("base", [("d1", 1.0, 1.0), ("d2", 1.0, 1.0)], gf.FusionSettings())
    others = {
        gf.cache_key("other", [("d1", 1.0, 1.0), ("d2", 1.0, 1.0)], s),
        gf.cache_key("base", [("dX", 1.0, 1.0), ("d2", 1.0, 1.0)], s),
        gf.cache_key("base", [("d1", 0.9, 1.0), ("d2", 1.0, 1.0)], s),
        gf.cache_key("base", [("d1", 1.0, 0.9), ("d2", 1.0, 1.0)], s),
        gf.cache_key("base", [("d1", 1.0, 1.0)], s),
        gf.cache_key("base", [("d1", 1.0, 1.0), ("d2", 1.0, 1.0)], gf.FusionSettings(steps=4)),
        gf.cache_key("base", [("d1", 1.0, 1.0), ("d2", 1.0, 1.0)], gf.FusionSettings(solver="lbfgs")),
        gf.cache_key("base", [("d1", 1.0, 1.0), ("d2", 1.0, 1.0)], gf.FusionSettings(seed=1)),
    }
    assert base not in others and len(others) == 8
    assert gf.text_stats_key("c", "d", 1.0) != gf.text_stats_key("c", "d", 0.5)
    with pytest.raises(ValueError):
        gf.FusionSettings(solver="adam")


def test_tensor_fingerprint_sees_values_and_shape():
    t = torch.arange(10000, dtype=torch.float32)
    assert gf.tensor_fingerprint(t) == gf.tensor_fingerprint(t.clone())
    assert gf.tensor_fingerprint(t) != gf.tensor_fingerprint(t + 1)
    assert gf.tensor_fingerprint(t) != gf.tensor_fingerprint(t.reshape(100, 100))


def _problem(n_concepts=2, out=6, d=10, rows=4, conv=False, seed=0, identical=False):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, d, generator=g)
    deltas = [torch.randn(out, d, generator=g) * 0.3 for _ in range(n_concepts)]
    xs = [torch.randn(rows, d, generator=g) for _ in range(n_concepts)]
    if identical:
        deltas = [deltas[0]] * n_concepts
    if conv:
        w0 = w0[:, :, None, None]
    return gf.LayerProblem("m", w0, deltas, rows=xs)


def test_single_concept_is_its_merged_weight():
    p = _problem(1, conv=True)
    w = gf.solve_layers([p])["m"]
    assert w.shape == p.w0.shape
    torch.testing.assert_close(gf.as_matrix(w), gf.as_matrix(p.w0) + p.deltas[0])
    p.deltas = [None]
    torch.testing.assert_close(gf.solve_layers([p])["m"], p.w0)


def test_closed_form_through_helpers():
    p = _problem(3, rows=4, d=10)  # 12 rows for 10 inputs: full rank, nonzero objective
    w = gf.solve_layers([p], "closed_form")["m"]
    assert gf.objective(w, p) < gf.objective(p.w0, p)
    # from Grams instead of rows: same answer
    q = gf.LayerProblem("m", p.w0, p.deltas, grams=[gf.gram_of_rows(x) for x in p.rows])
    torch.testing.assert_close(gf.solve_layers([q])["m"], w, atol=1e-4, rtol=1e-4)
    # identical concepts fuse to that concept (on the recorded span: exactly its weight here)
    ident = _problem(2, rows=8, d=6, identical=True)
    torch.testing.assert_close(gf.solve_layers([ident])["m"], ident.w0 + ident.deltas[0], atol=1e-4, rtol=1e-4)
    # a conv-shaped weight keeps its shape and dtype
    c = _problem(2, conv=True)
    c.w0 = c.w0.half()
    wc = gf.solve_layers([c])["m"]
    assert wc.shape == c.w0.shape and wc.dtype == torch.float16


def test_lbfgs_mode_on_grams_reaches_the_closed_form_objective():
    p = _problem(2, rows=3, d=8)  # rank-deficient: 6 rows for 8 inputs
    q = gf.LayerProblem("m", p.w0, p.deltas, grams=[gf.gram_of_rows(x) for x in p.rows])
    cf = gf.solve_layer(q, "closed_form")
    lb = gf.solve_layer(q, "lbfgs", iterations=200)
    assert gf.objective(cf, q) <= gf.objective(lb, q) + 1e-4
    assert gf.objective(lb, q) < 1e-3 * gf.objective(p.w0, q) + 1e-4
    torch.testing.assert_close(lb, cf, atol=1e-3, rtol=1e-3)  # both the minimum-change solution


def test_bundle_round_trip(tmp_path):
    b = FusedBundle(model={"diffusion_model.x.weight": torch.randn(4, 3).half()},
                    clip={"clip_l.transformer.y.weight": torch.randn(2, 2)},
                    concepts=[{"name": "a.pth", "tokens": ["<a1>", "<a2>"], "digest": "d"}],
                    embeddings={"<a1>": torch.randn(16, 1, 768), "<a2>": torch.randn(16, 1, 768)},
                    base="base-id", settings={"steps": 2})
    path = str(tmp_path / "b.safetensors")
    save_bundle(b, path)
    assert is_bundle(path) and not is_bundle(str(tmp_path / "missing.safetensors"))
    r = load_bundle(path)
    assert r.base == "base-id" and r.settings == {"steps": 2} and r.concepts == b.concepts
    assert torch.equal(r.model["diffusion_model.x.weight"], b.model["diffusion_model.x.weight"])
    assert r.model["diffusion_model.x.weight"].dtype == torch.float16
    assert torch.equal(r.clip["clip_l.transformer.y.weight"], b.clip["clip_l.transformer.y.weight"])
    (e,) = r.edloras()
    assert e.tokens == ["<a1>", "<a2>"] and not e.text_encoder and not e.unet
    torch.testing.assert_close(e.embeddings["<a1>"], b.embeddings["<a1>"])
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "n.safetensors"), metadata={"format": "other"})
    with pytest.raises(EDLoRAError, match="not a fused"):
        load_bundle(str(tmp_path / "n.safetensors"))


def _factored_problem(n_concepts=3, out=5, d=12, rows=3, seed=1, missing=()):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, d, generator=g)
    deltas = [None if i in missing else (torch.randn(out, 2, generator=g), torch.randn(2, d, generator=g))
              for i in range(n_concepts)]
    xs = [torch.randn(rows, d, generator=g) for _ in range(n_concepts)]
    return gf.LayerProblem("m", w0, deltas, rows=xs)


def test_factored_deltas_match_dense():
    from fusion.solver import GramAccumulator

    p = _factored_problem(missing=(1,))
    dense = gf.LayerProblem("m", p.w0, [gf.dense_delta(d) for d in p.deltas], rows=p.rows)
    assert dense.deltas[1] is None
    torch.testing.assert_close(gf.dense_delta(p.deltas[0]), p.deltas[0][0] @ p.deltas[0][1])
    up4, down4 = p.deltas[0][0][:, :, None, None], p.deltas[0][1][:, :, None, None]
    torch.testing.assert_close(gf.lora_factors(up4, down4, 0.5)[0], 0.5 * p.deltas[0][0])
    w = gf.solve_layers([p])["m"]
    torch.testing.assert_close(w, gf.solve_layers([dense])["m"], atol=1e-5, rtol=1e-5)
    assert abs(gf.objective(w, p) - gf.objective(w, dense)) <= 1e-6 * gf.objective(p.w0, p)
    # Gram accumulators (row counts known) give the same answer
    accs = []
    for x in p.rows:
        a = GramAccumulator(x.shape[1])
        a.add(x)
        accs.append(a)
    q = gf.LayerProblem("m", p.w0, p.deltas, grams=accs)
    torch.testing.assert_close(gf.solve_layers([q])["m"], w, atol=1e-5, rtol=1e-5)
    # one concept: its merged weight, also from factors
    one = gf.LayerProblem("m", p.w0, [p.deltas[0]], rows=p.rows[:1])
    torch.testing.assert_close(gf.solve_layers([one])["m"], p.w0 + gf.dense_delta(p.deltas[0]))


def test_modules_sharing_inputs_are_solved_together_with_the_same_result():
    a = _factored_problem(seed=2, missing=(2,))
    b = _factored_problem(seed=3, out=7)
    c = _factored_problem(seed=4, out=4, missing=(0, 1, 2))
    d = _factored_problem(seed=5, out=3)  # dense deltas in the group
    d.deltas = [gf.dense_delta(x) for x in d.deltas]
    for q, name in ((b, "b"), (c, "c"), (d, "d")):
        q.rows, q.name = a.rows, name  # same recorded inputs as a
    a.name = "a"
    other = _factored_problem(seed=6)
    other.name = "other"
    alone = {p.name: gf.solve_layers([p])[p.name] for p in (a, b, c, d, other)}
    seen = []
    together = gf.solve_layers([a, other, b, c, d], on_layer=seen.append)
    assert list(together) == ["a", "other", "b", "c", "d"] and sorted(seen) == sorted(together)
    for name, w in alone.items():
        assert together[name].shape == w.shape and together[name].dtype == w.dtype
        torch.testing.assert_close(together[name], w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together["c"], c.w0)  # no LoRA anywhere: unchanged
    # factored pairs only: stacked as (block-diagonal ups, stacked downs)
    stacked = gf._stacked([a, b, c])
    assert isinstance(stacked.deltas[0], tuple) and stacked.deltas[0][0].shape == (16, 5)
    pairs = gf.solve_layers([a, b, c])
    for name in "abc":
        torch.testing.assert_close(pairs[name], alone[name], atol=1e-5, rtol=1e-5)
