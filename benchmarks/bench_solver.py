"""Closed-form gradient fusion vs the reference L-BFGS, per layer, on SD1.5-sized synthetic layers.

    .host/venv/bin/python benchmarks/bench_solver.py            # full (≈9 min on one CPU thread)
    .host/venv/bin/python benchmarks/bench_solver.py --quick    # ≈4 min: fewer UNet rows, short L-BFGS budget
    .host/venv/bin/python benchmarks/bench_solver.py --device cuda

For 3 concepts per layer it synthesises W0 (random), rank-4 LoRA deltas and input rows (per-channel scales
spread over 1.5 decades, a few outlier channels and a common mean, like real activations), then
measures in one run:

* closed form: folding the rows (``FoldedInputs``: rows fed in 4096-row chunks, as recorded step by step;
  the rows are kept instead while there are at most ``in`` of them) and the solve (``solve_closed_form``,
  unregularised here, as the reference's objective is; the path it took: ``rows``/``inputs`` space,
  ``cholesky``/``eigh``);
* the node's ``lbfgs`` mode (``solve_lbfgs``: the reference optimiser on the folded objective, in the
  column space of the LoRA factors; same iterates as the published one, see fusion/solver.py);
* the published reference (:func:`published_lbfgs` below, from the raw float32 rows: 500 iterations for
  text and cross-attention k/v layers, 50 for other UNet layers). When a full run is projected (from a
  4-iteration pilot) to take more than ``--lbfgs-budget`` seconds, a capped number of iterations is
  timed and the full time is extrapolated linearly per evaluation; such rows are marked ``~`` and their
  L-BFGS objective is the one reached after the capped iterations;
* the objectives ``Σ_i ‖Xi (W − Wi)ᵀ‖²`` (``layer_objective`` on the folded inputs), relative to W0's.

Then a whole-model estimate for SD1.5 with whole-block LoRA (see ``whole_model`` for the layer list
and the scaling assumptions, which are printed too).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field

import dev_paths  # isort: split

import torch
import torch.nn.functional as F

from fusion.merge.solver import FoldedInputs, LayerProblem, layer_objective, solve_closed_form, solve_lbfgs

REPO = dev_paths.REPO  # importable from here on: fusion
N_CONCEPTS = 3
RANK = 4
CHUNK = 4096  # rows per recorded chunk (one UNet step at 64×64)


@dataclass
class Shape:
    key: str
    label: str
    out: int
    inp: int
    rows: int  # per concept
    iters: int
    note: str = ""


@dataclass
class Result:
    shape: Shape
    gram_s: float = 0.0
    solve_s: float = 0.0
    path: str = ""
    lbfgs_s: float = 0.0
    lbfgs_iters_run: int = 0
    extrapolated: bool = False
    stopped_early: bool = False
    obj_w0: float = 0.0
    obj_cf: float = 0.0
    obj_lb: float = 0.0
    node_lbfgs_s: float = 0.0
    obj_node_lb: float = 0.0
    lbfgs_per_eval_s: float = 0.0
    lbfgs_evals_run: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def closed_s(self) -> float:
        return self.gram_s + self.solve_s


def shapes(quick: bool) -> list[Shape]:
    unet_rows = 2 * 4096 if quick else 20 * 4096
    return [
        Shape("q_proj", "text q_proj 768x768", 768, 768, 30, 500),
        Shape("fc1", "text fc1 3072x768", 3072, 768, 30, 500),
        Shape("fc2", "text fc2 768x3072", 768, 3072, 30, 500, "extra: for the whole-model estimate"),
        Shape("cross_kv", "attn2.to_k 1280x768", 1280, 768, 14, 500, "extra: cross-attn k/v, text rows"),
        Shape("to_q", "attn1.to_q 320x320", 320, 320, unet_rows, 50),
        Shape("ff2_320", "ff.net.2 320x1280", 320, 1280, unet_rows, 50),
        Shape("ff2_mid", "ff.net.2 1280x5120", 1280, 5120, 20 * 64, 50),
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def make_problem(s: Shape, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(s.out, s.inp, generator=g) / math.sqrt(s.inp)).to(device)
    deltas = [((torch.randn(s.out, RANK, generator=g) * 0.05).to(device), (torch.randn(RANK, s.inp, generator=g) * 0.05)
               .to(device)) for _ in range(N_CONCEPTS)]  # (up, down): ΔW = up @ down
    scale = torch.logspace(0, -1.5, s.inp)[torch.randperm(s.inp, generator=g)]
    scale[torch.randperm(s.inp, generator=g)[:4]] *= 20.0  # outlier channels
    xs = []
    for _ in range(N_CONCEPTS):
        mean = torch.randn(s.inp, generator=g) * 0.3
        gd = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        x = torch.randn(s.rows, s.inp, generator=gd, device=device)
        x.mul_(scale.to(device)).add_(mean.to(device))
        xs.append(x)
    return w0, deltas, xs


def published_lbfgs(w0, deltas, xs, iterations: int, chunk: int = 8192):
    """The published gradient fusion's optimiser: float32 rows and bias-free targets ``Xi Wiᵀ``, loss = mean
    squared error over all rows and outputs, one ``LBFGS.step`` (lr 1, history 25, strong Wolfe,
    ``max_iter=iterations``, tolerances 1e-16) from W0, best iterate kept. Returns (W, info)."""
    with torch.inference_mode(False), torch.enable_grad():
        with torch.no_grad():
            X = torch.cat(xs).float()
            T = torch.cat([x @ (w0 + up @ down).T for (up, down), x in zip(deltas, xs, strict=True)])
        n_rows, out_f = X.shape[0], w0.shape[0]
        w = w0.clone().requires_grad_(True)
        best = {"loss": math.inf, "w": w0.clone()}
        if iterations == 0:
            return best["w"], {"n_iter": 0, "func_evals": 0}
        opt = torch.optim.LBFGS([w], lr=1.0, max_iter=iterations, history_size=25, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-16, tolerance_change=1e-16)

        def closure():
            opt.zero_grad()
            total = torch.zeros((), device=w.device)
            for s in range(0, n_rows, chunk):
                part = (F.linear(X[s:s + chunk], w) - T[s:s + chunk]).square().sum() / (n_rows * out_f)
                part.backward()
                total += part.detach()
            if float(total) < best["loss"]:
                best.update(loss=float(total), w=w.detach().clone())
            return total

        opt.step(closure)
        state = opt.state[w]
        return best["w"], {"n_iter": int(state.get("n_iter", 0)), "func_evals": int(state.get("func_evals", 0))}


def run_shape(s: Shape, device: torch.device, budget: float, seed: int) -> Result:
    res = Result(s)
    w0, deltas, xs = make_problem(s, device, seed)

    # --- closed form: folding the rows, then the solve
    t = clock(device)
    acc = FoldedInputs(s.inp, device=device)
    for (_up, down), x in zip(deltas, xs, strict=True):
        acc.begin_concept({"m": down})
        for start in range(0, x.shape[0], CHUNK):
            acc.add(x[start:start + CHUNK])
    problem = LayerProblem("m", {i: up for i, (up, _down) in enumerate(deltas)})
    res.gram_s = clock(device) - t
    t = clock(device)
    changes, info = solve_closed_form(acc, [problem], return_info=True)
    res.solve_s = clock(device) - t
    res.path = f"{info['space']}/{info['method']} r{info['rank']}"
    res.obj_w0 = layer_objective(acc, problem)
    res.obj_cf = layer_objective(acc, problem, changes["m"])
    t = clock(device)
    node_lb = solve_lbfgs(acc, problem, s.iters)
    res.node_lbfgs_s = clock(device) - t
    res.obj_node_lb = layer_objective(acc, problem, node_lb)

    # --- published L-BFGS: setup cost (targets), a short pilot, then the full or a capped run.
    # torch's LBFGS stops at max_iter iterations or max_eval = 1.25·max_iter loss evaluations, so
    # 1.25·iters evaluations bound a full run; extrapolation is per evaluation.
    t = clock(device)
    published_lbfgs(w0, deltas, xs, 0)
    setup = clock(device) - t
    pilot_iters = 4
    t = clock(device)
    wp, pinfo = published_lbfgs(w0, deltas, xs, pilot_iters)
    pilot = clock(device) - t
    per_eval = max(pilot - setup, 1e-9) / max(pinfo["func_evals"], 1)
    if setup + per_eval * 1.25 * s.iters <= budget:
        iters = s.iters
    else:
        iters = min(s.iters, max(pilot_iters, int((budget - setup) / (per_eval * 1.25))))
    if iters == pilot_iters:
        wl, linfo, took = wp, pinfo, pilot
    else:
        t = clock(device)
        wl, linfo = published_lbfgs(w0, deltas, xs, iters)
        took = clock(device) - t
    # A run ends at `iters` iterations, at its evaluation budget (1.25·iters), or earlier on its own
    # tolerance (loss unchanged): only the last is a finished reference run when iters < s.iters.
    hit_cap = linfo["n_iter"] >= iters or linfo["func_evals"] >= iters * 5 // 4
    res.extrapolated = iters < s.iters and hit_cap
    res.stopped_early = not hit_cap
    res.lbfgs_iters_run = linfo["n_iter"]
    res.lbfgs_per_eval_s = max(took - setup, 1e-9) / max(linfo["func_evals"], 1)
    res.lbfgs_evals_run = linfo["func_evals"]
    if res.extrapolated:
        res.lbfgs_s = setup + res.lbfgs_per_eval_s * 1.25 * s.iters
    else:
        res.lbfgs_s = took
    eye = torch.eye(s.inp, device=device)
    res.obj_lb = layer_objective(acc, problem, (wl - w0, eye))
    res.extra["setup_s"] = setup
    del xs
    return res


def solve_only_time(out: int, inp: int, device: torch.device, seed: int = 0) -> tuple[float, str]:
    """Solve time alone for a full-rank layer (synthetic well-conditioned inputs in Gram mode: the solve's
    cost does not depend on the values, only on the path, which is Cholesky here as for real full-rank
    UNet layers)."""
    g = torch.Generator().manual_seed(seed)
    acc = FoldedInputs(inp, device=device, keep_rows=False)
    ups = {}
    for i in range(N_CONCEPTS):
        acc.begin_concept({"m": (torch.randn(RANK, inp, generator=g) * 0.01).to(device)})
        acc.add(torch.randn(inp + 64, inp, generator=g).to(device))
        ups[i] = torch.randn(out, RANK, generator=g).to(device)
    problem = LayerProblem("m", ups)
    acc.gram()  # mirror the strips outside the timing, as a fusion does once per group
    t = clock(device)
    _, info = solve_closed_form(acc, [problem], return_info=True)
    return clock(device) - t, info["method"]


def whole_model(results: dict[str, Result], device: torch.device) -> None:
    """SD1.5, whole-block LoRA. Text: 12 layers × (q,k,v,out 768×768; fc1 3072×768; fc2 768×3072),
    ~30 rows per concept, 500 iterations. UNet: 16 transformer blocks — 5 at width 320 (64×64 = 4096
    pixels), 5 at 640 (1024 px), 5 at 1280 (256 px), 1 mid block at 1280 (64 px); 20 recorded steps
    per concept. Per block: 8 c×c layers (attn1 q,k,v,out; attn2 q,out; proj_in; proj_out), ff.net.0.proj
    (8c×c, GEGLU), ff.net.2 (c×4c), at 50 iterations; plus attn2 to_k/to_v (c×768) on ~14 text rows per
    concept at 500 iterations.

    Scaling: each UNet layer's Gram and L-BFGS time is the measured time of its class (attn1.to_q 320
    for c×c and ff.net.0.proj, ff.net.2 320×1280 for ff.net.2, the measured mid ff.net.2 for the mid
    block) multiplied by the FLOP ratio (Gram ∝ rows·in², L-BFGS ∝ rows·in·out); cross k/v L-BFGS ∝ c.
    The solve time of each distinct full-rank layer size is measured separately on synthetic
    Grams. A Gram shared by q/k/v (same input) is still counted once per layer, and the 320-wide
    Gram rate is used for wider c×c layers (both conservative for the closed form)."""
    to_q, ff2, mid = results["to_q"], results["ff2_320"], results["ff2_mid"]
    solve_cache: dict[tuple[int, int], float] = {}

    def solve_t(out: int, inp: int, ref: Result) -> float:
        if (out, inp) not in solve_cache:
            solve_cache[(out, inp)] = solve_only_time(out, inp, device)[0]
        return solve_cache[(out, inp)]

    def lbfgs_t(ref: Result, rows: int, out: int, inp: int) -> float:
        f = (rows * out * inp) / (ref.shape.rows * ref.shape.out * ref.shape.inp)
        return ref.lbfgs_s * f

    def gram_t(ref: Result, rows: int, inp: int) -> float:
        return ref.gram_s * (rows * inp * inp) / (ref.shape.rows * ref.shape.inp ** 2)

    lines = []
    total_cf = total_lb = 0.0

    def add(label: str, count: int, cf: float, lb: float) -> None:
        nonlocal total_cf, total_lb
        total_cf += count * cf
        total_lb += count * lb
        lines.append((label, count, cf, lb))

    for key, n in (("q_proj", 48), ("fc1", 12), ("fc2", 12)):
        r = results[key]
        add(r.shape.label, n, r.closed_s, r.lbfgs_s)
    ck = results["cross_kv"]
    for c, blocks in ((320, 5), (640, 5), (1280, 6)):
        add(f"attn2.to_k/to_v {c}x768", 2 * blocks, ck.closed_s, ck.lbfgs_s * c / 1280)
    for c, px, blocks in ((320, 4096, 5), (640, 1024, 5), (1280, 256, 5), (1280, 64, 1)):
        rows = 20 * px  # the reference records 20 steps per concept
        add(f"{c}-wide c×c ×8 @{px}px", 8 * blocks,
            gram_t(to_q, rows, c) + solve_t(c, c, to_q), lbfgs_t(to_q, rows, c, c))
        add(f"ff.net.0.proj {8 * c}x{c} @{px}px", blocks,
            gram_t(to_q, rows, c) + solve_t(8 * c, c, to_q), lbfgs_t(to_q, rows, 8 * c, c))
        if px == 64:
            add(f"ff.net.2 {c}x{4 * c} @{px}px (measured)", blocks, mid.closed_s, mid.lbfgs_s)
        else:
            add(f"ff.net.2 {c}x{4 * c} @{px}px", blocks,
                gram_t(ff2, rows, 4 * c) + solve_t(c, 4 * c, ff2), lbfgs_t(ff2, rows, c, 4 * c))

    print("\nWhole-model estimate (SD1.5, whole-block LoRA, 3 concepts):")
    print(f"  {'layer class':38s} {'count':>5s} {'closed s/layer':>15s} {'L-BFGS s/layer':>15s}")
    for label, count, cf, lb in lines:
        print(f"  {label:38s} {count:5d} {cf:15.3f} {lb:15.1f}")
    n_layers = sum(c for _, c, _, _ in lines)
    print(f"  {'TOTAL':38s} {n_layers:5d} {total_cf:14.1f}s {total_lb:14.1f}s"
          f"   speed-up ×{total_lb / max(total_cf, 1e-9):.0f}")
    print(f"  (closed-form total = {total_cf / 60:.1f} min, reference L-BFGS total = {total_lb / 60:.1f} min)")
    print("  Assumptions: " + " ".join(whole_model.__doc__.split("\n\n")[0].split()[1:]))
    print("  " + " ".join(whole_model.__doc__.split("\n\n")[1].split()))
    if to_q.shape.rows != 20 * 4096:
        print(f"  --quick: UNet classes were measured on {to_q.shape.rows} rows per concept and scaled linearly "
              f"to the reference's 20 steps.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--quick", action="store_true", help="UNet shapes with 2 steps of rows, 15 s L-BFGS budget")
    ap.add_argument("--lbfgs-budget", type=float, default=None,
                    help="seconds one L-BFGS run may take before it is capped and extrapolated "
                         "(default 100, --quick 15)")
    ap.add_argument("--only", default=None, help="comma-separated shape keys to run (skips the whole-model estimate)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="also print the per-layer results as one JSON line")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; use 1 on a machine shared with other jobs)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = args.lbfgs_budget if args.lbfgs_budget is not None else (15.0 if args.quick else 100.0)
    todo = shapes(args.quick)
    if args.only:
        keys = set(args.only.split(","))
        todo = [s for s in todo if s.key in keys]

    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} concepts={N_CONCEPTS} "
          f"rank={RANK} L-BFGS budget={budget:.0f}s{' (quick)' if args.quick else ''}", flush=True)
    results: dict[str, Result] = {}
    t_all = time.perf_counter()
    run_shape(Shape("warm", "warm-up", 16, 16, 64, 5), device, budget, 0)
    for i, s in enumerate(todo):
        r = run_shape(s, device, budget, args.seed + i)
        results[s.key] = r
        print(f"  done {s.label:24s} closed {r.closed_s:7.2f}s  node L-BFGS {r.node_lbfgs_s:7.2f}s  published "
              f"L-BFGS {'~' if r.extrapolated else ''}{r.lbfgs_s:8.1f}s  ({r.lbfgs_iters_run} it run)", flush=True)

    hdr = (f"{'layer (out x in)':22s} {'rows/c':>7s} {'it':>4s} {'Gram s':>7s} {'solve s':>8s} {'path':>20s} "
           f"{'closed s':>9s} {'L-BFGS s':>10s} {'node LB s':>10s} {'obj(W0)':>10s} {'closed/W0':>10s} "
           f"{'L-BFGS/W0':>10s} {'nodeLB/W0':>10s} {'cf<=lb':>6s} {'speed-up':>9s}")
    print("\n" + hdr)
    print("-" * len(hdr))
    for r in results.values():
        s = r.shape
        lb = f"{'~' if r.extrapolated else ''}{r.lbfgs_s:.1f}"
        ok = r.obj_cf <= r.obj_lb + 1e-9 * r.obj_w0
        print(f"{s.label:22s} {s.rows:7d} {s.iters:4d} {r.gram_s:7.2f} {r.solve_s:8.3f} {r.path:>20s} "
              f"{r.closed_s:9.2f} {lb:>10s} {r.node_lbfgs_s:10.2f} {r.obj_w0:10.3e} {r.obj_cf / r.obj_w0:10.3e} "
              f"{r.obj_lb / r.obj_w0:10.3e} {r.obj_node_lb / r.obj_w0:10.3e} {'yes' if ok else 'NO':>6s} "
              f"{r.lbfgs_s / max(r.closed_s, 1e-9):8.0f}x")
    for r in results.values():
        if r.extrapolated:
            print(f"  ~ {r.shape.label}: L-BFGS timed for {r.lbfgs_iters_run} of {r.shape.iters} iterations "
                  f"({r.lbfgs_evals_run} loss evaluations, {r.lbfgs_per_eval_s:.3f} s each, "
                  f"+ {r.extra['setup_s']:.2f} s setup) and extrapolated to the full run's evaluation budget, "
                  f"1.25 × {r.shape.iters} (an upper "
                  f"bound: a run can stop earlier on its tolerance); its objective is the one after "
                  f"{r.lbfgs_iters_run} iterations.")
        if r.stopped_early:
            print(f"  {r.shape.label}: L-BFGS stopped on its own tolerance after {r.lbfgs_iters_run} iterations "
                  f"({r.lbfgs_evals_run} evaluations); time and objective are of that finished run.")
        if r.shape.note:
            print(f"  {r.shape.label}: {r.shape.note}")
    if not args.only:
        whole_model(results, device)
    if args.json:
        print("JSON " + json.dumps([{"layer": r.shape.label, "rows": r.shape.rows, "closed_s": r.closed_s,
                                     "node_lbfgs_s": r.node_lbfgs_s, "lbfgs_s": r.lbfgs_s,
                                     "extrapolated": r.extrapolated, "cf_le_lb": r.obj_cf <= r.obj_lb + 1e-9 * r.obj_w0}
                                    for r in results.values()]))
    print(f"\nbenchmark wall time {time.perf_counter() - t_all:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
