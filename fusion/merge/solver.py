"""Per-layer solvers for Mix-of-Show gradient fusion (docs/design.md §5.6-§5.9). Plain torch, no ComfyUI imports.

One linear (or 1×1-conv) layer with original weight ``W0 [out, in]``; concept ``i`` tuned it to
``Wi = W0 + Ui Di`` (``Ui = αi·upi [out, ri]`` with the strength folded in, ``Di = downi [ri, in]``)
and produced the input rows ``Xi [ni, in]``. Gradient fusion looks for

    W* = argmin_W  Σ_i ‖Xi Wᵀ − Xi Wiᵀ‖²  +  λ‖W − W0‖²          (biases are left alone)

Setting the gradient to zero, with ``G = Σ_i XiᵀXi`` (every concept's rows, also those of concepts
without a LoRA on this layer) and ``Mi = Di XiᵀXi``:

    (W − W0)(G + λI) = Σ_i Ui Mi = U M,      U = [U1 … Un]  [out, R],   M = [M1; …; Mn]  [R, in]

so the fused change is itself a LoRA of rank ``R = Σ ri``: ``W* − W0 = U C`` with the right factor

    C = M (G + λI)⁻¹            (λ = 0: the pseudo-inverse, the solution closest to W0 -- the one
                                 the reference L-BFGS started at W0 converges to)

With few rows (``n = Σ ni ≤ in``) the same ``C`` is computed in the row space: ``X`` the stacked rows,
``K = X Xᵀ``, ``Z`` the stacked ``Di Xiᵀ`` (in the columns of concept i's rows): ``C = Z (K + λI)⁻¹ X``.

Only ``G``, the ``Mi`` and (while they take less memory than ``G``'s upper triangle) the rows are ever needed:
:class:`FoldedInputs` keeps exactly these for one input group, whatever the number of concepts.
``λ = ridge · tr(G) / in`` (:func:`solve_closed_form`); ``ridge = 0`` is the unregularised minimiser.

:func:`solve_closed_form` returns the factored change ``(U, C)``; :func:`solve_lbfgs` runs the
reference optimiser on the same objective (and its iterates are ``U·C`` too, see there);
:func:`layer_objective` scores any change ``A B`` with the folded data.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
from torch import Tensor

__all__ = [
    "FoldedInputs",
    "LayerProblem",
    "solve_closed_form",
    "solve_lbfgs",
    "solve_work_bytes",
    "layer_objective",
]

# Safety margin between the estimated smallest eigenvalue and the cutoff before the Cholesky path
# of the unregularised solve is trusted (the inverse-iteration estimate can only over-estimate λmin).
_CHOL_MARGIN = 10.0

# What return_info=True adds: method, space, rank, tol, ridge... (solve_closed_form, solve_lbfgs).
SolveInfo = dict[str, str | int | float]


# --------------------------------------------------------------------------- recorded inputs

class FoldedInputs:
    """The recorded inputs of one input group (modules that see the same input), folded over concepts.

    Per concept, call :meth:`begin_concept` with the concept's LoRA down factors on the group's modules,
    then :meth:`add` its rows. What is kept does not grow with the number of concepts:

    * ``G = Σ XᵀX`` over all rows (float32 by default), only its upper triangle, kept as strips of rows
      (``[i1 − i0, in − i0]`` each: 53-75 % of ``in²`` for wide groups; one full ``in × in`` below 512 inputs);
    * per concept and module ``M = D XᵀX`` (``r × in``), accumulated with the rows;
    * while they take no more memory than those strips (:attr:`row_limit` rows: text-encoder layers,
      cross-attention k/v, UNet blocks recorded at low resolution) the rows themselves instead, so that
      :func:`solve_closed_form` can solve exactly in the row space. The first add beyond that folds them
      into ``G`` and the ``M``.

    ``device=None`` adopts the device of the first rows added; ``keep_rows=False`` folds from the first
    row on (the Gram path only: tests and benchmarks compare both paths).
    """

    _CHUNK_ROWS = 65536  # bounds the temporary up-cast copy of a low-precision input
    _STRIP = 256  # width of the upper-triangle strips (wide Grams: ~1.6x fewer flops than a full GEMM)

    def __init__(self, in_features: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 keep_rows: bool = True) -> None:
        if int(in_features) <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulation dtype must be float32 or float64, got {dtype}")
        self.in_features = int(in_features)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.count = 0
        self._downs: list[dict[str, Tensor]] = []  # per concept: module -> D [r, in]
        # the current concept's D stacked [Σr, in] in the rows' device and dtype (earlier ones are stacked again
        # only when kept rows are folded: a copy per concept would grow with the number of concepts)
        self._current_down: tuple[int, Tensor] | None = None
        self._rhs: list[Tensor | None] = []  # per concept: stacked D XᵀX (Gram mode)
        self._rows: list[list[Tensor]] | None = [] if keep_rows else None  # per concept: row chunks; None once folded
        self._gram_strips: list[Tensor] | None = None  # G's upper triangle: rows i0:i1, columns i0: of each strip
        n_strips = min(8, max(1, self.in_features // self._STRIP))
        step = -(-self.in_features // n_strips)
        self._strips = [(i, min(i + step, self.in_features)) for i in range(0, self.in_features, step)]
        strip_elements = sum((i1 - i0) * (self.in_features - i0) for i0, i1 in self._strips)
        self.gram_bytes = strip_elements * torch.finfo(dtype).bits // 8
        """What the Gram holds once the rows are folded in: its upper-triangle strips."""
        self.row_limit = strip_elements // self.in_features
        """Rows are kept while there are at most this many: no more memory than the Gram's strips."""

    # ---- recording
    def begin_concept(self, downs: Mapping[str, Tensor]) -> int:
        """Start the next concept; ``downs``: its LoRA down factors ``D [r, in]`` (or ``[r, in, 1, 1]``)
        on this group's modules (empty: no LoRA here -- its rows still count). Returns its index."""
        flat: dict[str, Tensor] = {}
        for name, d in downs.items():
            d = d.reshape(d.shape[0], -1)
            if d.shape[1] != self.in_features:
                raise ValueError(f"down factor of {name} is {tuple(d.shape)}; the inputs are {self.in_features} wide")
            flat[name] = d
        self._downs.append(flat)
        self._current_down = None
        self._rhs.append(None)
        if self._rows is not None:
            self._rows.append([])
        return len(self._downs) - 1

    @property
    def concepts(self) -> int:
        return len(self._downs)

    def add(self, x: Tensor, channels_first: bool = False) -> None:
        """Rows of the current concept: any tensor whose last dim is ``in_features`` (all leading dims
        are rows), or with ``channels_first=True`` a conv input ``[B, C, H, W]`` (rows = the pixels)."""
        if not self._downs:
            raise RuntimeError("begin_concept() before add()")
        if not isinstance(x, Tensor):
            raise TypeError("FoldedInputs.add expects a tensor")
        with torch.no_grad():
            target = self.device if self.device is not None else x.device
            if channels_first and x.ndim >= 3:
                if x.shape[1] != self.in_features:
                    raise ValueError(f"expected {self.in_features} channels at dim 1, got shape {tuple(x.shape)}")
                cols = x.reshape(x.shape[0], self.in_features, -1)  # [B, C, P]: no transposed copy
                for b in range(cols.shape[0]):
                    self._take(cols[b].to(target, self.dtype))
                return
            if x.ndim == 0 or x.shape[-1] != self.in_features:
                raise ValueError(f"expected last dim {self.in_features}, got shape {tuple(x.shape)}")
            rows = x.reshape(-1, self.in_features)
            for start in range(0, rows.shape[0], self._CHUNK_ROWS):
                self._take(rows[start:start + self._CHUNK_ROWS].to(target, self.dtype).mT)

    def _take(self, cols: Tensor) -> None:
        """Record ``cols [in, n]`` (rows transposed) of the current concept."""
        n = cols.shape[1]
        if n == 0:
            return
        self.device = self.device if self.device is not None else cols.device
        if self._rows is not None and self.count + n <= self.row_limit:
            self._rows[-1].append(cols.mT.clone(memory_format=torch.contiguous_format))
        else:
            self._fold_rows()
            self._accumulate(len(self._downs) - 1, cols)
        self.count += n

    def _fold_rows(self) -> None:
        """Leave row mode: the kept rows go into G and the M."""
        if self._rows is None:
            return
        kept, self._rows = self._rows, None
        for i in range(len(kept)):
            chunks, kept[i] = kept[i], []  # each concept's rows go as soon as they are folded
            for r in chunks:
                self._accumulate(i, r.mT)

    def _stacked_down(self, i: int, like: Tensor) -> Tensor | None:
        """Concept ``i``'s down factors stacked ``[Σr, in]`` in ``like``'s device and dtype (None: no LoRA)."""
        if self._current_down is not None and self._current_down[0] == i:
            return self._current_down[1]
        downs = self._downs[i]
        if not downs:
            return None
        d = torch.cat([dd.to(like.device, like.dtype) for dd in downs.values()])
        if i == len(self._downs) - 1:
            self._current_down = (i, d)  # moved once per concept, not per chunk
        return d

    def _accumulate(self, i: int, cols: Tensor) -> None:
        if self._gram_strips is None:
            n = self.in_features
            self._gram_strips = [torch.zeros(i1 - i0, n - i0, dtype=self.dtype, device=cols.device)
                                 for i0, i1 in self._strips]
        elif self._gram_strips[0].is_inference() and not torch.is_inference_mode_enabled():
            # created under inference_mode, now updated outside it: in-place would be refused
            self._gram_strips = [g.clone() for g in self._gram_strips]
            self._rhs = [None if m is None else m.clone() for m in self._rhs]
        for (i0, i1), strip in zip(self._strips, self._gram_strips, strict=True):
            strip.addmm_(cols[i0:i1], cols[i0:].mT)
        d = self._stacked_down(i, cols)
        if d is not None:
            m = (d @ cols) @ cols.mT  # D XᵀX without forming XᵀX: [Σr, in]
            folded = self._rhs[i]
            self._rhs[i] = m if folded is None else folded.add_(m)

    # ---- reading
    def held_bytes(self) -> dict[str, int]:
        """Bytes held now: ``rows``, ``gram`` (its strips), ``rhs`` (the ``M``), ``downs`` (the stacked ``D``
        of the current concept; the factors themselves belong to the caller)."""
        def nbytes(ts: Sequence[Tensor | None]) -> int:
            return sum(t.numel() * t.element_size() for t in ts if t is not None)
        return {"rows": nbytes([c for chunks in self._rows or [] for c in chunks]),
                "gram": nbytes(self._gram_strips or []), "rhs": nbytes(self._rhs),
                "downs": nbytes([self._current_down[1]] if self._current_down is not None else [])}

    @property
    def in_row_mode(self) -> bool:
        """True while the rows themselves are kept (at most :attr:`row_limit` of them)."""
        return self._rows is not None

    def rows(self, i: int) -> Tensor:
        """Concept ``i``'s rows ``[n_i, in]`` (row mode only)."""
        if self._rows is None:
            raise RuntimeError("the rows were folded into the Gram matrix")
        chunks = self._rows[i]
        if not chunks:
            return torch.zeros(0, self.in_features, dtype=self.dtype, device=self.device or "cpu")
        if len(chunks) > 1:
            self._rows[i] = chunks = [torch.cat(chunks)]
        return chunks[0]

    @property
    def gram_is_mirrored(self) -> bool:
        """True when :meth:`gram` mirrors an accumulated upper triangle (exactly symmetric); False when it
        comes from one GEMM (rows kept, or fewer than 512 inputs: symmetric up to rounding)."""
        return self._rows is None and len(self._strips) > 1

    def gram(self, dtype: torch.dtype | None = None) -> Tensor:
        """``Σ XᵀX`` over every concept's rows: symmetric ``[in, in]`` (zeros when nothing was added), in
        ``dtype`` (default: the accumulation dtype; from kept rows it is computed in that precision)."""
        dtype = dtype or self.dtype
        with torch.no_grad():
            if self._rows is not None:
                x = torch.cat([self.rows(i) for i in range(self.concepts)]).to(dtype) if self.concepts else \
                    torch.zeros(0, self.in_features, dtype=dtype)
                return x.mT @ x
            if self._gram_strips is None:
                return torch.zeros(self.in_features, self.in_features, dtype=dtype, device=self.device or "cpu")
            if len(self._strips) == 1:
                return self._gram_strips[0].to(dtype)
            n = self.in_features
            g = torch.empty(n, n, dtype=dtype, device=self._gram_strips[0].device)
            for (i0, i1), strip in zip(self._strips, self._gram_strips, strict=True):
                g[i0:i1, i0:] = strip
                block = g[i0:i1, i0:i1]  # accumulated whole: its upper triangle is the one kept
                block.copy_(torch.triu(block) + torch.triu(block, 1).mT)
                g[i1:, i0:i1] = g[i0:i1, i1:].mT
            return g

    def down(self, i: int, module: str) -> Tensor | None:
        """Concept ``i``'s down factor ``D [r, in]`` on ``module`` (None: no LoRA there)."""
        return self._downs[i].get(module)

    def rhs(self, i: int, module: str, dtype: torch.dtype | None = None) -> Tensor | None:
        """``M = D XᵢᵀXᵢ [r, in]`` of concept ``i`` on ``module`` (None: no LoRA there), in ``dtype``
        (default: the accumulation dtype; from kept rows it is computed in that precision)."""
        dtype = dtype or self.dtype
        d = self._downs[i].get(module)
        if d is None:
            return None
        if self._rows is not None:
            x = self.rows(i).to(dtype)
            return (d.to(x.device, dtype) @ x.mT) @ x
        folded = self._rhs[i]
        if folded is None:  # the concept has no rows
            return torch.zeros(d.shape, dtype=dtype, device=self.device or "cpu")
        start = 0
        for name, dd in self._downs[i].items():
            if name == module:
                return folded[start:start + dd.shape[0]].to(dtype)
            start += dd.shape[0]
        raise AssertionError("unreachable")

    def __repr__(self) -> str:
        mode = "rows" if self.in_row_mode else "gram"
        return (f"FoldedInputs(in_features={self.in_features}, concepts={self.concepts}, count={self.count}, "
                f"{mode}, dtype={self.dtype}, device={self.device})")


