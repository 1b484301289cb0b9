"""Per-layer solvers for Mix-of-Show gradient fusion (design §3). Plain torch, no ComfyUI imports.

For one linear (or 1×1-conv) layer with original weight ``W0 [out, in]``, concepts ``i`` with tuned
weights ``Wi = W0 + ΔWi`` (``ΔWi`` already scaled by the concept's strength) and recorded input
rows ``Xi [n_i, in]``, gradient fusion looks for

    W* = argmin_W  Σ_i ‖Xi Wᵀ − Xi Wiᵀ‖²          (biases are left alone)

Only the Gram matrices ``Gi = Xiᵀ Xi`` matter, so the rows never have to be stored
(:class:`GramAccumulator` sums them on the fly). Setting the gradient to zero gives

    (W − W0) G = B,    G = Σ_i Gi,    B = Σ_i ΔWi Gi,

and the solution closest to ``W0`` (the one L-BFGS started at ``W0`` converges to: its steps are
combinations of gradients, whose rows lie in the row space of the data) is

    W* = W0 + B G⁺.

:func:`solve_closed_form` computes that; :func:`solve_lbfgs` is the reference optimiser, run on the
raw rows, kept as an independent check and for users who want the published behaviour;
:func:`layer_objective` scores any candidate with the Gram matrices.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GramAccumulator",
    "solve_closed_form",
    "layer_objective",
    "solve_lbfgs",
]

# A concept's ΔW: a dense [out, in] matrix ([out, in, 1, 1] for 1×1 convs), a low-rank pair
# (up [out, r], down [r, in]) -- cheaper for wide layers -- or None for "no LoRA on this layer"
# (ΔW = 0: the concept's rows still count, so the layer keeps behaving like W0 on them).
DeltaLike = Union[Tensor, "tuple[Tensor, Tensor]", None]

# Safety margin between the estimated smallest eigenvalue and the cutoff before the Cholesky
# path is trusted (the inverse-iteration estimate can only over-estimate λmin).
_CHOL_MARGIN = 10.0
# Oversampling of the randomised range finder used when the total row count is small.
_OVERSAMPLE = 10
# Use the range finder only when Σ rows + oversampling is at most this fraction of `in`: above it a
# full eigendecomposition costs about the same.
_LOWRANK_FRACTION = 0.5


# --------------------------------------------------------------------------- Gram accumulation

class GramAccumulator:
    """Running ``XᵀX`` (and row count) of one layer's inputs for one concept.

    Why: the closed form only needs ``Gi = XiᵀXi``; for UNet layers the recorded rows are huge
    (20 steps × 4096 pixels per concept), the Gram matrix is only ``in × in``.

    ``dtype`` is the accumulation precision: float32 (default; rounding floor of the Gram about
    1e-8 of its largest eigenvalue, which :func:`solve_closed_form` knows about) or float64.
    ``device=None`` adopts the device of the first tensor added.
    """

    _CHUNK_ROWS = 65536  # bounds the temporary up-cast copy of a low-precision input
    _STRIP = 256  # width of the upper-triangle strips (wide Grams: ~1.6x fewer flops than a full GEMM)

    def __init__(self, in_features: int, device=None, dtype: torch.dtype = torch.float32):
        if int(in_features) <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulation dtype must be float32 or float64, got {dtype}")
        self.in_features = int(in_features)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.count = 0
        self._gram: Optional[Tensor] = None
        self._lower_stale = False  # only the upper triangle is accumulated; mirrored on read
        n_strips = min(8, max(1, self.in_features // self._STRIP))
        step = -(-self.in_features // n_strips)
        self._strips = [(i, min(i + step, self.in_features)) for i in range(0, self.in_features, step)]

    # internal: allocate lazily so that device=None can follow the data
    def _buffer(self, device: torch.device) -> Tensor:
        if self._gram is None:
            self.device = self.device if self.device is not None else device
            self._gram = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=self.device)
        elif self._gram.is_inference() and not torch.is_inference_mode_enabled():
            # created under inference_mode, now updated outside it: in-place would be refused
            self._gram = self._gram.clone()
        return self._gram

    def _accumulate(self, cols: Tensor) -> None:
        """``G += cols @ colsᵀ`` for ``cols [in, n]`` (transposed rows), upper strips only."""
        g = self._buffer(cols.device)
        if len(self._strips) == 1:
            g.addmm_(cols, cols.mT)
            return
        for i0, i1 in self._strips:
            g[i0:i1, i0:].addmm_(cols[i0:i1], cols[i0:].mT)
        self._lower_stale = True

    def add(self, x: Tensor, channels_first: bool = False) -> None:
        """Accumulate the rows of ``x``.

        ``x``: any tensor whose last dim is ``in_features`` (all leading dims are rows), or with
        ``channels_first=True`` a conv input ``[B, C, H, W]`` (or ``[B, C, ...]``) whose rows are the
        ``B·H·W`` pixels (a 1×1 conv is a linear layer applied per pixel).
        """
        if not isinstance(x, Tensor):
            raise TypeError("GramAccumulator.add expects a tensor")
        with torch.no_grad():
            target_device = self.device if self.device is not None else x.device
            if channels_first and x.ndim >= 3:
                if x.shape[1] != self.in_features:
                    raise ValueError(f"expected {self.in_features} channels at dim 1, got shape {tuple(x.shape)}")
                cols = x.reshape(x.shape[0], self.in_features, -1)  # [B, C, P]: no transposed copy
                for b in range(cols.shape[0]):
                    self._accumulate(cols[b].to(target_device, self.dtype))
                self.count += cols.shape[0] * cols.shape[2]
                return
            if x.ndim == 0 or x.shape[-1] != self.in_features:
                raise ValueError(f"expected last dim {self.in_features}, got shape {tuple(x.shape)}")
            rows = x.reshape(-1, self.in_features)
            for start in range(0, rows.shape[0], self._CHUNK_ROWS):
                r = rows[start:start + self._CHUNK_ROWS].to(target_device, self.dtype)
                self._accumulate(r.mT)
            self.count += rows.shape[0]

    @property
    def gram(self) -> Tensor:
        """``Σ XᵀX`` so far: symmetric ``[in, in]`` in the accumulation dtype (zeros when nothing
        was added). Treat it as read-only; later ``add`` calls may update it in place."""
        if self._gram is None:
            return torch.zeros(self.in_features, self.in_features, dtype=self.dtype,
                               device=self.device if self.device is not None else "cpu")
        if self._lower_stale:
            with torch.no_grad():
                g = self._gram
                self._gram = torch.triu(g) + torch.triu(g, 1).mT
            self._lower_stale = False
        return self._gram

    def merge(self, other: "GramAccumulator") -> "GramAccumulator":
        """Add another accumulator's rows into this one (e.g. per-step or per-prompt partial sums);
        returns ``self``."""
        if other.in_features != self.in_features:
            raise ValueError(f"cannot merge in_features {other.in_features} into {self.in_features}")
        if other._gram is None:
            return self
        with torch.no_grad():
            src = other.gram
            g = self._buffer(self.device if self.device is not None else src.device)
            g.add_(src.to(g.device, g.dtype))  # only the upper triangle of g is read later if stale
        self.count += other.count
        return self

    def __repr__(self) -> str:
        return (f"GramAccumulator(in_features={self.in_features}, count={self.count}, "
                f"dtype={self.dtype}, device={self.device})")


# --------------------------------------------------------------------------- helpers

def _as_2d(w: Tensor, what: str = "weight") -> Tensor:
    """``[out, in]`` view of a linear weight or a 1×1-conv weight ``[out, in, 1, 1]``."""
    if w.ndim == 2:
        return w
    if w.ndim == 4 and w.shape[2] == 1 and w.shape[3] == 1:
        return w.reshape(w.shape[0], w.shape[1])
    raise ValueError(f"{what} must be [out, in] or [out, in, 1, 1], got shape {tuple(w.shape)}")


def _work_device(device: torch.device) -> torch.device:
    # MPS has no float64: solve on the CPU there (the one place a host copy is made).
    return torch.device("cpu") if device.type == "mps" else device


def _split_delta(delta: DeltaLike, out_f: int, in_f: int, device, dtype):
    """``None`` | ``(None, dense [out, in])`` | ``(up [out, r], down [r, in])``, converted."""
    if delta is None:
        return None
    if isinstance(delta, (tuple, list)):
        if len(delta) != 2:
            raise ValueError("a factored delta must be a pair (up, down)")
        up, down = delta
        up = up.reshape(up.shape[0], up.shape[1]) if up.ndim == 4 else up
        down = down.reshape(down.shape[0], down.shape[1]) if down.ndim == 4 else down
        if up.ndim != 2 or down.ndim != 2 or up.shape[0] != out_f or down.shape[1] != in_f \
                or up.shape[1] != down.shape[0]:
            raise ValueError(f"delta factors {tuple(up.shape)} @ {tuple(down.shape)} do not give [{out_f}, {in_f}]")
        return up.to(device, dtype), down.to(device, dtype)
    dense = _as_2d(delta, "delta")
    if tuple(dense.shape) != (out_f, in_f):
        raise ValueError(f"delta shape {tuple(delta.shape)} does not match weight [{out_f}, {in_f}]")
    return None, dense.to(device, dtype)


def _dense(part) -> Optional[Tensor]:
    """The dense ``ΔW`` of a :func:`_split_delta` result (None stays None)."""
    if part is None:
        return None
    up, down = part
    return down if up is None else up @ down


def _unpack_grams(grams, in_f: int):
    tensors, counts = [], []
    for g in grams:
        if isinstance(g, GramAccumulator):
            counts.append(g.count)
            g = g.gram
        else:
            counts.append(None)
        if not isinstance(g, Tensor) or tuple(g.shape) != (in_f, in_f):
            shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise ValueError(f"Gram matrices must be [{in_f}, {in_f}], got {shape}")
        tensors.append(g)
    return tensors, counts


def _randn(shape, like: Tensor, seed: int) -> Tensor:
    """Deterministic Gaussian test vectors made directly on ``like``'s device."""
    try:
        gen = torch.Generator(device=like.device)
        gen.manual_seed(seed)
        return torch.randn(shape, generator=gen, device=like.device, dtype=like.dtype)
    except (RuntimeError, TypeError):  # a backend without device generators
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=gen, dtype=like.dtype).to(like.device)


