"""Does gradient fusion generalise? Held-out judgement of the fusion methods (issue 12 §0), one run, one report.

    nice .host/venv/bin/python benchmarks/bench_fusion_quality.py                 # full-size SD1.5, ~30 min on 2 CPUs
    nice .host/venv/bin/python benchmarks/bench_fusion_quality.py --tiny --steps 2 --size 64   # plumbing check
    nice .host/venv/bin/python benchmarks/bench_fusion_quality.py --sdxl --tiny --steps 2 --size 64  # tiny SDXL

Three synthetic whole-block rank-4 ED-LoRAs on the full-size random SD1.5 (reduced recording: 4 steps at
256×256 by default; the reference records 20 at 512×512). Every method runs the whole node pipeline
(each stage records with that method's own earlier stages):

* ``sum``: plain weight summing, ``W0 + Σ ΔWi`` (no recording);
* ``lbfgs``: the reference optimiser (L-BFGS, strong Wolfe, 500/500/50 iterations) on the recordings;
* ``cf ridge=ρ``: the closed form with ``λ = ρ·tr(G)/in`` (ρ = 0: unregularised, rounding-floor cutoff);
* ``cf rcond=c``: the closed form with an eigenvalue cutoff at ``c·λmax`` instead of a ridge.

Held-out rows are recorded once per concept, as that concept's own model produces them (its own text
LoRA, k/v and UNet LoRA: "the inputs that concept produces", docs/design.md §5.1), unlike the recordings: stage 1
and 2 on other prompts (``a painting of <words>``, ``a close-up photo of <words>``), stage 3 sampling the
second prompt variant (``<words>``) with another seed and other timesteps (one step more). Every method is
scored on these same rows. Reported per stage: the fused layer's output error against the concept's own
tuned layer, ``‖X(W − Wi)ᵀ‖ / ‖X Wiᵀ‖`` (``rel``) and ``‖X(W − Wi)ᵀ‖ / ‖X ΔWiᵀ‖`` (``/effect``: 1 = no better
than the base), summed over each concept's layers; ``|ΔW|/|W0|`` per layer class (median); and end to end
the noise prediction of the fused model (fused CLIP, fused concept set) against each concept's own model
(its ED-LoRA at strength 1) on a prompt used nowhere (``a watercolor painting of <words>``) at four noise
levels, ``‖ε − εi‖/‖εi‖`` (the base with the concept's tables only, for scale).
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

from bench_fusion import FULL_CKPT, FULL_SDXL_CKPT, load_model, start_comfy  # benchmarks/, beside this script

STAGES = ("text", "cross_kv", "unet")
E2E_TIMESTEPS = (900, 600, 300, 100)


def heldout_prompts(words: str) -> tuple[str, str]:
    return f"a painting of {words}", f"a close-up photo of {words}"


_CLASSES = ((r"attn([12])\.to_out\.0$", r"attn\1.to_out"), (r"attn([12])\.(to_[qkv])$", r"attn\1.\2"),
            (r"ff\.net\.0\.proj$", "ff.net.0.proj"), (r"ff\.net\.2$", "ff.net.2"), (r"(proj_in|proj_out)$", r"\1"),
            (r"self_attn\.(\w+)$", r"text \1"), (r"mlp\.(fc[12])$", r"text \1"))


def layer_class(key: str) -> str:
    """``attn1.to_q``, ``ff.net.2``, ``proj_in``, ``text q_proj``, … of a weight key."""
    module = key[:-len(".weight")]
    for pattern, name in _CLASSES:
        m = re.search(pattern, module)
        if m:
            return m.expand(name)
    return module.rsplit(".", 1)[-1]


class HeldOutErrors:
    """Per (method, stage, concept, weight): Σ‖X(Δ − ΔWi)ᵀ‖², Σ‖X Wiᵀ‖², Σ‖X ΔWiᵀ‖² over held-out rows, every
    method's change factored (``X(UC − UiDi)ᵀ = (XCᵀ)Uᵀ − (XDiᵀ)Uiᵀ``: no dense change is formed)."""

    def __init__(self, torch, plan, methods: dict, w0):
        self.torch, self.plan, self.methods, self.w0 = torch, plan, methods, w0
        self.sums: dict[tuple, list[float]] = {}

    def sink(self, stage: str, concept: int, targets: dict):
        torch = self.torch

        def add(group: str, x, channels_first: bool):
            with torch.no_grad():
                width = x.shape[1] if channels_first else x.shape[-1]
                rows = (x.flatten(2).transpose(1, 2) if channels_first else x).reshape(-1, width).double()
                for t in targets[group]:
                    own = self.plan.deltas[concept].get(t.key)
                    if own is None:
                        continue
                    u_i, d_i = (v.double() for v in own)
                    effect = (rows @ d_i.T) @ u_i.T
                    w0 = self.w0[t.key].reshape(self.w0[t.key].shape[0], -1).double()
                    ref = float((rows @ w0.T + effect).square().sum())
                    for label, deltas in self.methods.items():
                        fused = deltas.get(t.key)
                        change = (rows @ fused[1].double().T) @ fused[0].double().T if fused is not None else 0.0
                        s = self.sums.setdefault((label, stage, concept, t.key), [0.0, 0.0, 0.0])
                        s[0] += float((change - effect).square().sum())
                        s[1] += ref
                        s[2] += float(effect.square().sum())
        return add

    def stage_errors(self, label: str, stage: str) -> tuple[float, float]:
        """(rel, /effect) over every concept's layers of the stage (sums of squares, then the root)."""
        parts = [v for (m, s, _c, _k), v in self.sums.items() if m == label and s == stage]
        if not parts:
            return float("nan"), float("nan")
        err, ref, eff = (sum(p[j] for p in parts) for j in range(3))
        return (err / ref) ** 0.5, (err / eff) ** 0.5


