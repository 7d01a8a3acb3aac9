"""``similarity_kl`` backward (student only) from the forward's saved statistics (docs/kernels.md,
"similarity_kl" and "Backward").

The gradient of ``⟨g, row⟩ + ⟨h, col⟩`` with respect to the student logit ``S_ij`` is

    G_ij = g_i·(p^s_ij − p^t_ij) + h_j·(q^s_ij − q^t_ij),   p^s_ij = 2^((S_ij − m^s_i) − lg^s_i)

(log2 units; (m, lg) the saved row / column [max, log-sum] statistics of student s and teacher t,
``kl_forward``; q with the column statistics), the same for KL and cross-entropy. Both tiles are
recomputed bit for bit as the forward formed them (x the MMA's left operand, the same BLOCK_K and
scale products), so every exponent is exact near its max at any logit magnitude. ``_kl_owner_kernel`` recomputes both tiles (student over D_s, teacher over D_t),
forms G in fp32, casts it to the student dtype as the MMA operand and accumulates the owned
operand's gradient ``s_s·(G·B)`` in fp32 registers, written once, exactly like the
``similarity_lse`` owner kernels (``owner.py``: ``NUM_DV`` ≤ 4 accumulators of ``BLOCK_DV``
columns per program, wider D_s sliced over grid axis 1, few A blocks → column splits over grid
axis 2 into fp32 partial outputs summed by torch in a fixed order). The teacher gets nothing.

Passes (deterministic default): the row owner (A = x_s) writes dx_s and the scale-gradient rows
``⟨x_i, (G·y)_i⟩`` (formed before the scale is applied, so s_s = 0 works; docs/kernels.md's O(N·D)
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

from .._spec import KLSpec
from . import _autotune, _counts
from ._common import (load_scalar, load_weighted_shift, owner_program, pair_logits, slice_accumulators,
                      step_slices, store_slices, weighted_probabilities)
from ._config import tiles
from ._launch import (OwnerFlags, OwnerOutputs, OwnerResult, Pair, atomic_pass_pays, fp32_vector, make_pair,
                      optional, owner_plan, split_align, target_programs, weighted_shifts, zeros_if_missing)
from ._modes import (KL_STUDENT_MAX, KL_TEACHER_MAX, LOG2E, PER_COLUMN, PER_ROW, SCALAR_FLOAT, SCALAR_TENSOR,
                     ScaleMode)
from .kl_forward import operand_args, table_dtype


@triton.jit
def _weighted_probabilities(l2, m2_a, w_a, m2_b, w_b, HAS_A_GRAD: tl.constexpr, HAS_B_GRAD: tl.constexpr,
                            BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """g_a·p_row + g_b·p_col for a log2-unit logit tile, from ``load_weighted_shift``'s per-row
    (m2, g·2^(−lg2)) of the rows (a) and the columns (b)."""
    p = tl.zeros((BLOCK_A, BLOCK_B), tl.float32)
    if HAS_A_GRAD:
        p += weighted_probabilities(l2, m2_a, w_a, PER_ROW)
    if HAS_B_GRAD:
        p += weighted_probabilities(l2, m2_b, w_b, PER_COLUMN)
    return p


@triton.jit
def _side_weights(stat_ptr, stride_stat, idx, ok, FIELD: tl.constexpr, HAS_GRAD: tl.constexpr,
                  BLOCK: tl.constexpr):
    """``load_weighted_shift`` of the rows ``idx`` (owned or streamed) from rows FIELD,
    FIELD + 1 of their ``weighted_shifts`` (``KL_STUDENT_MAX`` or ``KL_TEACHER_MAX``), or unused
    zeros without that side's gradient."""
    if HAS_GRAD:
        m2, w = load_weighted_shift(stat_ptr + stride_stat * FIELD, stride_stat, idx, ok)
    else:
        m2 = tl.zeros((BLOCK,), tl.float32)
        w = m2
    return m2, w