@dataclass
class LayerProblem:
    """One module to fuse against a :class:`FoldedInputs`: ``ups[i] = Ui = αi·upi [out, ri]`` for every
    concept ``i`` with a LoRA on it (the matching ``Di`` is ``inputs.down(i, name)``)."""
    name: str
    ups: dict[int, Tensor] = field(default_factory=dict)

    def stacked_up(self, device: torch.device | str | None, dtype: torch.dtype) -> Tensor:
        """``U = [U_i …]`` in concept order, ``[out, R]``."""
        return torch.cat([self.ups[i].reshape(self.ups[i].shape[0], -1).to(device, dtype) for i in sorted(self.ups)],
                         dim=1)


# --------------------------------------------------------------------------- helpers

def _work_device(device: torch.device | str | None) -> torch.device:
    # MPS has no float64: solve on the CPU there.
    device = torch.device(device) if device is not None else torch.device("cpu")
    return torch.device("cpu") if device.type == "mps" else device


def _randn(shape: tuple[int, ...], like: Tensor, seed: int) -> Tensor:
    """Deterministic Gaussian test vectors made directly on ``like``'s device."""
    try:
        gen = torch.Generator(device=like.device)
        gen.manual_seed(seed)
        return torch.randn(shape, generator=gen, device=like.device, dtype=like.dtype)
    except (RuntimeError, TypeError):  # a backend without device generators
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=gen, dtype=like.dtype).to(like.device)


