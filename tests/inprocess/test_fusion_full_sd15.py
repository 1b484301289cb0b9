"""Gradient fusion on the full-size SD1.5 layout (random weights): three synthetic attention-only ED-LoRAs,
fused with the node's defaults, the solved problems kept.

* every fused weight's factored change ``up @ down`` equals the dense closed form computed independently
  from the same recordings in float64 (``(Σ Ui Mi)(G + λI)⁻¹``) within float32 rounding;
* on these recordings the unregularised closed form's objective is at most the reference L-BFGS's
  (reference iteration counts) on a sample of layers per stage;
* the saved bundle through the STOCK Load LoRA node at strength 1.0 gives the fused MODEL's noise
  prediction (fp32, within 1e-5 of the output scale) and the fused CLIP's encoding.
"""
import os
import shutil
import time

import comfy.model_management as mm
import pack_nodes as pn
import pytest
import torch
from synthetic import make_edlora_state

import nodes as comfy_nodes

SAMPLES_PER_STAGE = 2


@pytest.fixture(scope="module")
def fused(env, sd15, tmp_path_factory):
    model, clip = sd15
    cache = tmp_path_factory.mktemp("fusion-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("MIXOFSHOW_FUSION_CACHE", str(cache))
    en = env.pack("nodes.glue.loading")
    folders = env.pack("nodes.glue.folders")
    concepts, m, c = None, model, clip
    for i in range(3):
        name = f"fu_full_{i}.pth"
        torch.save(make_edlora_state((f"<ff{i}a>", f"<ff{i}b>"), seed=300 + i, whole_block=False),
                   env.base / "models" / "edloras" / name)
        m, c, concepts = en.apply_edlora(m, c, concepts, folders.edlora_path(name), 1.0, 1.0)
    gf = env.pack("fusion.merge.gradient_fusion")
    settings = gf.FusionSettings(steps=1, width=64, height=64, seed=0)
    try:
        t = time.perf_counter()
        with torch.inference_mode():  # as ComfyUI runs nodes
            fm, fc, fcs, stats = env.pack("nodes.glue.fusion_run").fuse(model, clip, concepts, settings, use_cache=True,
                                                                    keep_problems=True)
        seconds = time.perf_counter() - t
    finally:
        mp.undo()
    size = os.path.getsize(stats["cache_file"])
    print(f"\n[fusion full] {seconds:.1f}s; per stage: "
          + ", ".join(f"{k} {v:.2f}s" for k, v in stats["seconds"].items())
          + f"; cache entry {size / 2**20:.1f} MiB")
    return stats["result"], fm, fc, fcs, stats


def _sample(layers, stage):
    chosen = sorted((s for s in layers if s.target.stage == stage), key=lambda s: s.target.key)
    assert len(chosen) >= SAMPLES_PER_STAGE, f"too few {stage} layers were fused"
    return [chosen[0], chosen[-1]]


def test_every_module_is_fused_timed_and_cached(fused):
    result, fm, fc, _fcs, stats = fused
    stages = [s.target.stage for s in result.solved]
    # attention-only ED-LoRAs: 12 text layers x 4 projections, 16 UNet blocks x (attn1 4 + attn2 4)
    assert (stages.count("text"), stages.count("cross_kv"), stages.count("unet")) == (48, 32, 96)
    assert set(result.deltas) == {s.target.key for s in result.solved}
    sec = stats["seconds"]
    for stage in ("text", "cross_kv", "unet"):
        assert sec[f"{stage}_record"] + sec[f"{stage}_solve"] <= sec[stage] + 1e-3
    # three rank-4 concepts: the cache entry is a rank-12 LoRA of 176 weights plus six tables, a few MiB
    assert os.path.getsize(stats["cache_file"]) < 20 * 2**20


def test_factored_change_equals_the_dense_closed_form(env, fused):
    """(a) ``up @ down`` of every fused weight = (Σ Ui Mi)(G + λI)⁻¹ from the same recordings, float64."""
    result, fm, fc, _fcs, _stats = fused
    ridge = env.pack("fusion.merge.gradient_fusion").DEFAULT_RIDGE
    f64 = torch.float64
    worst = 0.0
    for layer in result.solved:
        acc, prob = layer.inputs, layer.problem
        g = acc.gram(f64)
        b = sum(prob.ups[i].double().flatten(1) @ acc.rhs(i, prob.name, f64) for i in prob.ups)
        dense = torch.linalg.solve(g + ridge * float(g.trace()) / g.shape[0] * torch.eye(g.shape[0], dtype=f64),
                                   b.mT).mT
        up, down = result.deltas[layer.target.key]
        err = float((up.double() @ down.double() - dense).norm() / dense.norm())
        worst = max(worst, err)
        assert err < 1e-5, (layer.target.key, err)
    # the patches on the fused MODEL/CLIP are these factors
    fused_of = env.pack("nodes.glue.fused_patches").fused_of
    patched = {**fused_of(fm)[0], **fused_of(fc.patcher)[0]}
    for key, (up, down) in result.deltas.items():
        torch.testing.assert_close(patched[key][0].flatten(1), up)
        torch.testing.assert_close(patched[key][1].flatten(1), down)
    print(f"\n[fusion full] factored vs dense closed form: worst relative difference {worst:.2e}")


@pytest.mark.parametrize("stage", ["text", "cross_kv", "unet"])
def test_closed_form_objective_not_above_lbfgs(env, fused, stage):
    result, *_ = fused
    solver = env.pack("fusion.merge.solver")
    iterations = env.pack("fusion.merge.gradient_fusion").LBFGS_ITERATIONS[stage]
    for layer in _sample(result.solved, stage):
        acc, prob = layer.inputs, layer.problem
        cf = solver.solve_closed_form(acc, [prob], ridge=0.0)[prob.name]
        t = time.perf_counter()
        lb, info = solver.solve_lbfgs(acc, prob, iterations, return_info=True)
        lbfgs_s = time.perf_counter() - t
        o_cf, o_lb, o_0 = (solver.layer_objective(acc, prob, cf), solver.layer_objective(acc, prob, lb),
                           solver.layer_objective(acc, prob))
        print(f"\n[{stage}] {prob.name}: objective W0 {o_0:.6g}, closed form {o_cf:.6g}, "
              f"L-BFGS ({info['n_iter']} it, {lbfgs_s:.1f}s) {o_lb:.6g}")
        assert o_cf <= o_lb * (1 + 1e-6) + 1e-9 * o_0, (prob.name, o_cf, o_lb)
        assert o_cf < o_0


def _noise_prediction(patcher, x, sigma, cond):
    mm.load_models_gpu([patcher])
    try:
        with torch.no_grad():
            return patcher.model.apply_model(x, sigma, c_crossattn=cond).float().cpu()
    finally:
        mm.unload_all_models()


def test_saved_bundle_through_the_stock_lora_loader_is_the_fused_model(env, sd15, fused):
    """(b) Save Fused Bundle -> stock Load LoRA at 1.0 -> the same noise prediction as the fused MODEL."""
    model, clip = sd15
    _result, fm, fc, fcs, _stats = fused
    name = pn.save_fused_bundle(fm, fc, fcs, "fu_full_bundle")
    shutil.copy(env.folder_paths.get_full_path("edloras", name), env.base / "models" / "loras" / name)
    sm, sc = comfy_nodes.LoraLoader().load_lora(model, clip, name, 1.0, 1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g) * 3.0
    sigma = torch.tensor([3.0])
    cond = comfy_nodes.CLIPTextEncode().encode(fc, "a photo of a castle")[0][0][0]
    eps_fused = _noise_prediction(fm, x, sigma, cond)
    eps_stock = _noise_prediction(sm, x, sigma, cond)
    eps_base = _noise_prediction(model, x, sigma, cond)
    scale = float(eps_fused.abs().max())
    assert eps_fused.dtype == torch.float32
    assert float((eps_stock - eps_fused).abs().max()) <= 1e-5 * scale
    assert float((eps_base - eps_fused).abs().max()) > 1e-3 * scale  # fusion changed the model: not vacuous
    stock_cond = comfy_nodes.CLIPTextEncode().encode(sc, "a photo of a castle")[0][0][0]
    torch.testing.assert_close(stock_cond, cond, atol=1e-5 * float(cond.abs().max()), rtol=0)
    print(f"\n[fusion full] stock Load LoRA vs fused MODEL: max |Δε| {float((eps_stock - eps_fused).abs().max()):.2e}"
          f" (scale {scale:.3f}; base vs fused {float((eps_base - eps_fused).abs().max()):.3f})")