@triton.jit
def _kl_owner_kernel(
    a_ptr, b_ptr, n_a, n_b, dim, stride_a0, stride_a1, stride_b0, stride_b1,
    ta_ptr, tb_ptr, dim_t, stride_ta0, stride_ta1, stride_tb0, stride_tb1,
    scale_ptr, scale_value, t_scale_ptr, t_scale_value,
    a_stat_ptr, stride_astat, b_stat_ptr, stride_bstat,
    out_ptr, stride_oc, stride_o0, stride_o1, dscale_ptr, out_b_ptr, stride_ob0, stride_ob1,
    cols_per_split, slices,
    SCALE_MODE: tl.constexpr, T_SCALE_MODE: tl.constexpr, PRECISION: tl.constexpr,
    T_PRECISION: tl.constexpr, A_IS_X: tl.constexpr, HAS_A_GRAD: tl.constexpr, HAS_B_GRAD: tl.constexpr,
    STORE_OUT: tl.constexpr, NEED_DSCALE: tl.constexpr, ATOMIC_B: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr,
):
    tl.static_assert(NUM_DV >= 1 and NUM_DV <= 4, "one to four output accumulators per program")
    tl.static_assert((SCALE_MODE == SCALAR_FLOAT or SCALE_MODE == SCALAR_TENSOR)
                     and (T_SCALE_MODE == SCALAR_FLOAT or T_SCALE_MODE == SCALAR_TENSOR),
                     "similarity_kl takes scalar scales")
    tl.static_assert(not ATOMIC_B or STORE_OUT or NEED_DSCALE,
                     "ATOMIC_B runs in the row-owner pass (A = x) that accumulates dx")
    pid_a, pid_s, pid_c, a_idx, a_ok, col_start, col_end, d_start = owner_program(
        n_a, n_b, cols_per_split, BLOCK_A, BLOCK_DV, NUM_DV)
    s_a = load_scalar(scale_ptr, scale_value, SCALE_MODE)
    s2 = s_a * LOG2E
    t2_scale = load_scalar(t_scale_ptr, t_scale_value, T_SCALE_MODE) * LOG2E
    # Per-A-row inputs of the gradient tile, loaded once: (max, g·2^(−log-sum)) of the student
    # (rows 0, 1 of the weighted shifts) and of the teacher (rows 2, 3).
    ms_a, ws_a = _side_weights(a_stat_ptr, stride_astat, a_idx, a_ok, KL_STUDENT_MAX, HAS_A_GRAD, BLOCK_A)
    mt_a, wt_a = _side_weights(a_stat_ptr, stride_astat, a_idx, a_ok, KL_TEACHER_MAX, HAS_A_GRAD, BLOCK_A)
    acc0, acc1, acc2, acc3 = slice_accumulators(BLOCK_A, BLOCK_DV, NUM_DV)
    for j0 in range(col_start, col_end, BLOCK_B):
        b_idx = tl.cast(j0, tl.int64) + tl.arange(0, BLOCK_B).to(tl.int64)
        b_ok = b_idx < col_end
        # The student's probabilities first, then the teacher's subtracted: only G stays live
        # across the teacher's GEMM (fewer registers than keeping both logit tiles); each side's
        # column statistics are loaded right where they are used, for the same reason.
        acc = pair_logits(a_ptr, b_ptr, a_idx, a_ok, b_idx, b_ok, dim, stride_a0, stride_a1,
                          stride_b0, stride_b1, BLOCK_A, BLOCK_B, BLOCK_K, PRECISION, A_IS_X)
        ms_b, ws_b = _side_weights(b_stat_ptr, stride_bstat, b_idx, b_ok, KL_STUDENT_MAX, HAS_B_GRAD, BLOCK_B)
        g = _weighted_probabilities(acc * s2, ms_a, ws_a, ms_b, ws_b, HAS_A_GRAD, HAS_B_GRAD, BLOCK_A, BLOCK_B)
        acc_t = pair_logits(ta_ptr, tb_ptr, a_idx, a_ok, b_idx, b_ok, dim_t, stride_ta0, stride_ta1,
                            stride_tb0, stride_tb1, BLOCK_A, BLOCK_B, BLOCK_K, T_PRECISION, A_IS_X)
        mt_b, wt_b = _side_weights(b_stat_ptr, stride_bstat, b_idx, b_ok, KL_TEACHER_MAX, HAS_B_GRAD, BLOCK_B)
        g -= _weighted_probabilities(acc_t * t2_scale, mt_a, wt_a, mt_b, wt_b, HAS_A_GRAD, HAS_B_GRAD,
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
    store_slices(acc0, acc1, acc2, acc3, a_ptr, a_idx, a_ok, out_ptr, dscale_ptr, pid_c, pid_s, slices,
                 n_a, d_start, dim, stride_a0, stride_a1, stride_oc, stride_o0, stride_o1, s_a,
                 BLOCK_A, SCALE_MODE, BLOCK_DV, NUM_DV, STORE_OUT, NEED_DSCALE)


# ----------------------------------------------------------------------------- host


@dataclass
class _Side:
    """Upstream gradient of one side's rows and its (4, n) ``weighted_shifts`` of the saved
    statistics ``[m_s, lg_s, m_t, lg_t]`` (fp32, contiguous: the kernel reads row k at ``k·n``),
    or None."""

    grad: Optional[torch.Tensor]
    stats: Optional[torch.Tensor]

    @staticmethod
    def of(grad, stats) -> "_Side":
        if grad is None:
            return _Side(None, None)
        grad = fp32_vector(grad)
        return _Side(grad, weighted_shifts(stats, grad))


def _operand_dtype(student: Pair, teacher: Pair) -> torch.dtype:
    return table_dtype(student.a.dtype, teacher.a.dtype)


def atomic_pays(student: Pair, teacher: Pair) -> bool:
    """Whether one row-owner pass adding dy by fp32 atomics (s_atomic·(1 + r) recomputes + 2
    GEMMs + the atomic read-modify-write traffic of dy) is faster than two owner passes
    (2·(s_owner·(1 + r) + 1)), r = D_t/D_s: ``_launch.atomic_pass_pays`` (issue 11)."""
    dev, dtype = student.a.device, _operand_dtype(student, teacher)
    return atomic_pass_pays(student.n_a, student.n_b, student.dim, tiles("owner", dev, dtype),
                            tiles("atomic", dev, dtype), dev, dtype, recompute=1.0 + teacher.dim / student.dim)


def run_kl_owner(student: Pair, teacher: Pair, a_side: _Side, b_side: _Side, *, store_out: bool,
                 need_dscale: bool = False, atomic_b: bool = False) -> OwnerResult:
    """One owner pass: A rows of ``student`` (and ``teacher``, same orientation) owned, B streamed.
    ``out_b`` of the result (ATOMIC_B) is Gᵀ·A unscaled: the caller applies the scalar scale."""
    dev = student.a.device
    kind = "atomic" if atomic_b else "owner"
    flags = OwnerFlags(a_side.grad is not None, b_side.grad is not None, store_out, need_dscale, atomic_b)
    flags.check(student.scale_mode)
    t = tiles(kind, dev, _operand_dtype(student, teacher))
    plan = owner_plan(student.n_a, student.n_b, student.dim, t, True, split_align(dev),
                      target_programs(dev, t.programs_per_sm))
    outputs = OwnerOutputs.allocate(flags, plan, student.a, student.n_b)
    _counts.owner_launch("kl_owner", student.n_a, student.n_b,
                         ((student.dim, student.a.element_size(), student.a.dtype),
                          (teacher.dim, teacher.a.element_size(), teacher.a.dtype)),
                         student.dim, student.a.element_size(), t, plan, dev, accumulate=True, atomic=atomic_b,
                         store_out=store_out, dscale=need_dscale, stat_fields=4 * (b_side.stats is not None))
    _autotune.launch(
        _kl_owner_kernel, kind, t, (plan.blocks_a, plan.slices, plan.splits),
        dict(operand_args(student, teacher), **outputs.args(),
             a_stat_ptr=optional(a_side.stats, dev),
             stride_astat=a_side.stats.stride(0) if a_side.stats is not None else 0,
             b_stat_ptr=optional(b_side.stats, dev),
             stride_bstat=b_side.stats.stride(0) if b_side.stats is not None else 0,
             BLOCK_A=t.block_a),
        atomic_target="out_b_ptr" if atomic_b else "",
    )
    return outputs.result()


def _scaled(t: torch.Tensor, pair: Pair) -> torch.Tensor:
    """``t`` times the pair's scalar scale, in place (a 0-d device tensor stays on the device)."""
    return t.mul_(pair.scale if pair.scale_mode == ScaleMode.TENSOR else pair.scale_value)


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
    dx, dy = zeros_if_missing(dx, need_x, spec.x_s), zeros_if_missing(dy, need_y, spec.y_s)
    if need_scale:
        if dscale is None:
            dscale = torch.zeros((), dtype=torch.float32, device=spec.x_s.device)
        dscale = dscale.to(spec.scale_s.dtype)
    return dx, dy, dscale