def _lambda_min_upper(chol: Tensor, iters: int = 12) -> float:
    """Inverse iteration with the Cholesky factor: an estimate of λmin(A) that can only be too
    high (``‖A⁻¹x‖ ≤ 1/λmin`` for unit ``x``); four start vectors guard against an unlucky one."""
    x = _randn((chol.shape[0], 4), chol, seed=1234)
    x = x / x.norm(dim=0)
    growth: Tensor | None = None
    for _ in range(iters):
        y = torch.cholesky_solve(x, chol)
        growth = y.norm(dim=0)
        x = y / growth
    assert growth is not None, "iters must be at least 1"
    return float(1.0 / growth.max())


def _lambda_max_lower(a: Tensor, iters: int = 20) -> float:
    """Power iteration: an estimate of λmax(A) that can only be too low."""
    x = _randn((a.shape[0], 4), a, seed=4321)
    x = x / x.norm(dim=0)
    growth: Tensor | None = None
    for _ in range(iters):
        y = a @ x
        growth = y.norm(dim=0)
        x = y / growth.clamp_min(torch.finfo(a.dtype).tiny)
    assert growth is not None, "iters must be at least 1"
    return float(growth.max())


def _down(inputs: FoldedInputs, i: int, module: str) -> Tensor:
    """``D`` of concept ``i`` on ``module``, which has a LoRA there (``i`` is in the problem's ``ups``)."""
    d = inputs.down(i, module)
    assert d is not None, f"concept {i} has an up factor on {module} but no down factor"
    return d


