"""``similarity_kl`` backward (student only) from the saved fp32 LSEs (KERNELS.md,
"similarity_kl" and "Backward").

The gradient of ``⟨g, row⟩ + ⟨h, col⟩`` with respect to the student logit ``S_ij`` is

    G_ij = g_i·(2^(S_ij − r^s_i) − 2^(T_ij − r^t_i)) + h_j·(2^(S_ij − c^s_j) − 2^(T_ij − c^t_j))

(log2 units; r, c the saved row / column LSEs of student s and teacher t), the same for KL and
cross-entropy. ``_kl_owner_kernel`` recomputes both tiles (student over D_s, teacher over D_t),
forms G in fp32, casts it to the student dtype as the MMA operand and accumulates the owned
operand's gradient ``s_s·(G·B)`` in fp32 registers, written once, exactly like the
``similarity_lse`` owner kernels (``owner.py``: ``NUM_DV`` ≤ 4 accumulators of ``BLOCK_DV``
columns per program, wider D_s sliced over grid axis 1, few A blocks → column splits over grid
axis 2 into fp32 partial outputs summed by torch in a fixed order). The teacher gets nothing.

Passes (deterministic default): the row owner (A = x_s) writes dx_s and the scale-gradient rows
``⟨x_i, (G·y)_i⟩`` (formed before the scale is applied, so s_s = 0 works; KERNELS.md's O(N·D)
identity), the column owner (A = y_s, B = x_s) writes dy_s; no atomics. With
``deterministic=False`` and both gradients wanted, one row-owner pass also adds Gᵀ·x_s to an
fp32 buffer with atomics (scaled by s_s afterwards, in fp32) when that costs fewer
GEMM-equivalents. Tiles: the table's ``"owner"`` / ``"atomic"`` rows (the fp32 row when either
pair is fp32). G is formed as (student probabilities weighted by g, h) − (teacher's), so only
G stays live across the teacher's GEMM.

Cost, with s the D_s slices of a pass and r = D_t/D_s: deterministic 2·(s·(1 + r) + 1)
GEMM-equivalents (6 at s = 1, D_t = D_s), atomic s·(1 + r) + 2 (4). Up to four exp2 per pair.
Memory: O((N + M)·D_s) outputs (plus fp32 split partials when the columns are split).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .._kl import KLSpec
from . import _autotune
from ._common import finish_slices, load_scalar, logit_tile, row_indices, slice_accumulators, step_slices
from ._config import tiles
from ._launch import Pair, dummy, make_pair, optional, owner_plan, split_align, target_programs
from .kl_forward import operand_args, table_dtype


@triton.jit
def _weighted_probabilities(l2, g_a, r2_a, g_b, r2_b, HAS_A_GRAD: tl.constexpr, HAS_B_GRAD: tl.constexpr,
                            BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """g_a·2^(L − r_a) + g_b·2^(L − r_b) for a log2-unit logit tile (row and column softmaxes
    from the saved LSEs, each weighted by its upstream gradient)."""
    p = tl.zeros((BLOCK_A, BLOCK_B), tl.float32)
    if HAS_A_GRAD:
        p += g_a[:, None] * tl.exp2(l2 - r2_a[:, None])
    if HAS_B_GRAD:
        p += g_b[None, :] * tl.exp2(l2 - r2_b[None, :])
    return p


@triton.jit
def _kl_owner_kernel(
    a_ptr, b_ptr, n_a, n_b, dim, stride_a0, stride_a1, stride_b0, stride_b1,
    ta_ptr, tb_ptr, dim_t, stride_ta0, stride_ta1, stride_tb0, stride_tb1,
    scale_ptr, scale_value, t_scale_ptr, t_scale_value,
    a_grad_ptr, a_lse_s_ptr, a_lse_t_ptr, b_grad_ptr, b_lse_s_ptr, b_lse_t_ptr,
    out_ptr, stride_oc, stride_o0, stride_o1, dscale_ptr, out_b_ptr, stride_ob0, stride_ob1,
    cols_per_split, slices,
    SCALE_MODE: tl.constexpr, T_SCALE_MODE: tl.constexpr, PRECISION: tl.constexpr,
    T_PRECISION: tl.constexpr, HAS_A_GRAD: tl.constexpr, HAS_B_GRAD: tl.constexpr,
    STORE_OUT: tl.constexpr, NEED_DSCALE: tl.constexpr, ATOMIC_B: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr,
):
    tl.static_assert(NUM_DV >= 1 and NUM_DV <= 4, "one to four output accumulators per program")
    tl.static_assert(SCALE_MODE <= 1 and T_SCALE_MODE <= 1, "similarity_kl takes scalar scales")
    pid_a = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_c = tl.program_id(2)
    a_idx, a_ok = row_indices(pid_a, n_a, BLOCK_A)
    col_start = pid_c * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n_b)
    d_start = pid_s * (NUM_DV * BLOCK_DV)
    s_a = load_scalar(scale_ptr, scale_value, SCALE_MODE)
    s2 = s_a * 1.4426950408889634
    t2_scale = load_scalar(t_scale_ptr, t_scale_value, T_SCALE_MODE) * 1.4426950408889634
    # Per-A-row inputs of the gradient tile, loaded once; LSEs to log2 units.
    if HAS_A_GRAD:
        g_a = tl.load(a_grad_ptr + a_idx, mask=a_ok, other=0.0)
        rs_a = tl.load(a_lse_s_ptr + a_idx, mask=a_ok, other=0.0) * 1.4426950408889634
        rt_a = tl.load(a_lse_t_ptr + a_idx, mask=a_ok, other=0.0) * 1.4426950408889634
    else:  # unused placeholders (the helper skips them)
        g_a = s_a
        rs_a = s_a
        rt_a = s_a
    acc0, acc1, acc2, acc3 = slice_accumulators(BLOCK_A, BLOCK_DV, NUM_DV)
    for j0 in range(col_start, col_end, BLOCK_B):
        b_idx = tl.cast(j0, tl.int64) + tl.arange(0, BLOCK_B).to(tl.int64)
        b_ok = b_idx < col_end
        if HAS_B_GRAD:
            g_b = tl.load(b_grad_ptr + b_idx, mask=b_ok, other=0.0)
            rs_b = tl.load(b_lse_s_ptr + b_idx, mask=b_ok, other=0.0) * 1.4426950408889634
            rt_b = tl.load(b_lse_t_ptr + b_idx, mask=b_ok, other=0.0) * 1.4426950408889634
        else:
            g_b = s_a
            rs_b = s_a
            rt_b = s_a
        # The student's probabilities first, then the teacher's subtracted: only G stays live
        # across the teacher's GEMM (fewer registers than keeping both logit tiles).
        acc = logit_tile(a_ptr, b_ptr, a_idx, a_ok, b_idx, b_ok, dim, stride_a0, stride_a1,
                         stride_b0, stride_b1, BLOCK_A, BLOCK_B, BLOCK_K, PRECISION)
        g = _weighted_probabilities(acc * s2, g_a, rs_a, g_b, rs_b, HAS_A_GRAD, HAS_B_GRAD, BLOCK_A, BLOCK_B)
        acc_t = logit_tile(ta_ptr, tb_ptr, a_idx, a_ok, b_idx, b_ok, dim_t, stride_ta0, stride_ta1,
                           stride_tb0, stride_tb1, BLOCK_A, BLOCK_B, BLOCK_K, T_PRECISION)
        g -= _weighted_probabilities(acc_t * t2_scale, g_a, rt_a, g_b, rt_b, HAS_A_GRAD, HAS_B_GRAD,
                                     BLOCK_A, BLOCK_B)
        # padded pairs contribute nothing (whatever their exponentials were)
        g = tl.where(a_ok[:, None] & b_ok[None, :], g, 0.0)
        # One MMA operand for both products (G·B and, with ATOMIC_B, Gᵀ·A): the scalar scale
        # of the atomic B gradient is applied by the host afterwards, in fp32.
        g_op = g.to(b_ptr.dtype.element_ty)
        acc0, acc1, acc2, acc3 = step_slices(
            acc0, acc1, acc2, acc3, g_op, g_op, b_ptr, b_idx, b_ok, a_ptr, a_idx, a_ok, out_b_ptr,
            d_start, dim, stride_a0, stride_a1, stride_b0, stride_b1, stride_ob0, stride_ob1,
            BLOCK_DV, NUM_DV, ATOMIC_B, PRECISION)
    out_c = out_ptr + tl.cast(pid_c, tl.int64) * stride_oc
    ds = finish_slices(acc0, acc1, acc2, acc3, a_ptr, a_idx, a_ok, out_c, d_start, dim,
                       stride_a0, stride_a1, stride_o0, stride_o1, s_a, BLOCK_A, SCALE_MODE,
                       BLOCK_DV, NUM_DV, STORE_OUT, NEED_DSCALE)
    if NEED_DSCALE:
        part = tl.cast(pid_c * slices + pid_s, tl.int64) * n_a + a_idx
        tl.store(dscale_ptr + part, ds, mask=a_ok)


# ----------------------------------------------------------------------------- host


def _vector(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # upstream gradients may be expanded (stride 0) or half; LSE rows are views: O(N) fp32 copies
    return None if t is None else t.detach().to(torch.float32).contiguous()


@dataclass
class _Side:
    """Upstream gradient and saved (student, teacher) LSEs of one side's rows, or None."""

    grad: Optional[torch.Tensor]
    lse_s: Optional[torch.Tensor]
    lse_t: Optional[torch.Tensor]

    @staticmethod
    def of(grad, stats) -> "_Side":
        if grad is None:
            return _Side(None, None, None)
        return _Side(_vector(grad), _vector(stats[0]), _vector(stats[1]))


