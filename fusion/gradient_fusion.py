"""Gradient fusion orchestration helpers (design §3), pure torch — no ComfyUI imports.

The ComfyUI side (``nodes/fusion_nodes.py``) records layer inputs and calls these helpers; the
per-layer mathematics lives in :mod:`fusion.solver` (closed form and L-BFGS).

Conventions
-----------
* A module's concept target is always ``W_i = W0 + α_i · ΔW_i`` with ``ΔW_i = up @ down`` computed
  from the raw LoRA factors (4-D 1×1-conv factors are squeezed to 2-D), never from module outputs
  or ``module.weight``. The fusion passes it to the solver *factored*, as the pair
  ``(α_i · up, down)`` (:func:`lora_factors`): the right-hand side ``Σ ΔW_i G_i`` then costs
  ``r·in²`` instead of ``out·in²`` and only ``r``-row systems are solved (much faster on wide layers). A concept that has no LoRA on a fused module contributes ``ΔW_i = 0``: its
  recorded inputs still count, so the fused layer keeps behaving like ``W0`` on that concept.
* Weights are solved as 2-D ``[out, in]`` float32; :func:`restore_shape` puts conv shapes back.
* Modules that always receive the same input share one recording ("input groups"): attn1
  ``to_q/to_k/to_v`` in the UNet, ``q_proj/k_proj/v_proj`` in CLIP, and attn2 ``to_k/to_v`` of one
  cross-attention layer.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

import torch

from . import solver as S

CACHE_FORMAT_VERSION = "1"
SOLVERS = ("closed_form", "lbfgs")
# Reference L-BFGS iteration counts (design §3): text encoder and cross-attention k/v, other UNet layers.
LBFGS_ITERATIONS = {"text": 500, "cross_kv": 500, "unet": 50}


@dataclass(frozen=True)
class FusionSettings:
    steps: int = 20
    width: int = 512
    height: int = 512
    seed: int = 0
    solver: str = "closed_form"
    sampler: str = "dpmpp_2m"
    scheduler: str = "normal"

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, not {self.solver!r}")

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- prompts

def concept_prompts(tokens: Sequence[str]) -> tuple[str, str]:
    """The two recording prompts of one concept, tokens in file order:
    ``("photo of a <c1> <c2>", "<c1> <c2>")``."""
    if not tokens:
        raise ValueError("a concept needs at least one token")
    joined = " ".join(tokens)
    return f"photo of a {joined}", joined


# --------------------------------------------------------------------------- deltas

def lora_delta(up: torch.Tensor, down: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``strength · up @ down`` as a 2-D float32 ``[out, in]`` matrix (1×1-conv factors squeezed)."""
    if up.ndim == 4:
        up = up.reshape(up.shape[0], up.shape[1])
        down = down.reshape(down.shape[0], down.shape[1])
    return float(strength) * (up.float() @ down.float())


