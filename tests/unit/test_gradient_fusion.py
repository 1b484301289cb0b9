"""fusion/gradient_fusion.py: the plan (targets, stages, input groups, validation) and the three-stage run
(each stage records with the earlier stages' result, rows folded per group, one progress bar), driven by
a plain-torch recorder."""
import pytest
import torch

from fusion.merge import gradient_fusion as gf
from fusion.merge.solver import FoldedInputs, LayerProblem, solve_closed_form

T = "clip_l.transformer.text_model.encoder.layers.0."
U = "diffusion_model.input_blocks.1.1."
KEYS = {  # key -> weight shape: SD1.x names, tiny sizes
    ("clip", T + "self_attn.q_proj.weight"): (12, 12), ("clip", T + "self_attn.k_proj.weight"): (12, 12),
    ("clip", T + "mlp.fc1.weight"): (20, 12),
    ("model", U + "transformer_blocks.0.attn2.to_k.weight"): (8, 12),
    ("model", U + "transformer_blocks.0.attn2.to_v.weight"): (8, 12),
    ("model", U + "transformer_blocks.0.attn1.to_q.weight"): (8, 8),
    ("model", U + "proj_in.weight"): (8, 8, 1, 1),
}
SHAPES = {part: {k: s for (p, k), s in KEYS.items() if p == part} for part in ("clip", "model")}


def concept(i, rank=2, skip=(), te=1.0, unet=1.0):
    g = torch.Generator().manual_seed(100 + i)
    factors = {"clip": {}, "model": {}}
    for (part, key), shape in KEYS.items():
        if key in skip:
            continue
        up = torch.randn(shape[0], rank, *shape[2:], generator=g) * 0.3
        down = torch.randn(rank, shape[1], *shape[2:], generator=g)
        factors[part][key] = (up, down)
    return gf.ConceptLoRA(f"c{i}.safetensors", factors["clip"], factors["model"], te, unet)


class PlainRecorder:
    """Rows from seeded noise per (stage, concept, group); cross-attention k/v rows depend on the fused
    text deltas (as the fused text encoder's outputs do), so that the stage order is visible."""

    def __init__(self, rows=9, skip_groups=(), rows_of=None):
        self.rows, self.skip_groups, self.calls = rows, set(skip_groups), []
        self.rows_of = rows_of or {}  # group -> rows per concept, where not `rows`

    def record(self, stage, concept, fused, groups, sink, on_step):
        self.calls.append((stage, concept, sorted(fused), dict(groups)))
        for gi, (group, _layer) in enumerate(sorted(groups.items())):
            if group in self.skip_groups:
                continue
            g = torch.Generator().manual_seed(1000 * concept + 10 * gf.STAGES.index(stage) + gi)
            width = next(s for (p, k), s in KEYS.items() if gf.input_group(k[:-7]) == group)[1]
            rows = self.rows_of.get(group, self.rows)
            x = torch.randn(rows, width, generator=g)
            if stage == "cross_kv":
                x = x + 0.01 * sum(float((up @ down).sum()) for up, down in fused.values())
            if stage == "unet" and group.endswith("proj_in"):
                sink(group, x.T.reshape(1, width, rows, 1), True)  # a conv input [B, C, H, W]
            else:
                sink(group, x, False)
        if stage == "unet":
            for step in range(2):
                on_step(step + 1, 2)


def settings(**kw):
    kw.setdefault("steps", 2)
    return gf.FusionSettings(**kw)


def test_prompts_and_settings():
    assert gf.concept_prompts("<c1> <c2>") == ("photo of a <c1> <c2>", "<c1> <c2>")
    assert gf.concept_prompts("ohwx woman") == ("photo of a ohwx woman", "ohwx woman")
    with pytest.raises(ValueError):
        gf.concept_prompts(" ")
    with pytest.raises(ValueError):
        gf.FusionSettings(solver="adam")
    with pytest.raises(ValueError):
        gf.FusionSettings(ridge=-1.0)
    assert gf.FusionSettings().ridge == gf.DEFAULT_RIDGE and gf.FusionSettings().sampler == "reference"