def _rhs(inputs: FoldedInputs, i: int, module: str, dtype: torch.dtype) -> Tensor:
    """``M`` of concept ``i`` on ``module``, which has a LoRA there (``i`` is in the problem's ``ups``)."""
    m = inputs.rhs(i, module, dtype)
    assert m is not None, f"concept {i} has an up factor on {module} but no down factor"
    return m


def _solve_psd(A: Tensor, rhs: Tensor, ridge_abs: float, tol_abs: float | None,
               rcond: float | None) -> tuple[Tensor, SolveInfo]:
    """``rhs (A + ridge·I)⁻¹`` for the symmetric PSD ``A`` (``rhs [k, d]``; ``A`` is overwritten); returns
    (solution, info).

    With a ridge the matrix is positive definite: Cholesky. Without, eigen-directions at or below the
    cutoff (``tol_abs``, or ``rcond·λmax``) are left out (pseudo-inverse): Cholesky when the estimated
    λmin clears the cutoff by 10×, else an eigendecomposition."""
    if ridge_abs > 0.0:
        A.diagonal().add_(ridge_abs)  # in place: an identity and its multiple would be 2 more in² float64 temporaries
        L, status = torch.linalg.cholesky_ex(A)
        if int(status) == 0:
            return torch.cholesky_solve(rhs.mT, L).mT, {"method": "cholesky", "rank": A.shape[0], "ridge": ridge_abs}
        tol_abs, rcond = 0.0, None  # numerically indefinite despite the ridge: fall through to eigh
    else:
        L, status = torch.linalg.cholesky_ex(A)
        if int(status) == 0:
            lam_min = _lambda_min_upper(L)
            if tol_abs is not None:
                tol = tol_abs
            else:
                assert rcond is not None, "solve_closed_form passes tol_abs whenever rcond is None"
                tol = rcond * _lambda_max_lower(A)
            if lam_min > _CHOL_MARGIN * tol:
                return torch.cholesky_solve(rhs.mT, L).mT, {"method": "cholesky", "rank": A.shape[0], "tol": tol,
                                                             "lambda_min_est": lam_min}
    e, V = torch.linalg.eigh(A)
    lam_max = float(e[-1])
    if tol_abs is not None:
        tol = tol_abs
    else:
        assert rcond is not None, "solve_closed_form passes tol_abs whenever rcond is None"
        tol = rcond * lam_max
    keep = e > tol
    info: SolveInfo = {"method": "eigh", "rank": int(keep.sum()), "tol": tol, "lambda_max": lam_max, "ridge": ridge_abs}
    Vk = V[:, keep]
    return ((rhs @ Vk) / e[keep]) @ Vk.mT, info