def _operand_dtype(student: Pair, teacher: Pair) -> torch.dtype:
    return table_dtype(student.a.dtype, teacher.a.dtype)


def atomic_pays(student: Pair, teacher: Pair) -> bool:
    """Whether one row-owner pass adding dy by atomics (s_atomic·(1 + r) recomputes + 2 GEMMs)
    costs fewer GEMM-equivalents than two owner passes (2·(s_owner·(1 + r) + 1)), r = D_t/D_s."""
    dev = student.a.device
    dtype, align = _operand_dtype(student, teacher), split_align(dev)
    s_owner, s_atomic = (
        owner_plan(student.n_a, student.n_b, student.dim, tiles(kind, dev, dtype), True, align, 1).slices
        for kind in ("owner", "atomic")
    )
    recompute = 1.0 + teacher.dim / student.dim
    return s_atomic * recompute + 2 < 2 * (s_owner * recompute + 1)


@dataclass
class KLOwnerResult:
    out: Optional[torch.Tensor]          # (n_a, D_s) in the student dtype: s_s·(G·B)
    dscale_rows: Optional[torch.Tensor]  # (n_a,) fp32 ⟨a_i, (G·B)_i⟩ before the scale
    out_b: Optional[torch.Tensor]        # (n_b, D_s) fp32 atomic accumulation Gᵀ·A, unscaled (ATOMIC_B)


