"""Self-supervised family: docs/losses.md §4 NT-Xent, §5 SupCon, §6 DCL/DCLW, §7 DHEL, §8 multi-view
(MV-InfoNCE, MV-DHEL) and §12 HCL, composed from ``similarity_lse`` and O(N·D) torch ops.

Every loss here L2-normalises its inputs inside (docs/losses.md, as lightly and the authors' code do:
``u = x / max(‖x‖, 1e-12)``). The similarity matrix of V views of N rows is never formed: it is
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
it joins the input's gradient (tests/test_ssl.py pins these bounds per loss).
Temperatures are positive Python floats (learnable temperatures are not supported here).

Numerics: row norms never square a long row (``_row_norms`` scales each row by a power of two
first), so any finite row whose norm is finite in the compute dtype is normalised exactly like
``F.normalize`` (short rows, below eps, as ``x/eps``; zero rows stay zero). Temperatures must
keep the largest per-row logit scale 1/(τ·eps) finite in the compute dtype (``_temperature``).
NaN/Inf features propagate to a NaN loss (torch's convention) unless ``check_finite=True``,
which raises naming the tensor.

torch.compile: no autograd.Function here reads a module-level Python float. Under
``dynamic=True`` dynamo makes such a float a symbolic graph input; realised inside one
Function's forward it crashes the next Function that reads it (torch 2.13,
``lift_tracked_freevar_to_input should not be called on root SubgraphTracer``; pinned in
tests/compile/test_compile_ssl.py). Constants the Functions need arrive as tensors.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Callable, Optional, Sequence, Union

import torch

from .. import _validation as V
from ..ops import similarity_lse
from ._common import LabelClasses, as_compute, class_slots, compute_dtype, reduce, softplus

Tensor = torch.Tensor


def _norm_eps() -> float:
    """F.normalize's eps (zero rows stay zero). A literal behind a function, not a module-level
    float, so that torch.compile(dynamic=True) keeps it a constant (module docstring)."""
    return 1e-12


# ----------------------------------------------------------------------------- validation


def _exact_math(device: torch.device):
    """Autocast off for the O(N·D) bookkeeping (norms, row-wise dots and class sums run in the
    compute dtype; autocast would round vecdot to half precision). Inputs are cast to the
    autocast dtype during validation, as the primitives do."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _temperature(name: str, value, dtype: Optional[torch.dtype] = None, *, beta: Optional[float] = None) -> float:
    """A positive, finite Python float τ (TypeError for tensors: no learnable temperature here).

    With the compute ``dtype`` (at call time; constructors pass none) also: 1/τ is finite in
    ``dtype``, and so is the largest per-row logit scale ``(1+β)/(τ·eps)`` the blocks hand to
    the primitive (a short row x has scale (1+β)/(τ·max(‖x‖, eps)); an infinite one would turn a
    zero row's 0 logits into NaN). ``beta``: HCL's β (None elsewhere: factor 1).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive Python float, got {type(value).__name__}")
    value = float(V.check_scalar(name, value, positive=True, dtype=dtype, reciprocal=dtype is not None))
    if dtype is not None and V.value_checks_enabled():
        largest = torch.finfo(dtype).max
        eps = _norm_eps()
        factor = 1.0 if beta is None else 1.0 + beta
        if factor / value / eps > largest:
            given = f"{name} = {value:g}" + ("" if beta is None else f" with beta = {beta:g}")
            numerator = "1" if beta is None else "(1+beta)"
            raise ValueError(
                f"{given} overflows {dtype} in the logit scale {numerator}/({name}·max(‖x‖, {eps:g})) "
                f"of a short row x: need {numerator}/{name} ≤ {largest * eps:.3g} (or float64 features)"
            )
    return value


def _positive_float(name: str, value, dtype: Optional[torch.dtype] = None) -> float:
    """A positive, finite Python float that divides (σ, τ_base): with the compute ``dtype``,
    it and its reciprocal must also be finite and nonzero in that dtype."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive Python float, got {type(value).__name__}")
    return float(V.check_scalar(name, value, positive=True, dtype=dtype, reciprocal=dtype is not None))


def _concentration(beta) -> float:
    """HCL's β: a finite Python float ≥ 0."""
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a Python float, got {type(beta).__name__}")
    # Value checks on Python numbers only outside torch.compile (a module attribute may be a
    # symbolic float there, as in V.check_scalar).
    if V.value_checks_enabled() and not (math.isfinite(beta) and beta >= 0.0):
        raise ValueError(f"beta must be finite and ≥ 0, got {beta}")
    return float(beta)


