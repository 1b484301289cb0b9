"""The one check of a fusion against the reference optimiser and weight summing, shared by the SD1.5 and SDXL
fusion tests: per solved layer the closed form's objective is at most L-BFGS's, and each concept's own layers
reproduce it on its recordings far better than summing the concepts' deltas."""
from collections.abc import Callable

import torch


def own_layer_errors(solver, result, plan, model, clip, rows_of: Callable, lbfgs_iterations: Callable) -> dict:
    """Asserts closed form ≤ L-BFGS on every solved layer; returns ``(concept, stage) -> [Σ fused err²,
    Σ summed err², Σ ‖X Wᵢᵀ‖²]`` over each concept's own layers (``rows_of(concept, target)``: its recorded rows,
    ``lbfgs_iterations(stage)``)."""
    w0s = {**{k: v[0][0].double() for k, v in model.get_key_patches().items()},
           **{k: v[0][0].double() for k, v in clip.patcher.get_key_patches().items()}}
    errors: dict = {}
    for layer in result.solved:
        t, acc, prob = layer.target, layer.inputs, layer.problem
        o_cf = solver.layer_objective(acc, prob, result.deltas[t.key])
        o_lb = solver.layer_objective(acc, prob, solver.solve_lbfgs(acc, prob, lbfgs_iterations(t.stage)))
        assert o_cf <= o_lb * (1 + 1e-6) + 1e-9 * solver.layer_objective(acc, prob), (t.key, o_cf, o_lb)
        fused = result.deltas[t.key][0].double() @ result.deltas[t.key][1].double()
        summed = sum(d[t.key][0].double() @ d[t.key][1].double() for d in plan.deltas if t.key in d)
        w0 = w0s[t.key].reshape(w0s[t.key].shape[0], -1)
        for i, d in enumerate(plan.deltas):
            if t.key not in d:
                continue
            x = torch.cat(rows_of(i, t))
            own = d[t.key][0].double() @ d[t.key][1].double()
            e = errors.setdefault((i, t.stage), [0.0, 0.0, 0.0])
            e[0] += float((x @ (fused - own).T).square().sum())
            e[1] += float((x @ (summed - own).T).square().sum())
            e[2] += float((x @ (w0 + own).T).square().sum())
    return errors


def check_fused_beats_summing(errors: dict, names: list[str], title: str, capsys) -> None:
    """Prints the relative errors and asserts fused < half of summed for every concept and stage (three concepts,
    the second without a text LoRA)."""
    with capsys.disabled():
        print(f"\n[{title}] relative output error of each concept's own layers on its recordings")
        print(f"  {'concept':22s} {'stage':9s} {'fused':>10s} {'summed':>10s}")
        for (i, stage), (ef, es, ref) in sorted(errors.items()):
            print(f"  {names[i]:22s} {stage:9s} {(ef / ref) ** .5:10.3e} {(es / ref) ** .5:10.3e}")
    assert {i for i, _ in errors} == {0, 1, 2} and (1, "text") not in errors  # B has no text LoRA
    for (i, stage), (ef, es, _ref) in errors.items():
        assert ef < 0.5 * es, (names[i], stage, ef, es)