def run_kl_owner(student: Pair, teacher: Pair, a_side: _Side, b_side: _Side, *, store_out: bool,
                 need_dscale: bool = False, atomic_b: bool = False) -> KLOwnerResult:
    """One owner pass: A rows of ``student`` (and ``teacher``, same orientation) owned, B streamed."""
    dev = student.a.device
    kind = "atomic" if atomic_b else "owner"
    t = tiles(kind, dev, _operand_dtype(student, teacher))
    plan = owner_plan(student.n_a, student.n_b, student.dim, t, True, split_align(dev),
                      target_programs(dev, t.programs_per_sm))
    f32 = dict(dtype=torch.float32, device=dev)
    if store_out and plan.splits == 1:
        out = torch.empty((student.n_a, student.dim), dtype=student.a.dtype, device=dev)
        out_strides = (0, out.stride(0), out.stride(1))
    elif store_out:
        out = torch.empty((plan.splits, student.n_a, student.dim), **f32)
        out_strides = out.stride()
    else:
        out, out_strides = dummy(dev), (0, 0, 0)
    dscale = torch.empty((plan.splits * plan.slices, student.n_a), **f32) if need_dscale else dummy(dev)
    out_b = torch.zeros((student.n_b, student.dim), **f32) if atomic_b else dummy(dev)
    _autotune.launch(
        _kl_owner_kernel, kind, t, (plan.blocks_a, plan.slices, plan.splits),
        dict(operand_args(student, teacher),
             a_grad_ptr=optional(a_side.grad, dev), a_lse_s_ptr=optional(a_side.lse_s, dev),
             a_lse_t_ptr=optional(a_side.lse_t, dev), b_grad_ptr=optional(b_side.grad, dev),
             b_lse_s_ptr=optional(b_side.lse_s, dev), b_lse_t_ptr=optional(b_side.lse_t, dev),
             out_ptr=out, stride_oc=out_strides[0], stride_o0=out_strides[1], stride_o1=out_strides[2],
             dscale_ptr=dscale, out_b_ptr=out_b, stride_ob0=out_b.stride(0) if atomic_b else 0,
             stride_ob1=out_b.stride(1) if atomic_b else 0,
             cols_per_split=plan.cols_per_split, slices=plan.slices,
             HAS_A_GRAD=a_side.grad is not None, HAS_B_GRAD=b_side.grad is not None,
             STORE_OUT=store_out, NEED_DSCALE=need_dscale, ATOMIC_B=atomic_b, BLOCK_A=t.block_a,
             BLOCK_DV=plan.block_dv, NUM_DV=plan.num_dv),
        atomic_target="out_b_ptr" if atomic_b else "",
    )
    if store_out and plan.splits > 1:
        out = out.sum(dim=0).to(student.a.dtype)  # fixed-order reduction: deterministic
    return KLOwnerResult(
        out=out if store_out else None,
        dscale_rows=dscale.sum(dim=0) if need_dscale else None,
        out_b=out_b if atomic_b else None,
    )