def test_plan_targets_stages_groups_and_layers():
    plan = gf.make_plan([concept(0), concept(1, skip={T + "mlp.fc1.weight"}, unet=0.0)], SHAPES["clip"],
                        SHAPES["model"])
    by_key = {t.key: t for t in plan.targets}
    assert [t.stage for t in plan.targets] == ["text"] * 3 + ["cross_kv"] * 2 + ["unet"] * 2
    assert by_key[T + "self_attn.k_proj.weight"].group == T + "self_attn.q_proj"
    assert by_key[U + "transformer_blocks.0.attn2.to_v.weight"].group == U + "transformer_blocks.0.attn2.to_k"
    assert by_key[U + "transformer_blocks.0.attn2.to_k.weight"].layer == 0 \
        and by_key[U + "proj_in.weight"].layer is None
    assert plan.keys("clip") == {k for k in SHAPES["clip"]}
    # strengths folded into up; strength 0 or no LoRA: no delta (the concept's rows still count)
    c0 = concept(0)
    up, down = plan.deltas[0][T + "mlp.fc1.weight"]
    torch.testing.assert_close(up, c0.text[T + "mlp.fc1.weight"][0])
    assert T + "mlp.fc1.weight" not in plan.deltas[1] and not any(k.startswith("diffusion") for k in plan.deltas[1])
    assert plan.deltas[0][U + "proj_in.weight"][1].shape == (2, 8)  # conv factors as 2-D
    half = gf.make_plan([concept(0, te=0.5)], SHAPES["clip"], SHAPES["model"])
    torch.testing.assert_close(half.deltas[0][T + "mlp.fc1.weight"][0], 0.5 * up)


def test_plan_refuses_what_cannot_be_fused_naming_concept_and_module():
    c = concept(0)
    with pytest.raises(gf.FusionError, match=r"c0\.safetensors.*'diffusion_model\.x\.weight'.*does not have"):
        gf.make_plan([gf.ConceptLoRA(c.name, {}, {"diffusion_model.x.weight": c.unet[U + "proj_in.weight"]})],
                     SHAPES["clip"], SHAPES["model"])
    with pytest.raises(gf.FusionError, match=r"c0\.safetensors.*do not fit"):
        gf.make_plan([c], SHAPES["clip"], {**SHAPES["model"], U + "proj_in.weight": (9, 8, 1, 1)})
    conv3 = {U + "proj_in.weight": (torch.randn(8, 2, 1, 1), torch.randn(2, 8, 3, 3))}
    with pytest.raises(gf.FusionError, match=r"c0\.safetensors.*3x3 convolution '.*proj_in\.weight' \(LoCon\)"):
        gf.make_plan([gf.ConceptLoRA(c.name, {}, conv3)], {}, {U + "proj_in.weight": (8, 8, 3, 3)})


def _reference(plan, captured, key, group):
    """Independent dense closed form from the captured rows: (Σ ΔWi Gi) G⁺ in float64."""
    grams = []
    for i in range(plan.concepts):
        rows = [r for (s, c, g, r) in captured if c == i and g == group]
        x = torch.cat(rows).double() if rows else torch.zeros(0, 1, dtype=torch.float64)
        grams.append(x.T @ x)
    g = sum(grams)
    b = sum(plan.deltas[i][key][0].double() @ plan.deltas[i][key][1].double() @ grams[i]
            for i in range(plan.concepts) if key in plan.deltas[i])
    return b @ torch.linalg.pinv(g, hermitian=True, rtol=1e-10)