def _lambda_min_upper(chol: Tensor, iters: int = 12) -> float:
    """Inverse iteration with the Cholesky factor: an estimate of λmin(G) that can only be too
    high (``‖G⁻¹x‖ ≤ 1/λmin`` for unit ``x``); four start vectors guard against an unlucky one."""
    x = _randn((chol.shape[0], 4), chol, seed=1234)
    x = x / x.norm(dim=0)
    growth = None
    for _ in range(iters):
        y = torch.cholesky_solve(x, chol)
        growth = y.norm(dim=0)
        x = y / growth
    return float(1.0 / growth.max())


def _lambda_max_lower(g: Tensor, iters: int = 20) -> float:
    """Power iteration: an estimate of λmax(G) that can only be too low."""
    x = _randn((g.shape[0], 4), g, seed=4321)
    x = x / x.norm(dim=0)
    growth = None
    for _ in range(iters):
        y = g @ x
        growth = y.norm(dim=0)
        x = y / growth.clamp_min(torch.finfo(g.dtype).tiny)
    return float(growth.max())


# --------------------------------------------------------------------------- closed form

def solve_closed_form(w0: Tensor, deltas: Sequence[DeltaLike], grams: Sequence[Union[Tensor, GramAccumulator]],
                      rcond: Optional[float] = None,
                      *, row_counts: Optional[Sequence[int]] = None, compute_dtype: torch.dtype = torch.float64,
                      return_info: bool = False):
    """``W* = W0 + (Σ ΔWi Gi)(Σ Gi)⁺``: the exact minimiser of ``Σ_i ‖Xi Wᵀ − Xi Wiᵀ‖²`` closest
    to ``W0`` (what the reference L-BFGS converges to), in one linear solve instead of hundreds of
    optimiser passes over the rows.

    Args:
        w0: original weight ``[out, in]`` or ``[out, in, 1, 1]``, any float dtype/device.
        deltas: per concept ``ΔWi`` (strength included): dense ``[out, in]`` / ``[out, in, 1, 1]``,
            a pair ``(up, down)`` (cheaper for wide layers), or ``None`` for ΔWi = 0.
        grams: per concept ``Gi = XiᵀXi`` ``[in, in]`` (any float dtype), or :class:`GramAccumulator`
            objects (their row counts then enable the few-rows fast path). A zero Gram (concept with
            no rows) contributes nothing.
        rcond: relative eigenvalue cutoff: eigen-directions of ``G = Σ Gi`` with eigenvalue
            ``≤ rcond·λmax(G)`` count as "no data" and get no change. ``None`` (default) sets the cutoff
            at the rounding floor of a Gram summed in the Grams' dtype,
            ``max(2·eps_G·tr(G)/√in, 10·eps_compute·tr(G))`` (eps_G: machine epsilon of the least
            precise Gram) -- about 1e-8…5e-7 of λmax for float32 Grams of activation-like data: far
            below what the reference's float32 L-BFGS resolves in its iteration budget, yet above
            the Gram's own rounding noise, which would otherwise be inverted into O(‖ΔW‖) garbage
            along directions the data never visits. Pass float64 Grams for a lower floor.
        row_counts: rows behind each Gram (overrides the accumulators' counts); when
            ``Σ rows + 10 ≤ in/2`` (text layers: ~100 rows for 768/3072 inputs) the pseudo-inverse is
            taken in the ≤ Σ rows-dimensional row space, found with a randomised range finder
            (checked against the trace; falls back to the full eigendecomposition).
        compute_dtype: precision of the solve (float64 default; the result is float32 anyway).
        return_info: also return a dict (``method``: ``cholesky`` | ``eigh`` | ``lowrank`` | ``zero``,
            ``rank``, ``tol``, ...).

    Returns:
        ``W*`` as float32, same shape and device as ``w0`` (the caller casts back).

    Method: full-rank, well-conditioned ``G`` (UNet layers with thousands of rows) → Cholesky
    solve, no inverse formed; the estimated λmin (inverse iteration on the factor) must clear the
    cutoff by 10×. Otherwise → eigendecomposition of the symmetric PSD ``G`` with the cutoff.
    """
    if len(deltas) == 0 or len(grams) == 0:
        raise ValueError("gradient fusion needs at least one concept")
    if len(deltas) != len(grams):
        raise ValueError(f"{len(deltas)} deltas but {len(grams)} Gram matrices")
    w0_2d = _as_2d(w0, "w0")
    out_f, in_f = w0_2d.shape
    gram_list, counts = _unpack_grams(grams, in_f)
    if row_counts is not None:
        if len(row_counts) != len(gram_list):
            raise ValueError("row_counts must have one entry per concept")
        counts = [int(c) for c in row_counts]
    if not all(g.is_floating_point() for g in gram_list):
        raise ValueError("Gram matrices must be floating point")

    dev = _work_device(w0.device)
    cdt = compute_dtype
    eps_c = torch.finfo(cdt).eps
    eps_g = max(max(torch.finfo(g.dtype).eps for g in gram_list), eps_c)

    with torch.no_grad():
        w0c = w0_2d.to(dev, cdt)

        def finish(delta: Optional[Tensor], info: dict):
            w = w0c if delta is None else w0c + delta
            w = w.to(torch.float32).reshape(w0.shape).to(w0.device)
            return (w, info) if return_info else w

        gs = [g.to(dev, cdt) for g in gram_list]
        G = gs[0].clone()
        for g in gs[1:]:
            G += g
        G = 0.5 * (G + G.mT)  # GEMM-accumulated XᵀX is symmetric only up to rounding
        trace = float(G.diagonal().sum())
        if not math.isfinite(trace):
            raise ValueError("non-finite values in the Gram matrices")
        parts = [_split_delta(d, out_f, in_f, dev, cdt) for d in deltas]
        if trace <= 0.0 or all(p is None for p in parts):
            return finish(None, {"method": "zero", "rank": 0, "tol": 0.0})

        # Right-hand side B = Σ ΔWi Gi. When every delta is a pair (up, down) it stays factored,
        # B = U @ M with M = [down_i Gi] (Σ r rows), and only M is solved against G.
        live = [(p, g) for p, g in zip(parts, gs) if p is not None]
        U = torch.cat([p[0] for p, _ in live], dim=1) if all(p[0] is not None for p, _ in live) else None
        rhs_rows = U.shape[1] if U is not None else out_f

        def rhs() -> Tensor:
            """M (= B when dense): [rhs_rows, in]."""
            if U is not None:
                return torch.cat([down @ g for (_, down), g in live], dim=0)
            m = None
            for (up, down), g in live:
                term = down @ g if up is None else up @ (down @ g)
                m = term if m is None else m.add_(term)
            return m

        def rhs_times(V: Tensor) -> Tensor:
            """M @ V without forming M when V is thin (few kept directions, many outputs)."""
            if U is not None or V.shape[1] >= rhs_rows:
                return rhs() @ V
            m = None
            for (up, down), g in live:
                gv = g @ V
                term = down @ gv if up is None else up @ (down @ gv)
                m = term if m is None else m.add_(term)
            return m

        if rcond is None:
            tol_abs = max(2.0 * eps_g * trace / math.sqrt(in_f), 10.0 * eps_c * trace)
        else:
            if not (rcond >= 0.0):
                raise ValueError(f"rcond must be >= 0, got {rcond}")
            tol_abs = None

        def spectral(e: Tensor, V: Tensor, method: str, extra: dict):
            lam_max = float(e[-1])
            tol = tol_abs if tol_abs is not None else rcond * lam_max
            keep = e > tol
            rank = int(keep.sum())
            info = {"method": method, "rank": rank, "tol": tol, "lambda_max": lam_max, **extra}
            if rank == 0:
                return finish(None, info)
            Vk = V[:, keep]
            Z = (rhs_times(Vk) / e[keep]) @ Vk.mT
            return finish(Z if U is None else U @ Z, info)

        # 1) Few rows: the pseudo-inverse lives in a ≤ Σ rows dimensional subspace.
        known_rows = sum(counts) if all(c is not None for c in counts) else None
        if known_rows is not None:
            k = known_rows + _OVERSAMPLE
            if k <= _LOWRANK_FRACTION * in_f:
                Q, _ = torch.linalg.qr(G @ _randn((in_f, k), G, seed=2024))
                H = Q.mT @ G @ Q
                e, Wh = torch.linalg.eigh(0.5 * (H + H.mT))
                tol = tol_abs if tol_abs is not None else rcond * float(e[-1])
                missed = trace - float(e.sum())  # Gram mass outside the captured subspace
                if missed <= (in_f - k) * tol + 10.0 * eps_c * trace:
                    return spectral(e, Q @ Wh, "lowrank", {"subspace": k})

        # 2) Full rank and well conditioned: Cholesky, no inverse, no eigendecomposition
        #    (not even tried when fewer rows than inputs were recorded).
        L, status = (None, 1) if known_rows is not None and known_rows < in_f else torch.linalg.cholesky_ex(G)
        if int(status) == 0:
            lam_min = _lambda_min_upper(L)
            tol = tol_abs if tol_abs is not None else rcond * _lambda_max_lower(G)
            if lam_min > _CHOL_MARGIN * tol:
                Z = torch.cholesky_solve(rhs().mT, L).mT
                info = {"method": "cholesky", "rank": in_f, "tol": tol, "lambda_min_est": lam_min}
                return finish(Z if U is None else U @ Z, info)

        # 3) Rank-deficient or ill-conditioned: eigendecomposition with the cutoff.
        e, V = torch.linalg.eigh(G)
        return spectral(e, V, "eigh", {})