def lora_factors(up: torch.Tensor, down: torch.Tensor, strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(strength · up, down)`` as 2-D float32 ``[out, r]``, ``[r, in]`` (1×1-conv factors squeezed):
    the factored form of :func:`lora_delta` that the solvers take directly."""
    if up.ndim == 4:
        up = up.reshape(up.shape[0], up.shape[1])
        down = down.reshape(down.shape[0], down.shape[1])
    return float(strength) * up.float(), down.float()


def dense_delta(delta) -> torch.Tensor | None:
    """A concept's ``ΔW`` as a dense 2-D float32 matrix: ``None`` stays ``None``, a pair
    ``(up, down)`` is multiplied out, a tensor is flattened to ``[out, in]``."""
    if delta is None:
        return None
    if isinstance(delta, (tuple, list)):
        up, down = delta
        return lora_delta(up, down)
    return as_matrix(delta)


def _delta_to(delta, device):
    if delta is None:
        return None
    if isinstance(delta, (tuple, list)):
        up, down = lora_factors(*delta)
        return up.to(device), down.to(device)
    return as_matrix(delta).to(device)


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """A weight as 2-D float32 ``[out, in]`` (``[out, in, 1, 1]`` convs are flattened)."""
    return w.reshape(w.shape[0], -1).float() if w.ndim != 2 else w.float()


def restore_shape(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return w.reshape(like.shape)


def input_group(module: str) -> str:
    """Modules that always see the same input map to one name (the one whose input is recorded)."""
    module = re.sub(r"\.attn1\.to_[kv]$", ".attn1.to_q", module)
    module = re.sub(r"\.attn2\.to_v$", ".attn2.to_k", module)
    return re.sub(r"\.self_attn\.[kv]_proj$", ".self_attn.q_proj", module)


def group_modules(modules: Iterable[str]) -> dict[str, list[str]]:
    """input-group name -> member modules (sorted, deterministic)."""
    groups: dict[str, list[str]] = {}
    for m in sorted(set(modules)):
        groups.setdefault(input_group(m), []).append(m)
    return groups


# --------------------------------------------------------------------------- solving

def gram_of_rows(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.reshape(-1, rows.shape[-1]).float()
    return rows.T @ rows


def accumulate(rows: torch.Tensor, device=None) -> S.GramAccumulator:
    """A :class:`fusion.solver.GramAccumulator` holding ``rows`` (``[..., in]``)."""
    acc = S.GramAccumulator(rows.shape[-1], device=device)
    acc.add(rows)
    return acc


def gram_tensor(g) -> torch.Tensor:
    """A Gram matrix given as a tensor or as a :class:`fusion.solver.GramAccumulator`."""
    return g.gram if isinstance(g, S.GramAccumulator) else g


def gram_sqrt(gram: torch.Tensor) -> torch.Tensor:
    """A ``[d, d]`` matrix ``R`` with ``Rᵀ R = G`` (symmetric PSD square root). Substituting ``R`` for
    the recorded rows leaves ``Σ‖X (W − W_i)ᵀ‖²`` unchanged, so L-BFGS can run on Gram matrices."""
    vals, vecs = torch.linalg.eigh(gram.double())
    return (vals.clamp_min(0).sqrt()[:, None] * vecs.T).to(gram.dtype)


@dataclass
class LayerProblem:
    """One module to fuse: its original weight, each concept's ``α_i ΔW_i`` (dense, a factored pair
    ``(α_i·up, down)``, or None = no LoRA there), and each concept's recorded inputs as a Gram matrix
    / :class:`fusion.solver.GramAccumulator` or raw rows (exactly one per concept). Accumulators keep
    their rows while they have few (at most ``in``), which lets the closed form solve in the row
    space."""
    name: str
    w0: torch.Tensor
    deltas: list
    grams: list | None = None
    rows: list | None = None
    kind: str = "unet"  # "text" | "cross_kv" | "unet" (picks the reference L-BFGS iteration count)


def solve_layer(problem: LayerProblem, solver: str = "closed_form", device=None,
                iterations: int | None = None) -> torch.Tensor:
    """Fused weight for one module, same shape and dtype as ``problem.w0``; solved in float32 on
    ``device`` (default: where ``w0`` is)."""
    device = device if device is not None else problem.w0.device
    w0 = as_matrix(problem.w0).to(device)
    deltas = [_delta_to(d, device) for d in problem.deltas]
    if solver == "closed_form":
        if problem.grams is not None:
            grams = [g if isinstance(g, S.GramAccumulator) else g.to(device) for g in problem.grams]
        else:
            grams = [accumulate(r, device) for r in problem.rows]
        w = S.solve_closed_form(w0, deltas, grams)
    elif solver == "lbfgs":
        if problem.rows is not None:
            inputs = [r.to(device).float().reshape(-1, w0.shape[1]) for r in problem.rows]
        else:  # the rows where an accumulator still has them, else a square root of the Gram
            inputs = [g.rows.to(device).float() if isinstance(g, S.GramAccumulator) and g.rows is not None
                      else gram_sqrt(gram_tensor(g).to(device).float()) for g in problem.grams]
        w = S.solve_lbfgs(w0, deltas, inputs, iterations or LBFGS_ITERATIONS.get(problem.kind, 50))
    else:
        raise ValueError(f"unknown solver {solver!r}")
    return restore_shape(w.float(), problem.w0).to(problem.w0.dtype)


def exact_merge(w0: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """One concept: the fused weight is simply its merged weight ``W0 + α ΔW`` (objective 0)."""
    if delta is None:
        return w0.clone()
    return restore_shape(as_matrix(w0) + dense_delta(delta).to(w0.device), w0).to(w0.dtype)


def _inputs_key(p: LayerProblem):
    """Identity of a problem's recorded inputs (the same Gram / row objects, per concept) and width."""
    xs = p.grams if p.grams is not None else p.rows
    return None if xs is None else (tuple(id(x) for x in xs), as_matrix(p.w0).shape[1])


