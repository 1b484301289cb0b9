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

With few rows (``n = Σ n_i ≤ in``) the same solution lives in the row space: with ``X`` the stacked
rows, ``K = X Xᵀ`` (``n × n``) and ``T`` the stacked targets ``Xi ΔWiᵀ``,

    W* = W0 + Tᵀ K⁺ X,

which needs only ``n²·in`` work and lies exactly in the span of the rows.

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


# --------------------------------------------------------------------------- Gram accumulation

class GramAccumulator:
    """Running ``XᵀX`` (and row count) of one layer's inputs for one concept.

    Why: the closed form only needs ``Gi = XiᵀXi``; for UNet layers the recorded rows are huge
    (20 steps × 4096 pixels per concept), the Gram matrix is only ``in × in``.

    While at most ``in`` rows have been added (text-encoder layers, low-resolution UNet blocks) the
    rows themselves are kept instead -- no more memory than the Gram -- so that
    :func:`solve_closed_form` can solve in the row space: exactly, with no Gram rounding, and in
    ``n²·in`` instead of ``in³`` work. The first add beyond ``in`` rows folds them into the Gram.

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
        self._kept: Optional[list[Tensor]] = []  # rows while count <= in_features; None once folded
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

    def _add_upper(self, g: Tensor, cols: Tensor) -> None:
        """``g += cols @ colsᵀ`` for ``cols [in, n]`` (transposed rows): upper strips only when there
        are several (the lower triangle is then stale, see :meth:`_mirrored`)."""
        if len(self._strips) == 1:
            g.addmm_(cols, cols.mT)
            return
        for i0, i1 in self._strips:
            g[i0:i1, i0:].addmm_(cols[i0:i1], cols[i0:].mT)

    def _mirrored(self, g: Tensor) -> Tensor:
        return g if len(self._strips) == 1 else torch.triu(g) + torch.triu(g, 1).mT

    def _accumulate(self, cols: Tensor) -> None:
        self._add_upper(self._buffer(cols.device), cols)
        self._lower_stale = len(self._strips) > 1

    def _fold_kept(self) -> None:
        """Leave row mode: the kept rows go into the Gram."""
        if self._kept is None:
            return
        kept, self._kept = self._kept, None
        for r in kept:
            self._accumulate(r.mT)

    def _take(self, cols: Tensor) -> None:
        """Record ``cols [in, n]`` (rows transposed, already in the accumulation dtype/device)."""
        n = cols.shape[1]
        if self._kept is not None and self.count + n <= self.in_features:
            self.device = self.device if self.device is not None else cols.device
            self._kept.append(cols.mT.clone(memory_format=torch.contiguous_format))
        else:
            self._fold_kept()
            self._accumulate(cols)
        self.count += n

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
                    self._take(cols[b].to(target_device, self.dtype))
                return
            if x.ndim == 0 or x.shape[-1] != self.in_features:
                raise ValueError(f"expected last dim {self.in_features}, got shape {tuple(x.shape)}")
            rows = x.reshape(-1, self.in_features)
            for start in range(0, rows.shape[0], self._CHUNK_ROWS):
                self._take(rows[start:start + self._CHUNK_ROWS].to(target_device, self.dtype).mT)

    @property
    def rows(self) -> Optional[Tensor]:
        """The recorded rows ``[count, in]`` while they are still kept (at most ``in`` of them),
        else None (they are in the Gram)."""
        if self._kept is None:
            return None
        if not self._kept:
            return torch.zeros(0, self.in_features, dtype=self.dtype,
                               device=self.device if self.device is not None else "cpu")
        if len(self._kept) > 1:
            self._kept = [torch.cat(self._kept)]
        return self._kept[0]

    @property
    def gram(self) -> Tensor:
        """``Σ XᵀX`` so far: symmetric ``[in, in]`` in the accumulation dtype (zeros when nothing
        was added). Treat it as read-only; later ``add`` calls may update it in place."""
        kept = self.rows
        with torch.no_grad():
            if kept is not None:  # computed on demand: the rows stay kept
                g = torch.zeros(self.in_features, self.in_features, dtype=kept.dtype, device=kept.device)
                self._add_upper(g, kept.mT)
                return self._mirrored(g)
            if self._lower_stale:
                self._gram = self._mirrored(self._gram)
                self._lower_stale = False
        return self._gram

    def merge(self, other: "GramAccumulator") -> "GramAccumulator":
        """Add another accumulator's rows into this one (e.g. per-step or per-prompt partial sums);
        returns ``self``."""
        if other.in_features != self.in_features:
            raise ValueError(f"cannot merge in_features {other.in_features} into {self.in_features}")
        if other.count == 0:
            return self
        with torch.no_grad():
            rows = other.rows
            if rows is not None:
                self._take(rows.to(self.device if self.device is not None else rows.device, self.dtype).mT)
                return self
            self._fold_kept()
            src = other.gram
            g = self._buffer(self.device if self.device is not None else src.device)
            g.add_(src.to(g.device, g.dtype))  # only the upper triangle of g is read later if stale
        self.count += other.count
        return self

    def __repr__(self) -> str:
        mode = "rows" if self._kept is not None else "gram"
        return (f"GramAccumulator(in_features={self.in_features}, count={self.count}, {mode}, "
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


def _unpack_grams(grams, in_f: int) -> list[Tensor]:
    tensors = []
    for g in grams:
        if isinstance(g, GramAccumulator):
            g = g.gram
        if not isinstance(g, Tensor) or tuple(g.shape) != (in_f, in_f):
            shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise ValueError(f"Gram matrices must be [{in_f}, {in_f}], got {shape}")
        tensors.append(g)
    return tensors


def _kept_rows(grams, in_f: int) -> Optional[list[Tensor]]:
    """Every concept's rows when all of them were kept (accumulators in row mode) and there are at
    most ``in_f`` in all -- the row-space path -- else None."""
    if not all(isinstance(g, GramAccumulator) and g.in_features == in_f for g in grams):
        return None
    rows = [g.rows for g in grams]
    if any(r is None for r in rows) or sum(r.shape[0] for r in rows) > in_f:
        return None
    return rows


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
                      *, compute_dtype: torch.dtype = torch.float64, return_info: bool = False):
    """``W* = W0 + (Σ ΔWi Gi)(Σ Gi)⁺``: the exact minimiser of ``Σ_i ‖Xi Wᵀ − Xi Wiᵀ‖²`` closest
    to ``W0`` (what the reference L-BFGS converges to), in one linear solve instead of hundreds of
    optimiser passes over the rows.

    Args:
        w0: original weight ``[out, in]`` or ``[out, in, 1, 1]``, any float dtype/device.
        deltas: per concept ``ΔWi`` (strength included): dense ``[out, in]`` / ``[out, in, 1, 1]``,
            a pair ``(up, down)`` (cheaper for wide layers), or ``None`` for ΔWi = 0.
        grams: per concept ``Gi = XiᵀXi`` ``[in, in]`` (any float dtype), or :class:`GramAccumulator`
            objects. When every accumulator still holds its rows and there are at most ``in`` of
            them in all, the solve runs in the row space (``W0 + Tᵀ K⁺ X``, see the module text).
            A zero Gram (concept with no rows) contributes nothing.
        rcond: relative eigenvalue cutoff: eigen-directions of ``G = Σ Gi`` with eigenvalue
            ``≤ rcond·λmax(G)`` count as "no data" and get no change. ``None`` (default) sets the cutoff
            at the rounding floor of a Gram summed in the inputs' dtype,
            ``max(2·eps_G·tr(G)/√in, 10·eps_compute·tr(G))`` (eps_G: machine epsilon of the least
            precise Gram or rows) -- about 1e-8…5e-7 of λmax for float32 data: far below what the
            reference's float32 L-BFGS resolves in its iteration budget, yet above the Gram's own
            rounding noise, which would otherwise be inverted into O(‖ΔW‖) garbage along directions
            the data never visits. Pass float64 Grams for a lower floor. The row-space path uses the
            same cutoff (``K`` has the nonzero eigenvalues of ``G``), so both paths agree.
        compute_dtype: precision of the solve (float64 default; the result is float32 anyway).
        return_info: also return a dict (``method``: ``cholesky`` | ``eigh`` | ``zero``; ``space``:
            ``rows`` (``K = X Xᵀ``) | ``inputs`` (``G``); ``rank``, ``tol``, ...).

    Returns:
        ``W*`` as float32, same shape and device as ``w0`` (the caller casts back).

    Method: the matrix to invert (``K`` for few rows, else ``G``) is Cholesky-factored when it is
    well conditioned -- its estimated λmin (inverse iteration on the factor) must clear the cutoff
    by 10× -- with no inverse formed; otherwise it is eigendecomposed and the cutoff applied.
    """
    if len(deltas) == 0 or len(grams) == 0:
        raise ValueError("gradient fusion needs at least one concept")
    if len(deltas) != len(grams):
        raise ValueError(f"{len(deltas)} deltas but {len(grams)} Gram matrices")
    if rcond is not None and not (rcond >= 0.0):
        raise ValueError(f"rcond must be >= 0, got {rcond}")
    w0_2d = _as_2d(w0, "w0")
    out_f, in_f = w0_2d.shape
    kept = _kept_rows(grams, in_f)
    data = kept if kept is not None else _unpack_grams(grams, in_f)
    if not all(t.is_floating_point() for t in data):
        raise ValueError("Gram matrices must be floating point")

    dev = _work_device(w0.device)
    cdt = compute_dtype
    eps_c = torch.finfo(cdt).eps
    eps_g = max(max(torch.finfo(t.dtype).eps for t in data), eps_c)

    with torch.no_grad():
        w0c = w0_2d.to(dev, cdt)
        parts = [_split_delta(d, out_f, in_f, dev, cdt) for d in deltas]
        space = "rows" if kept is not None else "inputs"

        def finish(delta: Optional[Tensor], info: dict):
            w = w0c if delta is None else w0c + delta
            w = w.to(torch.float32).reshape(w0.shape).to(w0.device)
            info = {**info, "space": space}
            return (w, info) if return_info else w

        # When every delta is a pair (up, down) the right-hand side stays factored, B = U @ M with
        # M = [down_i Gi] (Σ r rows): only M is solved against G (or K).
        live = [i for i, p in enumerate(parts) if p is not None]
        U = torch.cat([parts[i][0] for i in live], dim=1) if live and all(parts[i][0] is not None for i in live) \
            else None
        outer = (lambda z: z) if U is None else (lambda z: U @ z)

        xs = [t.to(dev, cdt) for t in data]  # rows [n_i, in], or Grams [in, in]
        if kept is not None:
            X = torch.cat(xs)
            A = X @ X.mT  # K = X Xᵀ, [n, n]
        else:
            A = xs[0].clone()
            for g in xs[1:]:
                A += g
            A = 0.5 * (A + A.mT)  # GEMM-accumulated XᵀX is symmetric only up to rounding
        trace = float(A.diagonal().sum())
        if not math.isfinite(trace):
            raise ValueError("non-finite values in the recorded inputs")
        if trace <= 0.0 or not live:
            return finish(None, {"method": "zero", "rank": 0, "tol": 0.0})
        tol_abs = max(2.0 * eps_g * trace / math.sqrt(in_f), 10.0 * eps_c * trace) if rcond is None else None

        if kept is not None:
            # Row space: Z = the targets Tᵀ ([Σr or out, n]); the change is outer(Z K⁺ X).
            Z = torch.zeros((U.shape[1] if U is not None else out_f), X.shape[0], dtype=cdt, device=dev)
            r0, c0 = 0, 0
            for p, x in zip(parts, xs):
                if p is not None:
                    up, down = p
                    if U is not None:
                        Z[r0:r0 + down.shape[0], c0:c0 + x.shape[0]] = down @ x.mT
                        r0 += down.shape[0]
                    else:
                        Z[:, c0:c0 + x.shape[0]] = down @ x.mT if up is None else up @ (down @ x.mT)
                c0 += x.shape[0]

            rhs = lambda: Z  # noqa: E731
            rhs_times = None
            to_change = lambda c: outer(c @ X)  # noqa: E731
        else:
            gs = xs

            def rhs() -> Tensor:
                """M (= B when dense): [Σr or out, in]."""
                if U is not None:
                    return torch.cat([parts[i][1] @ gs[i] for i in live], dim=0)
                m = None
                for i in live:
                    up, down = parts[i]
                    term = down @ gs[i] if up is None else up @ (down @ gs[i])
                    m = term if m is None else m.add_(term)
                return m

            def rhs_times(V: Tensor) -> Tensor:
                """M @ V without forming M when V is thin (few kept directions, many outputs)."""
                if U is not None or V.shape[1] >= out_f:
                    return rhs() @ V
                m = None
                for i in live:
                    up, down = parts[i]
                    gv = gs[i] @ V
                    term = down @ gv if up is None else up @ (down @ gv)
                    m = term if m is None else m.add_(term)
                return m

            to_change = outer
        return finish(*_apply_pinv(A, rhs, rhs_times, to_change, tol_abs, rcond))


def _apply_pinv(A: Tensor, rhs, rhs_times, to_change, tol_abs: Optional[float], rcond: Optional[float]):
    """``to_change(M A⁺)`` for the symmetric PSD ``A`` (``M = rhs()``), with eigen-directions at or
    below the cutoff (``tol_abs``, or ``rcond·λmax``) left out; returns (change, info).

    Well conditioned ``A`` → Cholesky solve, provided the estimated λmin clears the cutoff by 10×;
    otherwise → eigendecomposition. ``rhs_times(V)`` (optional) computes ``M @ V`` more cheaply for
    a thin ``V``."""
    L, status = torch.linalg.cholesky_ex(A)
    if int(status) == 0:
        lam_min = _lambda_min_upper(L)
        tol = tol_abs if tol_abs is not None else rcond * _lambda_max_lower(A)
        if lam_min > _CHOL_MARGIN * tol:
            C = torch.cholesky_solve(rhs().mT, L).mT
            return to_change(C), {"method": "cholesky", "rank": A.shape[0], "tol": tol, "lambda_min_est": lam_min}
    e, V = torch.linalg.eigh(A)
    lam_max = float(e[-1])
    tol = tol_abs if tol_abs is not None else rcond * lam_max
    keep = e > tol
    rank = int(keep.sum())
    info = {"method": "eigh", "rank": rank, "tol": tol, "lambda_max": lam_max}
    if rank == 0:
        return None, info
    Vk = V[:, keep]
    MV = rhs_times(Vk) if rhs_times is not None else rhs() @ Vk
    return to_change((MV / e[keep]) @ Vk.mT), info


# --------------------------------------------------------------------------- objective

def layer_objective(w: Tensor, w0: Tensor, deltas: Sequence[DeltaLike],
                    grams: Sequence[Union[Tensor, GramAccumulator]]) -> float:
    """``Σ_i tr((W − Wi) Gi (W − Wi)ᵀ)`` in float64: the summed squared output error over every
    recorded row (what both solvers minimise), without needing the rows; from the rows themselves,
    ``Σ_i ‖Xi (W − Wi)ᵀ‖²``, where an accumulator kept them (exact, no Gram rounding). ``W − Wi``
    is formed as ``(W − W0) − ΔWi`` in float64 so that nearly equal weights do not cancel in float32."""
    if len(deltas) != len(grams):
        raise ValueError(f"{len(deltas)} deltas but {len(grams)} Gram matrices")
    w2, w02 = _as_2d(w, "w"), _as_2d(w0, "w0")
    if w2.shape != w02.shape:
        raise ValueError(f"w {tuple(w.shape)} and w0 {tuple(w0.shape)} differ")
    out_f, in_f = w02.shape
    kept = [g.rows if isinstance(g, GramAccumulator) and g.in_features == in_f else None for g in grams]
    data = [r if r is not None else _unpack_grams([g], in_f)[0] for r, g in zip(kept, grams)]
    dev = _work_device(w0.device)
    f64 = torch.float64
    with torch.no_grad():
        change = w2.to(dev, f64) - w02.to(dev, f64)
        total = torch.zeros((), dtype=f64, device=dev)
        for d, x, rows in zip(deltas, data, kept):
            dense = _dense(_split_delta(d, out_f, in_f, dev, f64))
            e = change if dense is None else change - dense
            x = x.to(dev, f64)
            total += (x @ e.mT).square().sum() if rows is not None else ((e @ x) * e).sum()
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