def test_run_fuses_in_stage_order_and_matches_the_closed_form():
    plan = gf.make_plan([concept(0), concept(1, skip={U + "proj_in.weight"}), concept(2)], SHAPES["clip"],
                        SHAPES["model"])
    rec, captured, seen = PlainRecorder(), [], []

    def tap(stage, i, group, rows, channels_first):
        captured.append((stage, i, group, rows.flatten(2).transpose(1, 2).reshape(-1, rows.shape[1])
                         if channels_first else rows))

    result = gf.run_fusion(plan, rec, settings(ridge=0.0), lambda *a: seen.append(a), keep_problems=True, tap=tap)
    assert [(s, i) for s, i, _, _ in rec.calls] == [(s, i) for s in gf.STAGES for i in range(3)]
    text_keys = sorted(SHAPES["clip"])
    kv_keys = sorted(k for k in SHAPES["model"] if "attn2" in k)
    for stage, _concept, fused, groups in rec.calls:  # each stage sees exactly the earlier stages' result
        assert fused == {"text": [], "cross_kv": text_keys, "unet": sorted(text_keys + kv_keys)}[stage]
        if stage == "cross_kv":
            assert groups == {U + "transformer_blocks.0.attn2.to_k": 0}
    assert set(result.deltas) == {k for (_p, k) in KEYS} and not result.unrecorded
    for layer in result.solved:
        up, down = result.deltas[layer.target.key]
        assert up.shape[1] == down.shape[0] == sum(2 for d in plan.deltas if layer.target.key in d)
        ref = _reference(plan, captured, layer.target.key, layer.target.group)
        torch.testing.assert_close(up.double() @ down.double(), ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
    # the default ridge regularises the same problems
    ridged = gf.run_fusion(plan, PlainRecorder(), settings())
    key = U + "transformer_blocks.0.attn1.to_q.weight"
    assert float((ridged.deltas[key][0] @ ridged.deltas[key][1]).norm()) < \
        float((result.deltas[key][0] @ result.deltas[key][1]).norm())
    assert set(result.seconds) >= {f"{s}_{p}" for s in gf.STAGES for p in ("record", "solve")}


def test_cheapest_solves_run_first_and_the_results_keep_the_plan_order(monkeypatch):
    """Issue 22: a stage solves its groups in increasing solve work (the widest when the fewest accumulators are
    left); the result lists the layers in the plan's order, as before."""
    plan = gf.make_plan([concept(i) for i in range(3)], SHAPES["clip"], SHAPES["model"])
    text_groups = list(plan.stage_groups("text"))
    assert len(text_groups) == 2
    # the plan's first text group gets many rows (a Gram solve), the second few (a cheaper row-space solve)
    rec = PlainRecorder(rows=9, rows_of={text_groups[1]: 2})
    solved, real_solve = [], gf.S.solve_closed_form

    def spy(inputs, problems, *args, **kwargs):
        solved.append(([p.name for p in problems], gf.S.solve_work_bytes(inputs), inputs.in_row_mode))
        return real_solve(inputs, problems, *args, **kwargs)

    monkeypatch.setattr(gf.S, "solve_closed_form", spy)
    result = gf.run_fusion(plan, rec, settings())
    text = [entry for entry in solved if entry[0][0].startswith(T)]
    assert [keys for keys, _, _ in text] == [[t.key for t in plan.stage_groups("text")[g]] for g in text_groups[::-1]]
    assert text[0][2] and not text[1][2] and text[0][1] < text[1][1]
    assert list(result.deltas) == [t.key for stage in gf.STAGES for g in plan.stage_groups(stage).values() for t in g]


def test_one_progress_bar_with_stage_texts():
    plan = gf.make_plan([concept(0), concept(1), concept(2)], SHAPES["clip"], SHAPES["model"])
    seen = []
    gf.run_fusion(plan, PlainRecorder(), settings(), lambda *a: seen.append(a))
    dones = [d for d, _t, _x in seen]
    totals = {t for _d, t, _x in seen}
    assert totals == {3 + 3 + 3 * 2 + 7}  # concepts per recording stage, sampling steps, weights
    assert dones == sorted(dones) and dones[-1] == 19
    texts = [x for _d, _t, x in seen]
    for expected in ("text encoder 1/3", "text encoder 3/3", "cross-attention k/v 2/3",
                     "UNet: concept 2 of 3, step 1/2", "UNet: concept 3 of 3, step 2/2", "solving 7/7 layers",
                     "fused 3 concepts into 7 layers"):
        assert expected in texts
    assert texts.index("text encoder 1/3") < texts.index("cross-attention k/v 1/3") < \
        texts.index("UNet: concept 1 of 3, step 1/2")


def test_interrupt_from_progress_stops_the_run():
    plan = gf.make_plan([concept(0), concept(1)], SHAPES["clip"], SHAPES["model"])
    rec = PlainRecorder()

    def stop(done, total, text):
        if text.startswith("cross-attention"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gf.run_fusion(plan, rec, settings(), stop)
    assert {s for s, *_ in rec.calls} <= {"text", "cross_kv"}


def test_one_concept_is_its_own_lora_and_nothing_is_recorded():
    plan = gf.make_plan([concept(0, te=0.8)], SHAPES["clip"], SHAPES["model"])
    rec, seen = PlainRecorder(), []
    result = gf.run_fusion(plan, rec, settings(), lambda *a: seen.append(a))
    assert rec.calls == [] and seen[-1][0] == seen[-1][1] == 7
    for key, (up, down) in result.deltas.items():
        torch.testing.assert_close(up, plan.deltas[0][key][0])
        torch.testing.assert_close(down, plan.deltas[0][key][1])


def test_groups_that_never_ran_keep_their_weights():
    plan = gf.make_plan([concept(0), concept(1)], SHAPES["clip"], SHAPES["model"])
    result = gf.run_fusion(plan, PlainRecorder(skip_groups={T + "mlp.fc1"}), settings())
    assert result.unrecorded == [T + "mlp.fc1.weight"] and T + "mlp.fc1.weight" not in result.deltas


def test_lbfgs_mode_reaches_the_closed_form_objective():
    plan = gf.make_plan([concept(0), concept(1)], SHAPES["clip"], SHAPES["model"])
    cf = gf.run_fusion(plan, PlainRecorder(rows=5), settings(ridge=0.0), keep_problems=True)
    lb = gf.run_fusion(plan, PlainRecorder(rows=5), settings(solver="lbfgs"))
    from fusion.merge.solver import layer_objective

    for layer in cf.solved:
        o_cf = layer_objective(layer.inputs, layer.problem, cf.deltas[layer.target.key])
        o_lb = layer_objective(layer.inputs, layer.problem, lb.deltas[layer.target.key])
        assert o_cf <= o_lb * (1 + 1e-6) + 1e-9 * layer_objective(layer.inputs, layer.problem)


def test_solving_a_group_directly_is_what_the_run_does():
    """run_fusion's solve of one group equals solve_closed_form on FoldedInputs built by hand."""
    plan = gf.make_plan([concept(0), concept(1)], SHAPES["clip"], SHAPES["model"])
    result = gf.run_fusion(plan, PlainRecorder(rows=5), settings(ridge=1e-3), keep_problems=True)
    layer = next(s for s in result.solved if s.target.key.endswith("q_proj.weight"))
    acc = FoldedInputs(12)
    for i in range(2):
        acc.begin_concept({k: plan.deltas[i][k][1]
                           for k in (T + "self_attn.k_proj.weight", T + "self_attn.q_proj.weight")})
        acc.add(layer.inputs.rows(i))
    problem = LayerProblem(layer.target.key, {i: plan.deltas[i][layer.target.key][0] for i in range(2)})
    up, down = solve_closed_form(acc, [problem], ridge=1e-3)[layer.target.key]
    torch.testing.assert_close(up @ down, result.deltas[layer.target.key][0] @ result.deltas[layer.target.key][1],
                               atol=1e-6, rtol=1e-5)