def _stacked(members: Sequence[LayerProblem]) -> LayerProblem:
    """Modules sharing one input group solved as one: ``[W0_a; W0_b; …]`` against the same Grams.
    The closed form treats every output row independently with the same ``G``, so stacking gives
    exactly the per-module solutions, with one factorisation of ``G`` instead of one per module.
    Factored deltas stack as ``(blockdiag(up_a, up_b, …), [down_a; down_b; …])``; a member without a
    LoRA for a concept contributes a zero block (``ΔW = 0``, same as ``None``)."""
    w0s = [as_matrix(m.w0) for m in members]
    in_f = w0s[0].shape[1]
    deltas = []
    for i in range(len(members[0].deltas)):
        ds = [m.deltas[i] for m in members]
        if all(d is None for d in ds):
            deltas.append(None)
        elif all(d is None or isinstance(d, (tuple, list)) for d in ds):
            ups, downs = [], []
            for d, w in zip(ds, w0s):
                u, v = lora_factors(*d) if d is not None else (torch.zeros(w.shape[0], 1), torch.zeros(1, in_f))
                ups.append(u)
                downs.append(v)
            deltas.append((torch.block_diag(*ups), torch.cat(downs)))
        else:
            deltas.append(torch.cat([torch.zeros_like(w) if d is None else dense_delta(d) for d, w in zip(ds, w0s)]))
    m0 = members[0]
    return LayerProblem("+".join(m.name for m in members), torch.cat(w0s), deltas, grams=m0.grams, rows=m0.rows,
                        kind=m0.kind)


def solve_layers(problems: Sequence[LayerProblem], solver: str = "closed_form", device=None,
                 on_layer: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """Solve a list of modules; ``on_layer(name)`` runs after each (progress / interrupt checks).

    With the closed form, modules that share their recorded inputs (the same Gram / row objects:
    q/k/v of one attention, k/v of one cross-attention) are solved together (:func:`_stacked`)."""
    batches: dict = {}
    for p in problems:
        key = _inputs_key(p) if solver == "closed_form" and len(p.deltas) > 1 else None
        batches.setdefault(key if key is not None else ("single", id(p)), []).append(p)
    out = {}
    for members in batches.values():
        p = members[0]
        if len(p.deltas) == 1:
            out[p.name] = exact_merge(p.w0, p.deltas[0])
        elif len(members) == 1:
            out[p.name] = solve_layer(p, solver, device)
        else:
            w = solve_layer(_stacked(members), solver, device)
            start = 0
            for m in members:
                rows = m.w0.shape[0]
                out[m.name] = restore_shape(w[start:start + rows], m.w0).to(m.w0.dtype)
                start += rows
        if on_layer is not None:
            for m in members:
                on_layer(m.name)
    return {p.name: out[p.name] for p in problems}


def objective(w: torch.Tensor, problem: LayerProblem) -> float:
    """``Σ_i ‖X_i (W − W_i)ᵀ‖²`` (from Grams: ``Σ_i tr((W − W_i) G_i (W − W_i)ᵀ)``)."""
    w = as_matrix(w).double()
    w0 = as_matrix(problem.w0).double().to(w.device)
    total = 0.0
    grams = problem.grams or [gram_of_rows(r) for r in problem.rows]
    for d, g in zip(problem.deltas, map(gram_tensor, grams)):
        e = w - w0 - (0 if d is None else dense_delta(d).double().to(w.device))
        total += float(((e @ g.double().to(w.device)) * e).sum())
    return total


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖``."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


# --------------------------------------------------------------------------- cache keys

def _h(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def cache_key(base_identity: str, concepts: Sequence[tuple[str, float, float]], settings: FusionSettings) -> str:
    """Key of a whole fusion result: base model identity, each ED-LoRA's file digest with its
    (text-encoder, UNet) strengths in set order, and the settings."""
    return _h("fused", CACHE_FORMAT_VERSION, base_identity, [list(c) for c in concepts], settings.as_dict())


def text_stats_key(clip_identity: str, digest: str, text_strength: float) -> str:
    """Key of one concept's stage-1 recordings: they depend only on the base CLIP, the concept's own
    file and its text-encoder strength — not on the other concepts."""
    return _h("text-stats", CACHE_FORMAT_VERSION, clip_identity, digest, float(text_strength))


def tensor_fingerprint(t: torch.Tensor, samples: int = 2048) -> str:
    """Cheap content fingerprint: shape, dtype and an evenly strided sample of the values."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // samples)
    sample = flat[::step][:samples].float().cpu()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