# --------------------------------------------------------------------------- closed form

@overload
def solve_closed_form(inputs: FoldedInputs, problems: Sequence[LayerProblem], ridge: float = 0.0,
                      rcond: float | None = None, *, compute_dtype: torch.dtype = torch.float64,
                      return_info: Literal[False] = False) -> dict[str, tuple[Tensor, Tensor]]: ...


@overload
def solve_closed_form(inputs: FoldedInputs, problems: Sequence[LayerProblem], ridge: float = 0.0,
                      rcond: float | None = None, *, compute_dtype: torch.dtype = torch.float64,
                      return_info: Literal[True]) -> tuple[dict[str, tuple[Tensor, Tensor]], SolveInfo]: ...


@overload
def solve_closed_form(inputs: FoldedInputs, problems: Sequence[LayerProblem], ridge: float = 0.0,
                      rcond: float | None = None, *, compute_dtype: torch.dtype = torch.float64,
                      return_info: bool = False
                      ) -> dict[str, tuple[Tensor, Tensor]] | tuple[dict[str, tuple[Tensor, Tensor]], SolveInfo]: ...


def solve_closed_form(inputs: FoldedInputs, problems: Sequence[LayerProblem], ridge: float = 0.0,
                      rcond: float | None = None, *, compute_dtype: torch.dtype = torch.float64,
                      return_info: bool = False
                      ) -> dict[str, tuple[Tensor, Tensor]] | tuple[dict[str, tuple[Tensor, Tensor]], SolveInfo]:
    """The fused change of every module in ``problems`` (all reading ``inputs``), factored:
    ``W* − W0 = U C`` with ``U = [Ui …]`` and ``C = M (G + λI)⁻¹`` (module text), in one solve shared by
    the modules (one factorisation of ``G`` or ``K`` for q/k/v).

    Args:
        inputs: the group's recorded inputs (:class:`FoldedInputs`). In row mode the solve runs in the
            row space (``n × n``), else against ``G`` (``in × in``).
        problems: the modules; each needs at least one concept with a LoRA.
        ridge: ``λ = ridge · tr(G) / in`` (scale-free: relative to the mean eigenvalue of ``G``). 0 is the
            exact, unregularised minimiser closest to ``W0``.
        rcond: only for ``ridge = 0``: relative eigenvalue cutoff; directions of ``G`` with eigenvalue
            ``≤ rcond·λmax`` count as "no data" and get no change. ``None`` (default) puts the cutoff at
            the rounding floor of a Gram summed in the accumulation dtype,
            ``max(2·eps_G·tr(G)/√in, 10·eps_compute·tr(G))`` -- below it the Gram's rounding noise would
            be inverted into garbage. The row-space path uses the same cutoff (``K`` has the nonzero
            eigenvalues of ``G``).
        compute_dtype: precision of the solve (float64 default; the factors are returned as float32).
        return_info: also return a dict (``method``: ``cholesky`` | ``eigh`` | ``zero``; ``space``:
            ``rows`` | ``inputs``; ``rank``, ``tol``, ``ridge``).

    Returns:
        ``{name: (U [out, R], C [R, in])}`` float32 on the inputs' device (``C = 0`` when nothing was
        recorded: the module keeps ``W0``).
    """
    if not problems:
        return ({}, {"method": "zero"}) if return_info else {}
    if any(not p.ups for p in problems):
        raise ValueError("every module to fuse needs at least one concept with a LoRA on it")
    if not ridge >= 0.0 or (rcond is not None and not rcond >= 0.0):
        raise ValueError(f"ridge and rcond must be >= 0, got {ridge}, {rcond}")
    in_f = inputs.in_features
    dev = _work_device(inputs.device)
    cdt = compute_dtype
    eps_c = torch.finfo(cdt).eps
    eps_g = max(torch.finfo(inputs.dtype).eps, eps_c)
    finish: Callable[[Tensor], Tensor]
    info: SolveInfo
    with torch.no_grad():
        ups = [p.stacked_up(dev, cdt) for p in problems]
        sizes = [u.shape[1] for u in ups]
        space = "rows" if inputs.in_row_mode else "inputs"
        if inputs.in_row_mode:
            # every concept's rows up-cast straight into one X (no per-concept copies beside it: the peak of a
            # wide group's solve, docs/design.md §5.7)
            counts = [inputs.rows(i).shape[0] for i in range(inputs.concepts)]
            starts = [sum(counts[:i]) for i in range(len(counts))]
            X = torch.empty(sum(counts), in_f, dtype=cdt, device=dev)
            for i, c0 in enumerate(starts):
                X[c0:c0 + counts[i]] = inputs.rows(i)
            A = X @ X.mT  # K = X Xᵀ
            # Z: per module and concept, D_i X_iᵀ in the columns of concept i's rows
            Z = torch.zeros(sum(sizes), X.shape[0], dtype=cdt, device=dev)
            r0 = 0
            for p in problems:
                for i in sorted(p.ups):
                    d = _down(inputs, i, p.name).to(dev, cdt)
                    x_i = X[starts[i]:starts[i] + counts[i]]
                    Z[r0:r0 + d.shape[0], starts[i]:starts[i] + counts[i]] = d @ x_i.mT
                    r0 += d.shape[0]
            rhs, finish = Z, (lambda c: c @ X)
        else:
            A = inputs.gram(cdt).to(dev)
            if not inputs.gram_is_mirrored:  # one GEMM's XᵀX is symmetric only up to rounding: the mean of A and Aᵀ
                A = A + A.mT
                A.mul_(0.5)
            rhs = torch.cat([_rhs(inputs, i, p.name, cdt).to(dev) for p in problems for i in sorted(p.ups)])
            finish = lambda c: c  # noqa: E731
        trace = float(A.diagonal().sum())
        if not math.isfinite(trace):
            raise ValueError("non-finite values in the recorded inputs")
        if trace <= 0.0:
            C, info = torch.zeros(sum(sizes), in_f, dtype=cdt, device=dev), {"method": "zero", "rank": 0}
        else:
            ridge_abs = ridge * trace / in_f
            tol_abs = None
            if ridge == 0.0 and rcond is None:
                tol_abs = max(2.0 * eps_g * trace / math.sqrt(in_f), 10.0 * eps_c * trace)
            C, info = _solve_psd(A, rhs, ridge_abs, tol_abs, rcond)
            C = finish(C)
        out: dict[str, tuple[Tensor, Tensor]]
        out, r0 = {}, 0
        for p, u, r in zip(problems, ups, sizes, strict=True):
            out[p.name] = (u.to(torch.float32), C[r0:r0 + r].to(torch.float32))
            r0 += r
        info = {**info, "space": space}
        return (out, info) if return_info else out