# --------------------------------------------------------------------------- objective

def layer_objective(w: Tensor, w0: Tensor, deltas: Sequence[DeltaLike],
                    grams: Sequence[Union[Tensor, GramAccumulator]]) -> float:
    """``Σ_i tr((W − Wi) Gi (W − Wi)ᵀ)`` in float64: the summed squared output error over every
    recorded row (what both solvers minimise), without needing the rows. ``W − Wi`` is formed as
    ``(W − W0) − ΔWi`` in float64 so that nearly equal weights do not cancel in float32."""
    if len(deltas) != len(grams):
        raise ValueError(f"{len(deltas)} deltas but {len(grams)} Gram matrices")
    w2, w02 = _as_2d(w, "w"), _as_2d(w0, "w0")
    if w2.shape != w02.shape:
        raise ValueError(f"w {tuple(w.shape)} and w0 {tuple(w0.shape)} differ")
    out_f, in_f = w02.shape
    gram_list, _ = _unpack_grams(grams, in_f)
    dev = _work_device(w0.device)
    f64 = torch.float64
    with torch.no_grad():
        change = w2.to(dev, f64) - w02.to(dev, f64)
        total = torch.zeros((), dtype=f64, device=dev)
        for d, g in zip(deltas, gram_list):
            dense = _dense(_split_delta(d, out_f, in_f, dev, f64))
            e = change if dense is None else change - dense
            total += ((e @ g.to(dev, f64)) * e).sum()
        return float(total)