def weight_sum(plan):
    """Weight summing as factors: U = [U1 … Un], C = [D1; …; Dn] per weight."""
    import torch

    out = {}
    for t in plan.targets:
        parts = [d[t.key] for d in plan.deltas if t.key in d]
        out[t.key] = (torch.cat([u for u, _ in parts], dim=1), torch.cat([v for _, v in parts]))
    return out


def with_rcond(solve_closed_form, rcond: float):
    """``solve_closed_form`` with its eigenvalue cutoff fixed at ``rcond`` (whatever the caller passes)."""
    return lambda *a, **k: solve_closed_form(*a, **{**k, "rcond": rcond})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="recording steps per concept (held out: one more)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--concepts", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="the tiny SD1.5-layout model (a plumbing check)")
    ap.add_argument("--sdxl", action="store_true", help="SDXL ED-LoRAs on the full-size random SDXL (with --tiny: "
                                                        "the tiny SDXL)")
    ap.add_argument("--attention-only", action="store_true")
    ap.add_argument("--ridges", default="0,1e-3,1e-2,1e-1,1", help="closed-form ridge values")
    ap.add_argument("--rconds", default="1e-5,1e-3", help="closed-form eigenvalue cutoffs (no ridge)")
    ap.add_argument("--no-lbfgs", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    ckpt = FULL_SDXL_CKPT if args.sdxl else FULL_CKPT
    if not args.tiny and not ckpt.is_file():
        print(f"SKIP: {ckpt} is missing (bash tools/host/make_models.sh{' --sdxl' if args.sdxl else ''} makes it)")
        return 0
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    pack, env = start_comfy(False)
    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers
    from synthetic import make_edlora_state

    gf, solver = pack("fusion.merge.gradient_fusion"), pack("fusion.merge.solver")
    run, rec_mod = pack("nodes.glue.fusion_run"), pack("nodes.glue.fusion_recording")
    fp, enc = pack("nodes.glue.fused_patches"), pack("nodes.glue.layerwise")
    en = pack("nodes.glue.loading")
    folders = pack("nodes.glue.folders")
    t_start = time.perf_counter()
    model, clip, shape = load_model(not args.tiny, args.sdxl, env)
    folder = Path(folders.folder_paths.get_folder_paths("edloras")[0])
    folder.mkdir(parents=True, exist_ok=True)
    concepts, names = None, []
    for i in range(args.concepts):
        names.append(f"quality_{i}.pth")
        torch.save(make_edlora_state((f"<q{i}a>", f"<q{i}b>"), seed=500 + i, whole_block=not args.attention_only,
                                     **shape), folder / names[-1])
        concepts = en.apply_edlora(model, clip, concepts, folders.edlora_path(names[-1]), 1.0, 1.0)[2]
    plan = run.plan_for(model, clip, concepts)
    w0 = {**{k: fp.original_weight(v).detach() for k, v in model.get_key_patches().items() if k in plan.keys("model")},
          **{k: fp.original_weight(v).detach() for k, v in clip.patcher.get_key_patches().items()
             if k in plan.keys("clip")}}
    base = dict(steps=args.steps, width=args.size, height=args.size, seed=0)
    methods = [("sum", None)]
    if not args.no_lbfgs:
        methods.append(("lbfgs", gf.FusionSettings(solver="lbfgs", **base)))
    methods += [(f"cf ridge={r}", gf.FusionSettings(ridge=float(r), **base)) for r in args.ridges.split(",") if r]
    methods += [(f"cf rcond={c}", gf.FusionSettings(ridge=0.0, **base)) for c in args.rconds.split(",") if c]
    heldout = gf.FusionSettings(steps=args.steps + 1, width=args.size, height=args.size, seed=1000)

    # the end-to-end references: each concept's own model (its ED-LoRA), and the base with its tables only
    words = [c.prompt_words for c in concepts.concepts]
    e2e_prompt = [f"a watercolor painting of {w}" for w in words]
    ms = model.get_model_object("model_sampling")
    latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
    noise = comfy.sample.prepare_noise(latent, 77)

    def denoised(patcher, clip_, concept_set, prompt, sigma):
        cond = enc.encode_with_concepts(clip_, prompt, concept_set)
        sigmas = torch.tensor([float(sigma), 0.0])
        out = comfy.sample.sample_custom(patcher, noise, 1.0, comfy.samplers.sampler_object("euler"), sigmas, cond,
                                         cond, latent, disable_pbar=True, seed=77)
        return out.double(), noise.double() * float(sigma)

    sigmas = [float(ms.sigma(torch.tensor(float(t)))) for t in E2E_TIMESTEPS]
    own_out, base_err = [], []
    for i, name in enumerate(names):
        m_i, c_i, own = en.apply_edlora(model, clip, None, folders.edlora_path(name), 1.0, 1.0)
        m_b, c_b, emb = en.apply_edlora(model, clip, None, folders.edlora_path(name), 0.0, 0.0)
        outs = [denoised(m_i, c_i, own, e2e_prompt[i], s) for s in sigmas]
        own_out.append(outs)
        base_err.append([float((denoised(m_b, c_b, emb, e2e_prompt[i], s)[0] - o).norm() / (x - o).norm())
                         for s, (o, x) in zip(sigmas, outs, strict=True)])
    print(f"references ready ({time.perf_counter() - t_start:.0f}s)", flush=True)

    fused_concepts = fp.fused_concepts([(c.edlora, c.trigger_words) for c in concepts.concepts])
    results, seconds = {}, {}
    for label, settings in methods:
        t0 = time.perf_counter()
        if settings is None:
            results[label] = weight_sum(plan)
        else:
            original = solver.solve_closed_form
            if label.startswith("cf rcond="):
                gf.S.solve_closed_form = with_rcond(original, float(label.split("=")[1]))
            try:
                with torch.inference_mode():
                    stats = run.fuse(model, clip, concepts, settings, use_cache=False)[3]
            finally:
                gf.S.solve_closed_form = original
            results[label] = stats["result"].deltas
        seconds[label] = time.perf_counter() - t0
        print(f"{label:16s} fused in {seconds[label]:6.0f}s", flush=True)
    mm.unload_all_models()

    # held-out rows, once per concept as its own model produces them, scored for every method
    errors = HeldOutErrors(torch, plan, results, w0)
    for stage in STAGES:
        groups = plan.stage_groups(stage)
        if not groups:
            continue
        prompts = heldout_prompts if stage != "unet" else (lambda w: (w, w))
        recorder = rec_mod.ComfyRecorder(model, clip, concepts, heldout, plan, prompts=prompts)
        for i in range(plan.concepts):
            own = {k: v for k, v in plan.deltas[i].items()
                   if stage != "text" and (k in plan.keys("clip") or (stage == "unet" and gf.stage_of("model", k) ==
                                                                      "cross_kv"))}
            with torch.inference_mode():
                recorder.record(stage, i, own, {g: ts[0].layer for g, ts in groups.items()},
                                errors.sink(stage, i, groups), lambda *_: None)
        print(f"held-out {stage} recorded ({time.perf_counter() - t_start:.0f}s)", flush=True)

    report = {}
    m_keys, c_keys = plan.keys("model"), plan.keys("clip")
    for label, deltas in results.items():
        ratios: dict[str, list[float]] = {}  # |ΔW| / |W0| per layer class
        for key, (u, c) in deltas.items():
            u, c = u.double(), c.double()
            norm = float(((u.T @ u) * (c @ c.T)).sum().clamp_min(0)) ** 0.5
            ratios.setdefault(layer_class(key), []).append(norm / float(w0[key].double().norm()))
        fm, fc = fp.fused_clones(model, clip, {k: v for k, v in deltas.items() if k in m_keys},
                                 {k: v for k, v in deltas.items() if k in c_keys}, {}, fused_concepts, strip=True)
        e2e = [[float((denoised(fm, fc, fused_concepts, e2e_prompt[i], s)[0] - o).norm() / (x - o).norm())
                for s, (o, x) in zip(sigmas, own_out[i], strict=True)] for i in range(plan.concepts)]
        mm.unload_all_models()
        report[label] = {"fuse_s": seconds[label], "stages": {s: errors.stage_errors(label, s) for s in STAGES},
                         "ratios": {k: statistics.median(v) for k, v in ratios.items()},
                         "e2e": [statistics.mean(v) for v in e2e]}
        r = report[label]
        print(f"{label:16s} held-out /effect " + ", ".join(f"{s} {r['stages'][s][1]:.3f}" for s in STAGES)
              + "; e2e " + ", ".join(f"{v:.4f}" for v in r["e2e"]), flush=True)

    print(f"\n## Held-out judgement: {args.concepts} synthetic "
          f"{'attention-only' if args.attention_only else 'whole-block'} rank-4 ED-LoRAs, "
          f"{'tiny ' if args.tiny else 'full-size random '}{'SDXL' if args.sdxl else 'SD1.5'}, recording {args.steps} "
          f"steps at {args.size}x{args.size}; held out (each concept's own model): other prompts / seed / "
          f"{args.steps + 1} steps")
    print("\nPer stage, fused layer vs each concept's own tuned layer on held-out rows (all layers, all concepts):")
    head = f"{'method':16s} {'fuse s':>7s}" + "".join(f" {s + ' rel':>13s} {s + ' /effect':>16s}" for s in STAGES)
    print(head + "\n" + "-" * len(head))
    for label, r in report.items():
        print(f"{label:16s} {r['fuse_s']:7.0f}" + "".join(f" {r['stages'][s][0]:13.4e} {r['stages'][s][1]:16.4f}"
                                                         for s in STAGES))
    classes = sorted({k for r in report.values() for k in r["ratios"]})
    print("\n|ΔW| / |W0| per layer class (median over layers):")
    head = f"{'layer class':22s}" + "".join(f" {label:>14s}" for label in report)
    print(head + "\n" + "-" * len(head))
    for cls in classes:
        print(f"{cls:22s}" + "".join(f" {report[label]['ratios'].get(cls, float('nan')):14.4f}" for label in report))
    print(f"\nEnd to end: noise prediction of the fused model vs each concept's own model, '{e2e_prompt[0]}' and the "
          f"like, mean over t = {', '.join(map(str, E2E_TIMESTEPS))}: ‖ε − εi‖ / ‖εi‖")
    head = f"{'method':16s}" + "".join(f" {'concept ' + str(i):>10s}" for i in range(plan.concepts)) + f" {'mean':>8s}"
    print(head + "\n" + "-" * len(head))
    print(f"{'(base+tables)':16s}" + "".join(f" {statistics.mean(v):10.4f}" for v in base_err)
          + f" {statistics.mean(statistics.mean(v) for v in base_err):8.4f}")
    for label, r in report.items():
        print(f"{label:16s}" + "".join(f" {v:10.4f}" for v in r["e2e"]) + f" {statistics.mean(r['e2e']):8.4f}")
    print(f"\nwall time {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
