"""Shared machinery of the self-supervised losses (ntxent, supcon, dcl, dhel, multiview, hcl):
input checks of two views, temperature checks, the row-normalisation rule and the N×N blocks
(``Views``) every one of them is composed of (docs/losses.md §4–§8, §12).

Every SSL loss L2-normalises its inputs inside (docs/losses.md, as lightly and the authors' code
do: ``u = x / max(‖x‖, 1e-12)``). The similarity matrix of V views of N rows is never formed: it is
cut into N×N blocks, one ``similarity_lse`` call each, whose row/column log-sum-exps are merged per
anchor with O(V·N) ops.

* The logit of a pair is ``ℓ_ab = ⟨u_a, u_b⟩/τ``. Each block passes the raw rows ``x_l`` (compute
  dtype) as the primitive's x with the per-row scale ``1/(τ·‖x_l,a‖)``, and the unit rows ``u_m``
  as its y: the logits are exact, the x-side gradient lands on the input directly, and only the
  y side needs the normalised copy.
* Within-view block (self-similarity, exclude the diagonal): called with ``y = u_l.detach()`` and
  rows + columns. The block is symmetric, so its column LSE equals its row LSE; handing the column
  LSE the same upstream gradient as the row LSE (``_RowWithMirroredGrad``) makes the x-side
  gradient equal the full gradient of the row LSE: one GEMM forward, two backward, one N×D output.
* Cross-view block (views l < m): rows give view-l anchors against view-m rows, columns give
  view-m anchors against view-l rows; positives excluded by ``exclude="diagonal"`` where a loss
  keeps them out of the normaliser (NT-Xent, DCL, HCL).
* Positive logits ``⟨u_l,i, u_m,i⟩/τ`` are O(N·D) row-wise dots of the raw rows, formed as
  ``⟨x_l,i/‖x_l,i‖, x_m,i⟩/‖x_m,i‖`` (``_CosineGradFirst``/``_CosineGradSecond``, whose backward
  includes the normalisation), so no product leaves the dtype's range; class-summed positives
  (SupCon) use per-class sums of unit rows.

Cost per pair of views: 10 N×N×D GEMMs (forward and backward) against 12 for one 2N×2N
self-similarity call. Memory: O(V·N·D) plus the backend's workspace of one N×N block; at the
peak, for two views, the two unit copies, one cross-view y-gradient and one x-gradient before
it joins the input's gradient (tests/test_ssl_common.py pins these bounds per loss).
Temperatures are positive Python floats (learnable temperatures are not supported here).
The losses run their O(N·D) bookkeeping (norms, row-wise dots, class sums) under
``no_autocast`` in the compute dtype (autocast would round vecdot to half precision); inputs are
cast to the autocast dtype during validation, as the primitives do.

Numerics: row norms never square a long row (``_row_norms`` scales each row by a power of two
first), so any finite row whose norm is finite in the compute dtype is normalised exactly like
``F.normalize`` (short rows, below eps, as ``x/eps``; zero rows stay zero). Temperatures must
keep the largest per-row logit scale 1/(τ·eps) finite in the compute dtype
(``check_temperature``). NaN/Inf features propagate to a NaN loss (torch's convention) unless
``check_finite=True``, which raises naming the tensor.

Distributed (``distributed="gather"``): ``ssl_gather.GatheredViews`` has the interface of
``Views`` for this rank's anchors against the global batch (``mmloss.functional.ssl_gather``).

torch.compile: no autograd.Function of the SSL modules reads a module-level Python float. Under
``dynamic=True`` dynamo makes such a float a symbolic graph input; realised inside one
Function's forward it crashes the next Function that reads it (torch 2.13,
``lift_tracked_freevar_to_input should not be called on root SubgraphTracer``; pinned in
tests/compile/test_compile_ssl.py). Constants the Functions need arrive as tensors, and the
norm eps is a literal behind ``norm_eps()``; keep it so in every module built on this one.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _validation as V
from ..ops import similarity_lse
from ._common import as_compute, reduce

Tensor = torch.Tensor


def norm_eps() -> float:
    """F.normalize's eps (zero rows stay zero). A literal behind a function, not a module-level
    float, so that torch.compile(dynamic=True) keeps it a constant (module docstring)."""
    return 1e-12


# ----------------------------------------------------------------------------- validation


def check_temperature(name: str, value, dtype: Optional[torch.dtype] = None, *, beta: Optional[float] = None) -> float:
    """A positive, finite Python float τ (TypeError for tensors: no learnable temperature here).

    With the compute ``dtype`` (at call time; constructors pass none) also: 1/τ is finite in
    ``dtype``, and so is the largest per-row logit scale ``(1+β)/(τ·eps)`` the blocks hand to
    the primitive (a short row x has scale (1+β)/(τ·max(‖x‖, eps)); an infinite one would turn a
    zero row's 0 logits into NaN). ``beta``: HCL's β (None elsewhere: factor 1).
    """
    value = check_positive_float(name, value, dtype)
    if dtype is not None and V.value_checks_enabled():
        largest = torch.finfo(dtype).max
        eps = norm_eps()
        factor = 1.0 if beta is None else 1.0 + beta
        if factor / value / eps > largest:
            given = f"{name} = {value:g}" + ("" if beta is None else f" with beta = {beta:g}")
            numerator = "1" if beta is None else "(1+beta)"
            raise ValueError(
                f"{given} overflows {dtype} in the logit scale {numerator}/({name}·max(‖x‖, {eps:g})) "
                f"of a short row x: need {numerator}/{name} ≤ {largest * eps:.3g} (or float64 features)"
            )
    return value


def check_positive_float(name: str, value, dtype: Optional[torch.dtype] = None) -> float:
    """A positive, finite Python float that divides (σ, τ_base): with the compute ``dtype``,
    it and its reciprocal must also be finite and nonzero in that dtype."""
    V.check_real(name, value, "a positive Python float")
    return float(V.check_scalar(name, value, positive=True, dtype=dtype, reciprocal=dtype is not None))


def prepare_two_views(out0, out1, min_rows: int, loss: str, check_finite: bool) -> tuple[Tensor, Tensor]:
    """Validated (N, D) views of one shape, promoted to one dtype; N ≥ ``min_rows``.

    A non-floating ``out1`` is most likely pytorch-metric-learning's ``(embeddings, labels)``
    call: the TypeError says which call style this loss has and where labels belong.
    """
    if isinstance(out1, Tensor) and not (out1.is_floating_point() or out1.is_complex()):
        shape = tuple(out1.shape)
        raise TypeError(
            f"{loss} takes two views out0, out1 of shape (N, D) (lightly's call style, "
            f"{loss}(out0, out1)); out1 must be float16, bfloat16, float32 or float64, got "
            f"{out1.dtype} of shape {shape}. (embeddings, labels) is SupCon's call style "
            f"(pytorch-metric-learning): use mmloss.supcon_loss(embeddings, labels)"
        )
    x0, x1 = V.prepare_features("out0", out0, "out1", out1)
    V.check_same_shape("out0", x0, "out1", x1)
    if x0.shape[0] < min_rows:
        raise ValueError(
            f"{loss} needs at least {min_rows} rows per view (negatives come from the other "
            f"rows), got out0 of shape {tuple(x0.shape)}"
        )
    if V.check_bool("check_finite", check_finite):
        V.check_all_finite(("out0", x0), ("out1", x1))
    return x0, x1


# ----------------------------------------------------------------------------- building blocks


class _RowWithMirroredGrad(torch.autograd.Function):
    """Returns ``row``; its upstream gradient is handed to ``col`` as well.

    For a symmetric block (x and y the same unit rows up to the per-row scale) the column LSE
    equals the row LSE, and the gradient of Σ g_i·row_i w.r.t. the rows is the x-side gradient of
    Σ g_i·(row_i + col_i) with y held constant.
    """

    @staticmethod
    def forward(ctx, row, col):
        return row.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, grad


def _row_norms(x: Tensor) -> tuple[Tensor, Tensor]:
    """Detached (inv, unclamped) of (N, D) rows: inv (N,) = 1/max(‖x_i‖, eps) and unclamped (N,)
    bool = ‖x_i‖ > eps, without overflow or underflow of ‖x_i‖².

    ‖x‖² overflows fp32 from ‖x‖ ≈ 1.8e19 on, so each row is first multiplied by a power of two
    c_i ≤ 1 (exact) that brings its largest |entry| below 2: inv_i = c_i / ‖c_i·x_i‖. Rows whose
    largest |entry| is below 2 keep c_i = 1 and are normalised exactly as ``F.normalize`` (below
    eps: x/eps; zero rows stay zero). A NaN or ±inf entry makes the row's inv NaN (NaN policy).
    One transient N×D product; O(N) kept.
    """
    eps = norm_eps()
    with torch.no_grad():
        peak = torch.linalg.vector_norm(x, ord=float("inf"), dim=1)
        down = torch.exp2(-torch.floor(torch.log2(peak)).clamp_min(0.0))
        scaled = torch.linalg.vector_norm(x * down[:, None], dim=1)
        return down / scaled.clamp_min(eps), scaled > eps


class _InverseNorm(torch.autograd.Function):
    """(N,) ``inv`` = 1/max(‖x_i‖, eps) of ``_row_norms`` as a function of x.

    Backward: −g·inv³·x_i on unclamped rows (0 on clamped ones), formed as ((−g·inv)·inv)·(x·inv)
    so that no factor leaves the dtype's range for long rows; one N×D temporary.
    """

    @staticmethod
    def forward(ctx, x, inv, unclamped):
        ctx.save_for_backward(x, inv, unclamped)
        return inv.clone()

    @staticmethod
    def backward(ctx, grad):
        x, inv, unclamped = ctx.saved_tensors
        coef = torch.where(unclamped, (-grad * inv) * inv, 0.0)
        return (x * inv[:, None]).mul_(coef[:, None]), None, None


class _Normalize(torch.autograd.Function):
    """(N, D) x_i·inv_i = x_i / max(‖x_i‖, eps) (``F.normalize``; inv, unclamped from
    ``_row_norms``); backward forms one N×D temporary, ``(g − u·⟨g, u⟩)·inv`` (just ``g·inv``
    on clamped rows)."""

    @staticmethod
    def forward(ctx, x, inv, unclamped):
        unit = x * inv[:, None]
        ctx.save_for_backward(unit, inv, unclamped)
        return unit

    @staticmethod
    def backward(ctx, grad):
        unit, inv, unclamped = ctx.saved_tensors
        radial = torch.where(unclamped, torch.linalg.vecdot(grad, unit), 0.0)
        return torch.addcmul(grad, unit, -radial[:, None]).mul_(inv[:, None]), None, None


def _cosine_value(a: Tensor, b: Tensor, inv_a: Tensor, inv_b: Tensor) -> Tensor:
    """(N,) ⟨u_a,i, u_b,i⟩ of the unit rows u = x·inv, as ⟨a·inv_a, b⟩·inv_b: every factor stays
    in range for long rows (⟨a, b⟩ itself overflows fp32 once ‖a‖·‖b‖ > 3.4e38)."""
    return torch.linalg.vecdot(a * inv_a[:, None], b) * inv_b


def _cosine_grad(a: Tensor, b: Tensor, inv_a: Tensor, inv_b: Tensor, unclamped_a: Tensor, cos: Tensor,
                 grad: Tensor) -> Tensor:
    """(N, D) g_i·∂⟨u_a,i, u_b,i⟩/∂a_i = g_i·inv_a,i·(u_b,i − cos_i·u_a,i) (no radial term on
    clamped rows of a); one N×D temporary, every factor in range."""
    out = b * inv_b[:, None]
    out.addcmul_(a, torch.where(unclamped_a, -cos * inv_a, 0.0)[:, None])
    return out.mul_((grad * inv_a)[:, None])


class _CosineGradFirst(torch.autograd.Function):
    """(N,) ⟨u_a,i, u_b,i⟩ (unit rows u = x·inv); the gradient reaches ``a`` only (through its
    normalisation too). Paired with ``_CosineGradSecond`` so a backward forms one N×D gradient
    at a time."""

    @staticmethod
    def forward(ctx, a, b, inv_a, inv_b, unclamped_a):
        cos = _cosine_value(a, b, inv_a, inv_b)
        ctx.save_for_backward(a, b, inv_a, inv_b, unclamped_a, cos)
        return cos

    @staticmethod
    def backward(ctx, grad):
        a, b, inv_a, inv_b, unclamped_a, cos = ctx.saved_tensors
        return _cosine_grad(a, b, inv_a, inv_b, unclamped_a, cos, grad), None, None, None, None


class _CosineGradSecond(torch.autograd.Function):
    """Zero in value; carries the ``b`` half of the gradient of ⟨u_a,i, u_b,i⟩ (``cos`` is that
    value, detached)."""

    @staticmethod
    def forward(ctx, a, b, inv_a, inv_b, unclamped_b, cos):
        ctx.save_for_backward(a, b, inv_a, inv_b, unclamped_b, cos)
        return torch.zeros_like(cos)

    @staticmethod
    def backward(ctx, grad):
        a, b, inv_a, inv_b, unclamped_b, cos = ctx.saved_tensors
        return None, _cosine_grad(b, a, inv_b, inv_a, unclamped_b, cos, grad), None, None, None, None


class Views:
    """V views of N rows each, in the compute dtype, with their per-row logit scales.

    ``raw[l]`` (N, D): the input rows (the input itself for fp32/fp64); ``scale[l]`` (N,):
    1/(τ·max(‖raw‖, eps)), so that ``scale_a·⟨raw_a, u_b⟩ = ⟨u_a, u_b⟩/τ``. Unit rows are made on
    first use: ``unit(l)`` carries a gradient (it is a y side), ``unit_value(l)`` does not (a
    within-view block's constant y); both share one tensor when both are asked for, provided
    ``unit(l)`` is asked first.

    Memory order: autograd runs the newest node first, so the losses form their O(N·D) positive
    terms first and the blocks last; ``normalisers`` makes the cross-view blocks before the
    within-view blocks. In backward the within-view blocks then run first (their x gradients
    become the inputs' gradients and their y copies are released), and each view's
    normalisation backward runs right after the cross-view blocks that feed it.
    """

    def __init__(self, tensors: Sequence[Tensor], temperature: float):
        self.dtype = V.compute_dtype(tensors[0])
        self.raw = [as_compute(t, self.dtype) for t in tensors]
        norms = [_row_norms(r) for r in self.raw]
        self._inv = [inv for inv, _ in norms]                 # detached (N,) 1/max(‖x‖, eps)
        self._unclamped = [ok for _, ok in norms]             # (N,) bool ‖x‖ > eps
        self.inv_norm = [_InverseNorm.apply(r, inv, ok) for r, (inv, ok) in zip(self.raw, norms)]
        self.temperature = temperature
        self.scale = [inv / temperature for inv in self.inv_norm]
        self._unit: dict[int, Tensor] = {}
        self.count = len(tensors)
        self.rows = tensors[0].shape[0]

    def needs_grad(self, l: int) -> bool:
        return torch.is_grad_enabled() and self.raw[l].requires_grad

    def _normalize(self, l: int) -> Tensor:
        return _Normalize.apply(self.raw[l], self._inv[l], self._unclamped[l])

    def unit(self, l: int) -> Tensor:
        cached = self._unit.get(l)
        if cached is None or (self.needs_grad(l) and not cached.requires_grad):
            cached = self._unit[l] = self._normalize(l)
        return cached

    def unit_value(self, l: int) -> Tensor:
        cached = self._unit.get(l)
        if cached is None:
            with torch.no_grad():
                cached = self._unit[l] = self._normalize(l)
        return cached.detach()

    def squared_unit_norm(self, l: int) -> Tensor:
        """(N,) ‖u_l,i‖² of the unit rows in use, detached: 1 up to rounding for every row longer
        than eps (0 for a zero row), a constant whose gradient through the normalisation is zero."""
        unit = self.unit_value(l)
        return torch.linalg.vecdot(unit, unit)

    def cosine(self, l: int, m: int) -> Tensor:
        """(N,) ⟨u_l,i, u_m,i⟩ from the raw rows (gradients land on the inputs directly)."""
        a, b = self.raw[l], self.raw[m]
        first = _CosineGradFirst.apply(a, b, self._inv[l], self._inv[m], self._unclamped[l])
        second = _CosineGradSecond.apply(a, b, self._inv[l], self._inv[m], self._unclamped[m], first.detach())
        return first + second

    def cosine_value(self, l: int, m: int) -> Tensor:
        """(N,) ⟨u_l,i, u_m,i⟩, detached."""
        with torch.no_grad():
            return _cosine_value(self.raw[l], self.raw[m], self._inv[l], self._inv[m])

    def positive(self, l: int, m: int) -> Tensor:
        """(N,) ⟨u_l,i, u_m,i⟩/τ."""
        return self.cosine(l, m) / self.temperature

    def within(self, l: int, factor: float, backend: str) -> Tensor:
        """(N,) LSE_{j≠i} factor·⟨u_l,i, u_l,j⟩/τ (−∞ for N = 1)."""
        scale = self.scale[l] * factor if factor != 1.0 else self.scale[l]
        mirrored = self.needs_grad(l)
        row, col = similarity_lse(self.raw[l], self.unit_value(l), scale, exclude="diagonal",
                                  rows=True, cols=mirrored, backend=backend)
        return _RowWithMirroredGrad.apply(row, col) if mirrored else row

    def across(self, l: int, m: int, exclude: str, factor: float, backend: str) -> tuple[Tensor, Tensor]:
        """(rows, cols): LSE over view-m rows of each view-l anchor, and over view-l rows of
        each view-m anchor, of factor·⟨u_l,i, u_m,j⟩/τ; ``exclude="diagonal"`` drops j = i."""
        scale = self.scale[l] * factor if factor != 1.0 else self.scale[l]
        return similarity_lse(self.raw[l], self.unit(m), scale, exclude=exclude, rows=True,
                              cols=True, backend=backend)

    def normalisers(self, *, within: bool, across: Optional[str], factors: Sequence[float] = (1.0,),
                    backend: str) -> list[list[Tensor]]:
        """For each factor f, per view l, the (N,) LSE over every allowed pair of view-l anchors
        with all V views of f·⟨u_a, u_b⟩/τ: within-view pairs (j ≠ i) when ``within``; cross-view
        pairs when ``across`` is "none" (all j) or "diagonal" (j ≠ i), none when it is None."""
        parts = [[[] for _ in range(self.count)] for _ in factors]
        if across is not None:
            for m in range(1, self.count):          # grouped by the view that receives dy
                for l in range(m):
                    for k, factor in enumerate(factors):
                        row, col = self.across(l, m, across, factor, backend)
                        parts[k][l].append(row)
                        parts[k][m].append(col)
        if within and self.rows > 1:  # with one row every within-view pair is the anchor itself
            for l in range(self.count):
                for k, factor in enumerate(factors):
                    parts[k][l].append(self.within(l, factor, backend))
        return [[merge_lses(p, self.rows, self.dtype, self.raw[0].device) for p in per_view] for per_view in parts]

    def local_part(self, t):
        """Rows of a per-sample quantity of the whole batch that belong to this call's anchors:
        all of them (``GatheredViews`` slices its rank's rows)."""
        return t

    def reduce(self, terms: Tensor, reduction: str) -> Tensor:
        """"mean" | "sum" | "none" of the per-anchor terms (``_common.reduce``)."""
        return reduce(terms, reduction)


def merge_lses(lses: list[Tensor], rows: int, dtype: torch.dtype, device) -> Tensor:
    """(rows,) LSE over the merged (rows,) LSEs of each anchor; −inf when there are none."""
    if not lses:
        return torch.full((rows,), float("-inf"), dtype=dtype, device=device)
    if len(lses) == 1:
        return lses[0]
    return torch.logsumexp(torch.stack(lses), dim=0)