def _two_views(out0, out1, min_rows: int, loss: str, check_finite: bool) -> tuple[Tensor, Tensor]:
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


def _view_list(views, min_instances: int, loss: str, check_finite: bool) -> list[Tensor]:
    """V ≥ 2 views of M instances from a (V, M, D) tensor or a list/tuple of (M, D) tensors,
    promoted to one dtype (autocast honoured, as the primitives do)."""
    if isinstance(views, Tensor):
        V.check_features("views", views, ndim=3)
        parts = list(views.unbind(0))
    elif isinstance(views, (list, tuple)):
        parts = [V.check_features(f"views[{k}]", t) for k, t in enumerate(views)]
    else:
        raise TypeError(
            f"views must be a (V, M, D) tensor or a list of (M, D) tensors, got {type(views).__name__}"
        )
    if len(parts) < 2:
        raise ValueError(f"{loss} needs at least 2 views (positives are other views), got {len(parts)}")
    for k, t in enumerate(parts[1:], start=1):
        V.check_same_device(("views[0]", parts[0]), (f"views[{k}]", t))
        V.check_same_shape("views[0]", parts[0], f"views[{k}]", t)
    if parts[0].shape[0] < min_instances:
        raise ValueError(
            f"{loss} needs at least {min_instances} instances per view, got views of shape "
            f"{tuple(parts[0].shape)}"
        )
    dtype = parts[0].dtype
    for t in parts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    cast = V.autocast_dtype(parts[0].device)
    if cast is not None and dtype != torch.float64:
        dtype = cast
    parts = [t.to(dtype) for t in parts]
    if V.check_bool("check_finite", check_finite):
        if isinstance(views, Tensor):
            V.check_all_finite(("views", views))
        V.check_all_finite(*((f"views[{k}]", t) for k, t in enumerate(parts)))
    return parts


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
    eps = _norm_eps()
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


class _SquaredNorms(torch.autograd.Function):
    """(K,) ‖s_k‖² of (K, D) rows; backward forms one K×D temporary (2·g·s)."""

    @staticmethod
    def forward(ctx, rows):
        ctx.save_for_backward(rows)
        return torch.linalg.vecdot(rows, rows)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return rows * (2.0 * grad)[:, None]


class _Views:
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
        self.dtype = compute_dtype(tensors[0])
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
        return [[self._merge(p) for p in per_view] for per_view in parts]

    def _merge(self, lses: list[Tensor]) -> Tensor:
        if not lses:
            return torch.full((self.rows,), float("-inf"), dtype=self.dtype, device=self.raw[0].device)
        if len(lses) == 1:
            return lses[0]
        return torch.logsumexp(torch.stack(lses), dim=0)