# --------------------------------------------------------------------------- reference L-BFGS

def _rows_of(x: Tensor, in_f: int, channels_first: bool) -> Tensor:
    if channels_first and x.ndim >= 3:
        if x.shape[1] != in_f:
            raise ValueError(f"expected {in_f} channels at dim 1, got shape {tuple(x.shape)}")
        return x.movedim(1, -1).reshape(-1, in_f)
    if x.ndim == 0 or x.shape[-1] != in_f:
        raise ValueError(f"inputs must end in {in_f} features, got shape {tuple(x.shape)}")
    return x.reshape(-1, in_f)


def solve_lbfgs(w0: Tensor, deltas: Sequence[DeltaLike], inputs: Sequence[Tensor], iterations: int, *,
                lr: float = 1.0, history_size: int = 25, channels_first: bool = False,
                chunk_size: int = 8192, device=None, return_info: bool = False):
    """The reference optimiser, from the raw rows: an independent check of the closed form.

    Mirrors the published gradient fusion: targets ``Xi Wiᵀ`` (float32, bias-free), loss = mean
    squared error over all concepts' rows and outputs, one ``torch.optim.LBFGS.step`` with
    ``lr=1, history_size=25, line_search_fn='strong_wolfe', max_iter=iterations`` (default
    ``max_eval = 1.25·max_iter``), tolerances 1e-16 (no early stop in practice), started at ``W0``,
    returning the best iterate seen by any loss evaluation. Reference counts: 500 iterations for
    text-encoder and cross-attention k/v layers, 50 for other UNet layers.

    ``inputs``: per concept, rows ``[..., in]`` (or conv inputs ``[B, C, H, W]`` with
    ``channels_first=True``). Works when called under ``torch.inference_mode()`` (ComfyUI runs
    nodes that way): autograd is re-enabled locally and every input is cloned into a normal tensor.
    Returns float32 ``W`` shaped like ``w0`` (and an info dict with ``n_iter``, ``func_evals``,
    ``best_loss`` -- the MSE -- when ``return_info``).
    """
    if len(deltas) == 0 or len(inputs) == 0:
        raise ValueError("gradient fusion needs at least one concept")
    if len(deltas) != len(inputs):
        raise ValueError(f"{len(deltas)} deltas but {len(inputs)} input sets")
    if int(iterations) < 0:
        raise ValueError("iterations must be >= 0")
    w0_2d = _as_2d(w0, "w0")
    out_f, in_f = w0_2d.shape
    dev = torch.device(device) if device is not None else w0.device
    f32 = torch.float32

    with torch.inference_mode(False), torch.enable_grad():
        base = w0_2d.detach().to(dev, f32).clone()
        xs, ts = [], []
        with torch.no_grad():
            for d, x in zip(deltas, inputs):
                rows = _rows_of(x.detach(), in_f, channels_first).to(dev, f32).clone()
                dense = _dense(_split_delta(d, out_f, in_f, dev, f32))
                wi = base if dense is None else base + dense
                xs.append(rows)
                ts.append(rows @ wi.mT)
            X = torch.cat(xs)
            T = torch.cat(ts)
        del xs, ts
        n_rows = X.shape[0]

        def result(w: Tensor, info: dict):
            w = w.detach().reshape(w0.shape)
            return (w, info) if return_info else w

        if n_rows == 0 or int(iterations) == 0:
            return result(base, {"n_iter": 0, "func_evals": 0, "best_loss": None})

        w = base.clone().requires_grad_(True)
        norm = float(n_rows * out_f)
        opt = torch.optim.LBFGS([w], lr=lr, max_iter=int(iterations), history_size=history_size,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-16, tolerance_change=1e-16)
        best = {"loss": math.inf, "w": base.clone()}

        def closure():
            opt.zero_grad()
            total = torch.zeros((), dtype=f32, device=dev)
            for s in range(0, n_rows, chunk_size):  # chunked: bounded activation memory
                r = F.linear(X[s:s + chunk_size], w) - T[s:s + chunk_size]
                part = r.square().sum() / norm
                part.backward()
                total += part.detach()
            value = float(total)
            if value < best["loss"]:
                best["loss"] = value
                best["w"] = w.detach().clone()
            return total

        opt.step(closure)
        state = opt.state[w]
        info = {"n_iter": int(state.get("n_iter", 0)), "func_evals": int(state.get("func_evals", 0)),
                "best_loss": best["loss"]}
        return result(best["w"], info)