def solve_work_bytes(inputs: FoldedInputs, compute_dtype: torch.dtype = torch.float64) -> int:
    """About what :func:`solve_closed_form` allocates to solve ``inputs``: in the row space ``X``, ``K`` and its
    factor, else ``G``'s copy and its factor. Solving the cheapest groups first leaves the widest solves for
    when the fewest accumulators are still held (docs/design.md §5.7)."""
    item = torch.finfo(compute_dtype).bits // 8
    if inputs.in_row_mode:
        return item * (inputs.count * inputs.in_features + 2 * inputs.count ** 2)
    return item * 2 * inputs.in_features ** 2


# --------------------------------------------------------------------------- objective

def _folded_terms(inputs: FoldedInputs, problem: LayerProblem, dev: torch.device,
                  f64: torch.dtype) -> tuple[Tensor, Tensor, float]:
    """(U, M, constant): ``Σ_i Ui Mi = U M`` and ``Σ_i tr(Ui Di Gi Diᵀ Uiᵀ)``, float64."""
    U = problem.stacked_up(dev, f64)
    M = torch.cat([_rhs(inputs, i, problem.name, f64).to(dev) for i in sorted(problem.ups)])
    const = 0.0
    r0 = 0
    for i in sorted(problem.ups):
        u = problem.ups[i].reshape(problem.ups[i].shape[0], -1).to(dev, f64)
        m = M[r0:r0 + u.shape[1]]
        d = _down(inputs, i, problem.name).to(dev, f64)
        const += float(((u.mT @ u) * (m @ d.mT)).sum())
        r0 += u.shape[1]
    return U, M, const