def _nt_xent_terms(views: _Views, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(negatives view 0, negatives view 1, positive logits), each (N,)."""
    positive = views.positive(0, 1)
    (neg0, neg1), = views.normalisers(within=True, across="diagonal", backend=backend)
    return neg0, neg1, positive


# ----------------------------------------------------------------------------- §4 NT-Xent


def ntxent_loss(out0: Tensor, out1: Tensor, temperature: float = 0.5, *, reduction: str = "mean",
                memory_bank: Optional[Tensor] = None, backend: str = "auto",
                check_finite: bool = False) -> Tensor:
    """NT-Xent / SimCLR (docs/losses.md §4), lightly's ``NTXentLoss`` without a memory bank.

    ``L = (1/2N) Σ_a [LSE_{b≠a} ℓ_ab − ℓ_{a,p(a)}]`` over Z = [u0; u1] (2N anchors), ℓ = ⟨u_a, u_b⟩/τ,
    p(a) the other view of a; each term is computed as ``softplus(LSE_negatives − ℓ_{a,p(a)})``
    over the 2N−2 negatives (docs/design.md numerics).

    Args:
        out0, out1: (N, D) fp16/bf16/fp32/fp64 views, L2-normalised inside; N ≥ 1. With N = 1
            there are no negatives and every term is softplus(−∞) = 0 (the closed form log(2N−1)
            of identical rows at N = 1); the result stays in the graph with a zero gradient.
        temperature: τ > 0 (Python float), default 0.5 (lightly).
        reduction: "mean" | "sum" (2N × mean) | "none" ((2N,) terms, view-0 anchors first).
        memory_bank: None, or (K, D) negatives (no gradient; rows used as given — lightly stores
            unit rows): lightly's memory-bank (MoCo) form. Only view-0 rows are anchors;
            ``ℓ_i = LSE(p_i, ⟨u0_i, b_k⟩/τ for all k) − p_i`` with p_i = ⟨u0_i, u1_i⟩/τ, i.e.
            ``softplus(LSE_k ⟨u0_i, b_k⟩/τ − p_i)``; "sum"/"none" then refer to N anchors.
            One N×K ``similarity_lse`` call (rows only): no N×K tensor is kept.
        check_finite: True raises a ValueError naming the input tensor that holds NaN/Inf
            (default False: they propagate to a NaN loss, as in torch; a host sync on GPUs).

    Returns fp32 (fp64 for fp64 inputs). Primitives: two within-view blocks and one cross-view
    block (``exclude="diagonal"``), each N×N. Memory O(N·D) plus one block's workspace.
    """
    x0, x1 = _two_views(out0, out1, 1, "ntxent_loss", check_finite)
    tau = _temperature("temperature", temperature, compute_dtype(x0))
    V.check_reduction(reduction)
    if memory_bank is not None:
        bank = V.check_features("memory_bank", memory_bank, min_rows=1)
        V.check_same_device(("out0", x0), ("memory_bank", bank))
        V.check_same_dim("out0", x0, "memory_bank", bank)
        if V.check_bool("check_finite", check_finite):
            V.check_all_finite(("memory_bank", bank))
        with _exact_math(x0.device):
            views = _Views([x0, x1], tau)
            positive = views.positive(0, 1)
            negatives, _ = similarity_lse(views.raw[0], as_compute(bank.detach(), views.dtype), views.scale[0],
                                          cols=False, backend=backend)
            return reduce(softplus(negatives - positive), reduction)
    with _exact_math(x0.device):
        views = _Views([x0, x1], tau)
        if views.rows == 1:
            positive = views.positive(0, 1)
            neg = torch.full_like(positive, float("-inf"))
            terms = softplus(torch.cat([neg, neg]) - torch.cat([positive, positive]))
            return reduce(terms, reduction)
        neg0, neg1, positive = _nt_xent_terms(views, backend)
        terms = torch.cat([softplus(neg0 - positive), softplus(neg1 - positive)])
        return reduce(terms, reduction)


# ----------------------------------------------------------------------------- §5 SupCon


def _supcon_views(embeddings, labels, check_finite: bool) -> tuple[list[Tensor], Tensor]:
    """The views (each (B, D)) and the (B,) labels shared by every view."""
    if not isinstance(embeddings, Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    if embeddings.dim() == 3:
        V.check_features("embeddings", embeddings, ndim=3)
        if embeddings.shape[1] < 1:
            raise ValueError(
                f"embeddings (B, V, D) must hold at least one view per sample (V ≥ 1), got shape "
                f"{tuple(embeddings.shape)}"
            )
        b = embeddings.shape[0]
        if labels is None:
            labels = torch.arange(b, device=embeddings.device)
        else:
            V.check_labels("labels", labels, b, embeddings.device)
        parts = list(embeddings.unbind(1))
    elif embeddings.dim() == 2:
        if labels is None:
            raise ValueError(
                f"supcon_loss with 2-D embeddings {tuple(embeddings.shape)} needs labels: without "
                "them no row has a positive (pass a (B, V, D) tensor for views of one sample)"
            )
        V.check_features("embeddings", embeddings)
        V.check_labels("labels", labels, embeddings.shape[0], embeddings.device)
        parts = [embeddings]
    else:
        raise ValueError(
            f"embeddings must be (n, D) with labels or (B, V, D), got shape {tuple(embeddings.shape)}"
        )
    if V.check_bool("check_finite", check_finite):
        V.check_all_finite(("embeddings", embeddings))
    cast = V.autocast_dtype(embeddings.device)
    if cast is not None and embeddings.dtype != torch.float64:
        parts = [t.to(cast) for t in parts]
    return parts, labels


def supcon_loss(embeddings: Tensor, labels: Optional[Tensor] = None, temperature: float = 0.1,
                base_temperature: Optional[float] = None, *, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, indices_tuple=None, backend: str = "auto",
                check_finite: bool = False) -> Tensor:
    """Supervised contrastive loss, "L_out" (docs/losses.md §5; Khosla et al. 2020).

    ``L = (τ/τ_base)·mean_{a: |P(a)|>0} [LSE_{b≠a} ℓ_ab − (1/|P(a)|) Σ_{p∈P(a)} ℓ_ap]``, positives
    P(a) = {b ≠ a: y_b = y_a}, which stay in the normaliser.

    Args:
        embeddings: (n, D) rows with ``labels`` (n,) — pytorch-metric-learning's call style — or
            (B, V, D), V views per sample (HobbitLong's style) with ``labels`` (B,) defaulting to
            the sample index; the anchors are ordered view-major (all samples of view 0, then view
            1, …) as HobbitLong's ``cat(unbind(features, 1))``. L2-normalised inside.
            2-D embeddings without labels are a ValueError.
        temperature: τ > 0, default 0.1. base_temperature: τ_base > 0, default τ; τ/τ_base must
            be finite in the compute dtype.
        ref_emb, ref_labels: pytorch-metric-learning's reference set, (m, D) and (m,), given
            together with 2-D embeddings and labels. The anchors are the rows of ``embeddings``;
            positives and negatives come from ``ref_emb`` only: P(a) = {r: ref_labels_r =
            labels_a} (no self-exclusion: a row that is also in ref_emb is its own positive, as
            in PML), the normaliser runs over every reference row. Gradients reach both sets.
            As in PML, passing the labels tensor itself as ``ref_labels`` (the same object)
            excludes the pairs (i, i) from positives and normaliser (then n = m).
            One n×m ``similarity_lse`` call (rows only) plus per-class sums of the unit
            reference rows: memory O((n+m)·D).
        indices_tuple: must be None. Miner output (pairs or triplets) would index the n×m pair
            matrix mmloss never forms: NotImplementedError, naming what is supported.
        check_finite: True raises a ValueError naming the input tensor that holds NaN/Inf
            (default False: they propagate to a NaN loss, as in torch; a host sync on GPUs).

    Anchors without a positive are skipped; when none has one the loss is 0 and still
    backpropagates (zero gradient). (B, 2, D) without labels equals ``ntxent_loss`` at the same τ.
    Primitives: V within-view and V(V−1)/2 cross-view blocks (B×B, nothing excluded across views);
    positives: Σ_{a∈c} Σ_{p∈P(a)} ⟨u_a, u_p⟩ = ‖S_c‖² − Σ_{a∈c} ‖u_a‖² with S_c the class sum of
    unit rows. Memory O(n·D) plus one block's workspace. Returns fp32 (fp64 for fp64 inputs).
    """
    if indices_tuple is not None:
        raise NotImplementedError(
            "supcon_loss: indices_tuple (a miner's pairs or triplets) is not supported — mmloss never "
            "forms the pair matrix a miner indexes. Supported: all pairs defined by labels "
            "(indices_tuple=None), optionally against a reference set (ref_emb=, ref_labels=)"
        )
    if ref_emb is not None or ref_labels is not None:
        return _supcon_against_refs(embeddings, labels, ref_emb, ref_labels, temperature, base_temperature,
                                    backend, check_finite)
    parts, labels = _supcon_views(embeddings, labels, check_finite)
    dt = compute_dtype(parts[0])
    tau = _temperature("temperature", temperature, dt)
    base = tau if base_temperature is None else _positive_float("base_temperature", base_temperature, dt)
    ratio = float(V.check_scalar("temperature / base_temperature", tau / base, positive=True, dtype=dt))
    with _exact_math(parts[0].device):
        views = _Views(parts, tau)
        dt, device = views.dtype, views.raw[0].device
        b = views.rows

        # Class sums over every view: sample k of each view carries labels[k].
        slots = class_slots(torch.sort(labels).values, labels)
        unit_sum = views.unit(0)
        squares = views.squared_unit_norm(0)
        for l in range(1, views.count):
            unit_sum = unit_sum + views.unit(l)
            squares = squares + views.squared_unit_norm(l)
        class_sum = torch.zeros(b, unit_sum.shape[1], dtype=dt, device=device).index_add(0, slots, unit_sum)
        class_squares = torch.zeros(b, dtype=dt, device=device).index_add(0, slots, squares)
        class_rows = torch.zeros(b, dtype=dt, device=device).index_add(
            0, slots, torch.full((b,), float(views.count), dtype=dt, device=device))
        # Σ over ordered pairs (a, p), a ≠ p, of one class of ⟨u_a, u_p⟩ / |P(a)|, per class slot.
        pairs_per_anchor = class_rows - 1.0
        has_positives = pairs_per_anchor > 0
        positive_sum = (_SquaredNorms.apply(class_sum) - class_squares) / pairs_per_anchor.clamp_min(1.0)
        positive_total = torch.where(has_positives, positive_sum, 0.0).sum() / tau

        anchor_ok = has_positives[slots]                         # (B,) the same for every view
        normalisers, = views.normalisers(within=True, across="none", backend=backend)
        lse_total = sum(torch.where(anchor_ok, r, 0.0).sum() for r in normalisers)
        anchors = anchor_ok.sum() * views.count
        return ratio * ((lse_total - positive_total) / anchors.clamp_min(1).to(dt))


def _supcon_against_refs(embeddings, labels, ref_emb, ref_labels, temperature, base_temperature, backend,
                         check_finite) -> Tensor:
    """SupCon with PML's reference set (``supcon_loss`` docstring): anchors are ``embeddings``,
    positives and negatives ``ref_emb``.

    ``L = (τ/τ_base)·mean_{a: |P(a)|>0} [LSE_r ℓ_ar − ⟨u_a, mean_{r∈P(a)} u_r⟩/τ]``.
    """
    if ref_emb is None or ref_labels is None:
        raise ValueError("supcon_loss: ref_emb and ref_labels must be given together")
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 2:
        shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
        raise ValueError(f"supcon_loss with ref_emb needs 2-D embeddings (n, D) and labels, got {shape}")
    if labels is None:
        raise ValueError("supcon_loss with ref_emb needs labels for the anchors (embeddings)")
    # PML's quirk, kept for drop-in fidelity: ref_labels that *is* the labels tensor makes the
    # pairs (i, i) neither positive nor negative (get_matches_and_diffs fills the diagonal).
    same_rows = ref_labels is labels
    x, r = V.prepare_features("embeddings", embeddings, "ref_emb", ref_emb)
    V.check_same_dim("embeddings", x, "ref_emb", r)
    if same_rows and x.shape[0] != r.shape[0]:
        raise ValueError(
            f"supcon_loss: ref_labels is the labels tensor itself, which pairs embeddings row i with "
            f"ref_emb row i, but embeddings has {x.shape[0]} rows and ref_emb {r.shape[0]}"
        )
    labels = V.check_labels("labels", labels, x.shape[0], x.device)
    ref_labels = V.check_labels("ref_labels", ref_labels, r.shape[0], r.device)
    if V.check_bool("check_finite", check_finite):
        V.check_all_finite(("embeddings", x), ("ref_emb", r))
    dt = compute_dtype(x)
    tau = _temperature("temperature", temperature, dt)
    base = tau if base_temperature is None else _positive_float("base_temperature", base_temperature, dt)
    ratio = float(V.check_scalar("temperature / base_temperature", tau / base, positive=True, dtype=dt))
    with _exact_math(x.device):
        anchors, refs = _Views([x], tau), _Views([r], tau)
        # The O(N·D) positive term first, the block last (memory order, see _Views).
        unit_refs = refs.unit(0)
        classes = LabelClasses(unit_refs, ref_labels, anchors.dtype)
        slots = classes.slots_for(labels)
        count = torch.where(classes.sorted_labels[slots] == labels, classes.counts[slots], 0.0)
        positive_sum = torch.linalg.vecdot(anchors.unit(0), classes.sums[slots])
        if same_rows:       # drop the pair (i, i) from P(i) and from the normaliser
            count = count - 1.0
            positive_sum = positive_sum - torch.linalg.vecdot(anchors.unit(0), unit_refs)
        has_positive = count > 0
        positive = positive_sum / (count.clamp_min(1.0) * tau)
        normaliser, _ = similarity_lse(anchors.raw[0], unit_refs, anchors.scale[0],
                                       exclude="diagonal" if same_rows else "none", cols=False,
                                       backend=backend)
        terms = torch.where(has_positive, normaliser - positive, 0.0)
        return ratio * (terms.sum() / has_positive.sum().clamp_min(1).to(anchors.dtype))


# ----------------------------------------------------------------------------- §6 DCL / DCLW


def _weights(value, n: int, name: str, dt: torch.dtype, device) -> Union[Tensor, float]:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must return a tensor or a number, got {type(value).__name__}")
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != n):
        raise ValueError(f"{name} must return a scalar or a ({n},) tensor, got shape {tuple(value.shape)}")
    return value.to(device=device, dtype=dt)


def _dcl(views: _Views, w0, w1, backend: str) -> Tensor:
    neg0, neg1, positive = _nt_xent_terms(views, backend)
    return 0.5 * ((neg0 - w0 * positive).mean() + (neg1 - w1 * positive).mean())


def dcl_loss(out0: Tensor, out1: Tensor, temperature: float = 0.1,
             weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None, *,
             backend: str = "auto", check_finite: bool = False) -> Tensor:
    """Decoupled contrastive loss (docs/losses.md §6; Yeh et al. 2022), lightly's ``DCLLoss``.

    ``ℓ_i^k = −w_i^k·⟨u_i^0, u_i^1⟩/τ + LSE over the 2N−2 negatives of anchor (k, i)`` (the positive
    is removed from the normaliser), ``L = ½(mean_i ℓ^0 + mean_i ℓ^1)``.

    Args:
        out0, out1: (N, D) views, N ≥ 2, L2-normalised inside. temperature: τ > 0, default 0.1.
        weight_fn: None (w = 1) or a callable ``weight_fn(a, b)`` returning a scalar or (N,)
            weights, called as lightly does with the normalised views: w^0 = weight_fn(u0, u1),
            w^1 = weight_fn(u1, u0). Its output is used as returned (detach inside it if needed).
        check_finite: True raises a ValueError naming the input tensor that holds NaN/Inf
            (default False: they propagate to a NaN loss, as in torch; a host sync on GPUs).

    Primitives: as ``ntxent_loss``. Memory O(N·D) plus one block's workspace.
    """
    x0, x1 = _two_views(out0, out1, 2, "dcl_loss", check_finite)
    tau = _temperature("temperature", temperature, compute_dtype(x0))
    if weight_fn is not None and not callable(weight_fn):
        raise TypeError(f"weight_fn must be callable or None, got {type(weight_fn).__name__}")
    with _exact_math(x0.device):
        views = _Views([x0, x1], tau)
        w0 = w1 = 1.0
        if weight_fn is not None:
            u0, u1 = views.unit(0), views.unit(1)
            w0 = _weights(weight_fn(u0, u1), views.rows, "weight_fn", views.dtype, u0.device)
            w1 = _weights(weight_fn(u1, u0), views.rows, "weight_fn", views.dtype, u0.device)
        return _dcl(views, w0, w1, backend)


def dclw_loss(out0: Tensor, out1: Tensor, temperature: float = 0.1, sigma: float = 0.5, *,
              backend: str = "auto", check_finite: bool = False) -> Tensor:
    """Weighted DCL (docs/losses.md §6), lightly's ``DCLWLoss``: DCL with the negative von Mises–Fisher
    weights ``w_i = 2 − N·softmax_i(⟨u_i^0, u_i^1⟩/σ)``, detached; σ > 0 with 1/σ finite in the
    compute dtype, default 0.5; τ default 0.1. ``check_finite`` as in ``dcl_loss``."""
    x0, x1 = _two_views(out0, out1, 2, "dclw_loss", check_finite)
    dt = compute_dtype(x0)
    tau = _temperature("temperature", temperature, dt)
    sig = _positive_float("sigma", sigma, dt)
    with _exact_math(x0.device):
        views = _Views([x0, x1], tau)
        with torch.no_grad():
            w = 2.0 - views.rows * torch.softmax(views.cosine_value(0, 1) / sig, dim=0)
        return _dcl(views, w, w, backend)


# ----------------------------------------------------------------------------- §7 DHEL


def dhel_loss(out0: Tensor, out1: Tensor, temperature: float = 0.3, include_augs: bool = True, *,
              backend: str = "auto", check_finite: bool = False) -> Tensor:
    """Decoupled hyperspherical energy loss (docs/losses.md §7; Koromilas et al. 2024).

    ``L = mean_i [LSE_{j≠i} ⟨u_i,u_j⟩/τ − ⟨u_i,v_i⟩/τ]`` plus, with ``include_augs`` (default True,
    the authors' code), ``mean_i LSE_{j≠i} ⟨v_i,v_j⟩/τ``. out0 = u, out1 = v: (N, D), N ≥ 2,
    L2-normalised inside; τ default 0.3. ``check_finite=True`` raises a ValueError naming an
    input holding NaN/Inf (default: they propagate). Primitives: the within-view blocks only (one
    or two N×N calls). Memory O(N·D) plus one block's workspace.
    """
    x0, x1 = _two_views(out0, out1, 2, "dhel_loss", check_finite)
    tau = _temperature("temperature", temperature, compute_dtype(x0))
    V.check_bool("include_augs", include_augs)
    with _exact_math(x0.device):
        views = _Views([x0, x1], tau)
        positive = views.positive(0, 1)
        terms = views.within(0, 1.0, backend) - positive
        if include_augs:
            terms = terms + views.within(1, 1.0, backend)
        return terms.mean()


# ----------------------------------------------------------------------------- §8 multi-view


def _pair_lse(views: _Views, ordered: bool) -> Tensor:
    """(M,) LSE of u_il·u_il'/τ over view pairs l < l' (``ordered``: over l ≠ l', i.e. + log 2)."""
    pairs = [views.positive(l, m) for l in range(views.count) for m in range(l + 1, views.count)]
    lse = pairs[0] if len(pairs) == 1 else torch.logsumexp(torch.stack(pairs), dim=0)
    return lse + math.log(2.0) if ordered else lse


def mv_infonce_loss(views, temperature: float = 0.1, same_view_negatives: bool = True, *,
                    backend: str = "auto", check_finite: bool = False) -> Tensor:
    """Multi-view InfoNCE (docs/losses.md §8; Koromilas et al. 2025).

    ``L = (1/M) Σ_i [LSE_l LSE_{(j,m)≠(i,l)} u_il·u_jm/τ − LSE_{l≠l'} u_il·u_il'/τ]``: the V row LSEs
    of instance i are combined by one more LSE; the positive LSE runs over ordered view pairs.

    Args:
        views: (V, M, D) tensor or a list of V (M, D) tensors; V ≥ 2, M ≥ 1; normalised inside.
        temperature: τ > 0, default 0.1.
        same_view_negatives: True (the authors' code) keeps the pairs (j≠i, m=l) in the
            normaliser; False drops them (the paper's printed form).
        check_finite: True raises a ValueError naming the input tensor that holds NaN/Inf
            (default False: they propagate to a NaN loss, as in torch; a host sync on GPUs).

    Primitives: V(V−1)/2 cross-view blocks (nothing excluded: the other views of the instance
    are in the normaliser) and, with ``same_view_negatives``, V within-view blocks. Positives:
    V(V−1)/2 row-wise dots, O(M·V²·D). Memory O(V·M·D) plus one block's workspace.
    """
    parts = _view_list(views, 1, "mv_infonce_loss", check_finite)
    tau = _temperature("temperature", temperature, compute_dtype(parts[0]))
    V.check_bool("same_view_negatives", same_view_negatives)
    with _exact_math(parts[0].device):
        vs = _Views(parts, tau)
        positive = _pair_lse(vs, ordered=True)
        normalisers, = vs.normalisers(within=same_view_negatives, across="none", backend=backend)
        grouped = torch.logsumexp(torch.stack(normalisers), dim=0)
        return (grouped - positive).mean()


def mv_dhel_loss(views, temperature: float = 0.1, *, backend: str = "auto", check_finite: bool = False) -> Tensor:
    """Multi-view DHEL (docs/losses.md §8; Koromilas et al. 2025).

    ``L = (1/M) Σ_i [Σ_l LSE_{j≠i} u_il·u_jl/τ − LSE_{l<l'} u_il·u_il'/τ]``: uniformity within each
    view only. views: (V, M, D) or a list of V (M, D); V ≥ 2, M ≥ 2 (negatives); normalised
    inside; τ default 0.1; ``check_finite`` as in ``mv_infonce_loss``. Primitives: V within-view
    blocks. Memory O(V·M·D) plus one block's workspace.
    """
    parts = _view_list(views, 2, "mv_dhel_loss", check_finite)
    tau = _temperature("temperature", temperature, compute_dtype(parts[0]))
    with _exact_math(parts[0].device):
        vs = _Views(parts, tau)
        positive = _pair_lse(vs, ordered=False)
        uniformity, = vs.normalisers(within=True, across=None, backend=backend)
        return (sum(uniformity) - positive).mean()


# ----------------------------------------------------------------------------- §12 HCL


def _log1mexp(t: Tensor) -> Tensor:
    """log(1 − e^t) for t < 0 (accurate on both sides of −log 2)."""
    return torch.where(t > -math.log(2.0), torch.log(-torch.expm1(t)), torch.log1p(-torch.exp(t)))


def hcl_loss(out0: Tensor, out1: Tensor, temperature: float = 0.5, tau_plus: float = 0.1,
             beta: float = 1.0, *, backend: str = "auto", check_finite: bool = False) -> Tensor:
    """Hard-negative, debiased contrastive loss (docs/losses.md §12; Robinson et al. 2021).

    In the NT-Xent layout (2N anchors, positive logit p_a, negatives n_aj = ℓ over the 2N−2 others):
    ``E_a = exp(LSE((1+β)·n_a) − LSE(β·n_a))``,
    ``Ng_a = max((Ñ·E_a − τ⁺·Ñ·e^{p_a})/(1−τ⁺), Ñ·e^{−1/τ})``, Ñ = 2N−2,
    ``L = mean_a [log(e^{p_a} + Ng_a) − p_a]``, all in log space:
    ``log Ng = max(log Ñ + log E + log(1 − τ⁺·e^{p−log E}) − log(1−τ⁺), log Ñ − 1/τ)`` (the first
    branch is −∞ when τ⁺·e^p ≥ E) and the term is ``softplus(log Ng − p)``.

    Args: out0, out1 (N, D), N ≥ 2, normalised inside; temperature τ > 0 (default 0.5);
    tau_plus τ⁺ ∈ [0, 1) (default 0.1); beta β ≥ 0 (default 1.0), with (1+β)/τ·1e12 finite in
    the compute dtype (the largest per-row logit scale). β = 0, τ⁺ = 0 is NT-Xent.
    ``check_finite=True`` raises a ValueError naming an input holding NaN/Inf (default: they
    propagate).
    Primitives: the NT-Xent blocks at scale (1+β)/τ and, when β ≠ 0, again at β/τ (β = 0 gives
    LSE(0·n) = log Ñ without a call). Memory O(N·D) plus one block's workspace.
    """
    x0, x1 = _two_views(out0, out1, 2, "hcl_loss", check_finite)
    beta = _concentration(beta)
    tau = _temperature("temperature", temperature, compute_dtype(x0), beta=beta)
    tp = V.check_fraction("tau_plus", tau_plus)
    with _exact_math(x0.device):
        views = _Views([x0, x1], tau)
        # log Ñ as a tensor: math.log of the (symbolic) row count would make torch.compile
        # specialise on the batch size.
        log_count = torch.log(torch.full((), 2 * views.rows - 2, dtype=views.dtype, device=x0.device))
        positive = views.positive(0, 1)
        positive = torch.cat([positive, positive])
        factors = (1.0 + beta,) if beta == 0.0 else (1.0 + beta, beta)
        lses = [torch.cat(per_view) for per_view in
                views.normalisers(within=True, across="diagonal", factors=factors, backend=backend)]
        # log E = LSE((1+β)·n) − LSE(β·n); with β = 0 the second LSE is log Ñ.
        log_e = lses[0] - (log_count if beta == 0.0 else lses[1])
        log_ng = log_count + log_e
        if tp > 0.0:
            # log(Ñ·E − τ⁺·Ñ·e^p) − log(1−τ⁺) = log Ñ + log E + log(1 − e^t) − log(1−τ⁺)
            # with t = log τ⁺ + p − log E; for t ≥ 0 the first branch is −∞ (the floor wins).
            t = math.log(tp) + positive - log_e
            below = t < 0
            safe_t = torch.where(below, t, torch.full_like(t, -1.0))
            log_ng = torch.where(below, log_ng + _log1mexp(safe_t) - math.log1p(-tp), float("-inf"))
        log_ng = torch.clamp(log_ng, min=log_count - 1.0 / tau)
        return softplus(log_ng - positive).mean()


__all__ = [
    "dcl_loss",
    "dclw_loss",
    "dhel_loss",
    "hcl_loss",
    "mv_dhel_loss",
    "mv_infonce_loss",
    "ntxent_loss",
    "supcon_loss",
]