def _scaled(t: torch.Tensor, pair: Pair) -> torch.Tensor:
    """``t`` times the pair's scalar scale, in place (a 0-d device tensor stays on the device)."""
    return t.mul_(pair.scale if pair.scale_mode == 1 else pair.scale_value)


def kl_gradients(spec: KLSpec, grad_row, grad_col, row_stats, col_stats, needs):
    """(dx_s, dy_s, dscale_s) of ⟨grad_row, row⟩ + ⟨grad_col, col⟩, None where ``needs``
    (x, y, scale) is False: the ``similarity_kl_backward`` contract of ``mmloss.ops.torch_kl``."""
    need_x, need_y, need_scale = needs
    need_scale = need_scale and spec.scale_s is not None
    rows_side, cols_side = _Side.of(grad_row, row_stats), _Side.of(grad_col, col_stats)
    dx = dy = dscale = None
    if rows_side.grad is not None or cols_side.grad is not None:
        student, teacher = make_pair(spec.student(), True), make_pair(spec.teacher(), True)
        run_rows = need_x or need_scale
        atomic = run_rows and need_y and not spec.deterministic and atomic_pays(student, teacher)
        if run_rows:
            res = run_kl_owner(student, teacher, rows_side, cols_side, store_out=need_x,
                               need_dscale=need_scale, atomic_b=atomic)
            dx = res.out
            if need_scale:
                dscale = res.dscale_rows.sum()
            if atomic:
                dy = _scaled(res.out_b, student).to(spec.y_s.dtype)
        if need_y and not atomic:
            dy = run_kl_owner(make_pair(spec.student(), False), make_pair(spec.teacher(), False),
                              cols_side, rows_side, store_out=True).out
    if need_x and dx is None:
        dx = torch.zeros(spec.x_s.shape, dtype=spec.x_s.dtype, device=spec.x_s.device)
    if need_y and dy is None:
        dy = torch.zeros(spec.y_s.shape, dtype=spec.y_s.dtype, device=spec.y_s.device)
    if need_scale:
        if dscale is None:
            dscale = torch.zeros((), dtype=torch.float32, device=spec.x_s.device)
        dscale = dscale.to(spec.scale_s.dtype)
    return dx, dy, dscale