def layer_objective(inputs: FoldedInputs, problem: LayerProblem,
                    change: tuple[Tensor, Tensor] | None = None) -> float:
    """``Σ_i ‖Xi (W − Wi)ᵀ‖²`` for ``W = W0 + A B`` (``change = (A [out, k], B [k, in])``; None = W0),
    in float64: the summed squared output error over every recorded row that both solvers minimise
    (ridge term not included). From the rows where they are kept (exact), else from ``G`` and the ``M``:
    ``tr(ΔGΔᵀ) − 2 tr(Δ Mᵀ Uᵀ) + Σ_i tr(Ui Mi Diᵀ Uiᵀ)``."""
    dev = _work_device(inputs.device)
    f64 = torch.float64
    with torch.no_grad():
        if change is not None:
            A, B = (t.reshape(t.shape[0], -1).to(dev, f64) for t in change)
        if inputs.in_row_mode:
            total = 0.0
            for i in range(inputs.concepts):
                x = inputs.rows(i).to(dev, f64)
                err = torch.zeros(x.shape[0], next(iter(problem.ups.values())).shape[0], dtype=f64, device=dev)
                if change is not None:
                    err += (x @ B.mT) @ A.mT
                if i in problem.ups:
                    u = problem.ups[i].reshape(problem.ups[i].shape[0], -1).to(dev, f64)
                    err -= (x @ _down(inputs, i, problem.name).to(dev, f64).mT) @ u.mT
                total += float(err.square().sum())
            return total
        U, M, const = _folded_terms(inputs, problem, dev, f64)
        if change is None:
            return const
        G = inputs.gram(f64).to(dev)
        quad = float(((A.mT @ A) * (B @ G @ B.mT)).sum())
        cross = float(((U.mT @ A) * (M @ B.mT)).sum())
        return quad - 2.0 * cross + const


# --------------------------------------------------------------------------- reference L-BFGS

@overload
def solve_lbfgs(inputs: FoldedInputs, problem: LayerProblem, iterations: int, *, lr: float = 1.0,
                history_size: int = 25, return_info: Literal[False] = False) -> tuple[Tensor, Tensor]: ...


@overload
def solve_lbfgs(inputs: FoldedInputs, problem: LayerProblem, iterations: int, *, lr: float = 1.0,
                history_size: int = 25, return_info: Literal[True]) -> tuple[tuple[Tensor, Tensor], SolveInfo]: ...


@overload
def solve_lbfgs(inputs: FoldedInputs, problem: LayerProblem, iterations: int, *, lr: float = 1.0,
                history_size: int = 25, return_info: bool = False
                ) -> tuple[Tensor, Tensor] | tuple[tuple[Tensor, Tensor], SolveInfo]: ...


def solve_lbfgs(inputs: FoldedInputs, problem: LayerProblem, iterations: int, *, lr: float = 1.0,
                history_size: int = 25, return_info: bool = False
                ) -> tuple[Tensor, Tensor] | tuple[tuple[Tensor, Tensor], SolveInfo]:
    """The reference optimiser on the same objective: a check of the closed form, and the published
    behaviour for users who want it.

    As in the published gradient fusion: loss = mean squared bias-free output error over all concepts'
    rows and outputs (``layer_objective / (rows·out)``), one ``torch.optim.LBFGS.step`` with ``lr=1,
    history_size=25, line_search_fn='strong_wolfe', max_iter=iterations`` (default ``max_eval``),
    tolerances 1e-16, started at ``W0``, returning the best iterate seen by any loss evaluation.
    Reference counts: 500 iterations for text-encoder and cross-attention k/v layers, 50 for the rest.

    Done exactly but cheaply: the gradient ``2(ΔG − UM)/norm`` always lies in the column space of ``U``,
    so every iterate is ``Δ = Q Y`` with ``Q`` an orthonormal basis of that space. Running L-BFGS on
    ``Y`` gives the same iterates as on ``W`` (``Q`` preserves every inner product and norm the
    optimiser uses) at ``R·in²`` instead of ``out·in²`` (or ``rows·in·out``) per evaluation, on the folded
    objective in float64 (the reference's float32 row sums are no more accurate). Returns
    ``(Q [out, k], Y [k, in])`` float32 -- the change as a LoRA, like the closed form -- and with
    ``return_info`` a dict (``n_iter``, ``func_evals``, ``best_loss``: the MSE).
    """
    if int(iterations) < 0:
        raise ValueError("iterations must be >= 0")
    if not problem.ups:
        raise ValueError("the module needs at least one concept with a LoRA on it")
    dev = _work_device(inputs.device)
    f64 = torch.float64
    with torch.inference_mode(False), torch.no_grad():
        U, M, const = _folded_terms(inputs, problem, dev, f64)
        U, M = U.clone(), M.clone()
        G = inputs.gram(f64).to(dev).clone()
        P, s, Vh = torch.linalg.svd(U, full_matrices=False)
        keep = s > s.max().clamp_min(torch.finfo(f64).tiny) * max(U.shape) * torch.finfo(f64).eps
        Q = P[:, keep]
        N = (s[keep, None] * Vh[keep]) @ M  # Qᵀ U M
        out_f = U.shape[0]
        norm = float(max(inputs.count, 1) * out_f)
        Y = torch.zeros(Q.shape[1], inputs.in_features, dtype=f64, device=dev)
        best: dict[str, Any] = {"loss": const / norm, "y": Y.clone()}  # "loss": float, "y": Tensor

        def result(y: Tensor, info: SolveInfo) -> tuple[Tensor, Tensor] | tuple[tuple[Tensor, Tensor], SolveInfo]:
            pair = (Q.to(torch.float32), y.to(torch.float32))
            return (pair, info) if return_info else pair

        if inputs.count == 0 or int(iterations) == 0 or Q.shape[1] == 0:
            return result(best["y"], {"n_iter": 0, "func_evals": 0, "best_loss": best["loss"]})
        budget = int(iterations) * 5 // 4  # LBFGS's default max_eval for the reference's one step() call
        opt = torch.optim.LBFGS([Y], lr=lr, max_iter=1, history_size=history_size, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-16, tolerance_change=1e-16)

        def closure() -> Tensor:
            yg = Y @ G
            loss = (float((yg * Y).sum()) - 2.0 * float((Y * N).sum()) + const) / norm
            Y.grad = 2.0 * (yg - N) / norm
            if loss < best["loss"]:
                best["loss"] = loss
                best["y"] = Y.clone()
            return torch.tensor(loss, dtype=f64)

        # The first iteration's trial step is min(1, 1/‖gradient‖₁)·lr: the L1 norm is the one quantity
        # that is not the same in W and in Y, so that iteration runs with the W-space value; the rest
        # continue the same optimiser state with the reference's remaining iteration and evaluation budget.
        g0 = -2.0 * N / norm
        opt.param_groups[0]["lr"] = (lr * min(1.0, 1.0 / float((Q @ g0).abs().sum()))
                                     / min(1.0, 1.0 / float(g0.abs().sum())))
        opt.step(closure)  # type: ignore[no-untyped-call]  # torch leaves LBFGS.step unannotated
        state = opt.state[Y]
        used = int(state.get("func_evals", 1))
        if int(iterations) > 1 and used < budget:
            opt.param_groups[0].update(lr=lr, max_iter=int(iterations) - 1, max_eval=budget - (used - 1))
            opt.step(closure)  # type: ignore[no-untyped-call]  # torch leaves LBFGS.step unannotated
            used = int(state["func_evals"]) - 1  # step() re-evaluated the starting point once
        return result(best["y"], {"n_iter": int(state.get("n_iter", 0)), "func_evals": used,
                                  "best_loss": best["loss"]})
