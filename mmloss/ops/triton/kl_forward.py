"""``similarity_kl`` forward: per-row and per-column KL(p_t‖p_s) (or the cross-entropy
H(p_t, p_s)) of the student logits ``S = s_s·x_s·y_sᵀ`` against the teacher logits
``T = s_t·x_t·y_tᵀ`` from one pass over the tiles (docs/kernels.md, "similarity_kl"; docs/losses.md, "The
three fused primitives"). The teacher's D may differ from the student's.

Statistics per row (and, from the same tiles, per column), all fp32 in log2 units (log2(e) is
folded into both scales, every exponential is one ``exp2``):

- student: running max ``m_s`` and ``l_s = Σ 2^(S − m_s)``;
- teacher: running max ``m_t``, ``l_t = Σ 2^(T − m_t)``, the teacher-weighted difference
  ``w = Σ 2^(T − m_t)·(T − S)`` and, for the cross-entropy, ``e = Σ 2^(T − m_t)·(m_t − T)``
  (non-negative terms: the teacher's entropy without cancellation); ``l_t``, ``w`` and ``e`` are
  rescaled together when the teacher's max moves (``e`` also gains ``(m_new − m_old)·l_t``).

Then ``KL = ln 2·[w/l_t + (m_s − m_t) + log2 l_s − log2 l_t]`` (exactly 0 when teacher and
student tiles are bit-identical) and ``H = KL + ln 2·[log2 l_t + e/l_t]``, clamped at 0 against
rounding (a NaN passes: NaN inputs give NaN, as in torch). The saved statistics, per row / column,
are unrounded and in log2 units: ``stats = [m_s, log2 l_s, m_t, log2 l_t]`` (4, n) fp32 — the
student's and the teacher's max of ``log2(e)·s·⟨a, b⟩`` and log-sum; ``kl_backward`` recomputes
both tiles bit for bit (x always the MMA's left operand, ``_common.pair_logits``; the same
BLOCK_K) and forms ``2^((S − m_s) − log2 l_s)``, exact near the max at any |L|.

Kernels:
- ``_kl_stats_kernel``: the persistent grid of ``lse_forward`` (``progs_a × splits`` programs,
  ``_launch.stats_plan``; tiles from the table's ``"kl_stats"`` row: two logit tiles and six
  running statistics take more registers than the LSE kernel's one tile, so the table gives it
  fewer rows per program). Program (r, c) owns A blocks r, r + progs_a, … and streams the B
  columns of split c; per tile two GEMMs (student over D_s, teacher over D_t), then the row
  merge in registers and (COLS) the column merge into the program's own slice of a
  (fields, progs_a, n_b) partials workspace. With split columns the row statistics go to
  (fields, splits, n_a) partials too.
- ``_kl_combine_kernel``: merges the partials of each row / column in part order
  (deterministic) and writes the value and both LSEs.

Cost: 2 GEMM-equivalents at D_t = D_s (1 + D_t/D_s in general) for rows and columns together;
four exp2 per logit pair when both directions are asked (row and column shifts differ, student
and teacher), two otherwise (plus one per row / column and tile for the merges). Dtypes: each
pair (student, teacher) has one dtype among fp32/fp16/bf16, the two may differ; operands enter
the MMA in their dtype, everything after is fp32. Memory: the outputs plus O(P·(N + M)) fp32 partials (five fields,
six with the cross-entropy) for P ≤ (programs per SM) × SMs programs; nothing N×M. A
columns-only call runs the rows-only kernel on the swapped problem (no column workspace).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._spec import KLSpec
from . import _autotune, _counts
from ._common import finite_shift, load_scalar, log2_sum, pair_logits, row_indices, split_columns
from ._config import tiles
from ._launch import Pair, dot_precision, make_pair, split_align, stats_plan, target_programs
from ._modes import (KL_PART_ENTROPY_SUM, KL_PART_TEACHER_MAX, KL_PART_TEACHER_SUM, KL_PART_WEIGHTED_DIFF,
                     KL_TEACHER_LOG_SUM, KL_TEACHER_MAX, LN2, LOG2E, PER_COLUMN, PER_ROW, KLPartial, KLStat)

# Partials fields (_modes.KLPartial): every field but the entropy sum, or all with the cross-entropy.
FIELDS_KL = int(KLPartial.ENTROPY_SUM)
FIELDS_CE = len(KLPartial)


def table_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype whose tile-table row a launch over operands of dtypes ``a`` and ``b`` uses:
    fp32 when either is fp32 (its row has the smaller K-chunk, so both operands' tiles fit)."""
    return torch.float32 if torch.float32 in (a, b) else a


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _empty_states(BLOCK: tl.constexpr):
    """(m_s, l_s, m_t, l_t, w, e) of BLOCK rows with nothing merged yet: maxima −inf, sums 0."""
    m_s = tl.full((BLOCK,), float("-inf"), tl.float32)
    l_s = tl.zeros((BLOCK,), tl.float32)
    m_t = tl.full((BLOCK,), float("-inf"), tl.float32)
    l_t = tl.zeros((BLOCK,), tl.float32)
    w = tl.zeros((BLOCK,), tl.float32)
    e = tl.zeros((BLOCK,), tl.float32)
    return m_s, l_s, m_t, l_t, w, e


@triton.jit
def _merge_student(m, l, m_new_part, l_part):
    """Merge the (max, sum) state (m, l) with another (m_new_part, l_part), log2 units."""
    m_new = tl.maximum(m, m_new_part)
    shift = finite_shift(m_new)
    return m_new, l * tl.exp2(m - shift) + l_part * tl.exp2(m_new_part - shift)


@triton.jit
def _merge_teacher(m, l, w, e, m2, l2, w2, e2, CROSS_ENTROPY: tl.constexpr):
    """Merge two teacher states (max, Σ2^(T−max), Σ2^(T−max)(T−S), Σ2^(T−max)(max−T)).

    Both are rescaled to the new max; an entropy sum moves by (new − old)·sum (its terms grow
    by the shift). Empty states (max −inf, sums 0) contribute exactly 0."""
    m_new = tl.maximum(m, m2)
    shift = finite_shift(m_new)
    r1 = tl.exp2(m - shift)
    r2 = tl.exp2(m2 - shift)
    if CROSS_ENTROPY:
        e = r1 * (e + (shift - finite_shift(m)) * l) + r2 * (e2 + (shift - finite_shift(m2)) * l2)
    return m_new, l * r1 + l2 * r2, w * r1 + w2 * r2, e


@triton.jit
def _tile_student(st, AXIS: tl.constexpr):
    """(max, Σ2^(S − max)) of a −inf-padded tile along AXIS."""
    m = tl.max(st, axis=AXIS)
    p = tl.exp2(st - tl.expand_dims(finite_shift(m), AXIS))
    return m, tl.sum(p, axis=AXIS)


@triton.jit
def _tile_teacher(tt, t_fin, diff, AXIS: tl.constexpr, CROSS_ENTROPY: tl.constexpr):
    """Teacher state of a tile along AXIS: ``tt`` the logits with padded pairs at −inf,
    ``t_fin`` the same with padded pairs finite (0), ``diff`` = T − S (0 on padded pairs)."""
    m = tl.max(tt, axis=AXIS)
    shift = tl.expand_dims(finite_shift(m), AXIS)
    p = tl.exp2(tt - shift)
    l = tl.sum(p, axis=AXIS)
    w = tl.sum(p * diff, axis=AXIS)
    if CROSS_ENTROPY:
        e = tl.sum(p * (shift - t_fin), axis=AXIS)
    else:
        e = w * 0.0
    return m, l, w, e


@triton.jit
def _finish(m_s, l_s, m_t, l_t, w, e, CROSS_ENTROPY: tl.constexpr):
    """(KL or H, log2 l_s, log2 l_t) in natural-log units (the value) and log2 units (the
    log-sums) from log2-domain states. Every real row or column has a finite max and sums ≥ 1
    unless its inputs are non-finite, and then the value is NaN or ±inf (never a clamped 0:
    the guards below only touch exact zeros, of padded rows, which are never stored)."""
    l_s1 = tl.where(l_s == 0.0, 1.0, l_s)
    l_t1 = tl.where(l_t == 0.0, 1.0, l_t)
    log_ls1 = log2_sum(l_s1)
    log_lt1 = log2_sum(l_t1)
    value = w / l_t1 + (finite_shift(m_s) - finite_shift(m_t)) + (log_ls1 - log_lt1)
    if CROSS_ENTROPY:
        value += log_lt1 + e / l_t1
    value = value * LN2
    return tl.where(value < 0.0, 0.0, value), log2_sum(l_s), log2_sum(l_t)


@triton.jit
def _load_student(part_ptr, field, at, ok):
    """Student (max, sum) partials: ``KLPartial.STUDENT_MAX`` and ``STUDENT_SUM``, fields 0 and 1
    (``field`` elements apart)."""
    m_s = tl.load(part_ptr + at, mask=ok, other=float("-inf"))
    l_s = tl.load(part_ptr + tl.cast(field, tl.int64) + at, mask=ok, other=0.0)
    return m_s, l_s


@triton.jit
def _load_teacher(part_ptr, field, at, ok, CROSS_ENTROPY: tl.constexpr):
    """Teacher (max, sum, weighted difference[, entropy sum]) partials: fields
    ``KL_PART_TEACHER_MAX`` to ``KL_PART_WEIGHTED_DIFF`` (``KL_PART_ENTROPY_SUM``)."""
    field = tl.cast(field, tl.int64)  # fields × programs × n may pass 2³¹
    m_t = tl.load(part_ptr + field * KL_PART_TEACHER_MAX + at, mask=ok, other=float("-inf"))
    l_t = tl.load(part_ptr + field * KL_PART_TEACHER_SUM + at, mask=ok, other=0.0)
    w = tl.load(part_ptr + field * KL_PART_WEIGHTED_DIFF + at, mask=ok, other=0.0)
    if CROSS_ENTROPY:
        e = tl.load(part_ptr + field * KL_PART_ENTROPY_SUM + at, mask=ok, other=0.0)
    else:
        e = w * 0.0
    return m_t, l_t, w, e


@triton.jit
def _store_student(part_ptr, field, at, ok, m_s, l_s):
    tl.store(part_ptr + at, m_s, mask=ok)
    tl.store(part_ptr + tl.cast(field, tl.int64) + at, l_s, mask=ok)


@triton.jit
def _store_teacher(part_ptr, field, at, ok, m_t, l_t, w, e, CROSS_ENTROPY: tl.constexpr):
    field = tl.cast(field, tl.int64)
    tl.store(part_ptr + field * KL_PART_TEACHER_MAX + at, m_t, mask=ok)
    tl.store(part_ptr + field * KL_PART_TEACHER_SUM + at, l_t, mask=ok)
    tl.store(part_ptr + field * KL_PART_WEIGHTED_DIFF + at, w, mask=ok)
    if CROSS_ENTROPY:
        tl.store(part_ptr + field * KL_PART_ENTROPY_SUM + at, e, mask=ok)


@triton.jit
def _store_result(out_ptr, stat_ptr, stride_stat, idx, ok, m_s, l_s, m_t, l_t, w, e,
                  CROSS_ENTROPY: tl.constexpr):
    """The value and the saved statistics ``[m_s, log2 l_s, m_t, log2 l_t]`` (``KLStat``) of the
    rows ``idx``."""
    value, log_ls, log_lt = _finish(m_s, l_s, m_t, l_t, w, e, CROSS_ENTROPY)
    tl.store(out_ptr + idx, value, mask=ok)
    tl.store(stat_ptr + idx, m_s, mask=ok)
    tl.store(stat_ptr + stride_stat + idx, log_ls, mask=ok)
    tl.store(stat_ptr + stride_stat * KL_TEACHER_MAX + idx, m_t, mask=ok)
    tl.store(stat_ptr + stride_stat * KL_TEACHER_LOG_SUM + idx, log_lt, mask=ok)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _kl_stats_kernel(
    a_ptr, b_ptr, n_a, n_b, dim, stride_a0, stride_a1, stride_b0, stride_b1,
    ta_ptr, tb_ptr, dim_t, stride_ta0, stride_ta1, stride_tb0, stride_tb1,
    scale_ptr, scale_value, t_scale_ptr, t_scale_value,
    a_out_ptr, a_stat_ptr, stride_stat, a_part_ptr, a_field, b_part_ptr, b_field, progs_a, cols_per_split,
    SCALE_MODE: tl.constexpr, T_SCALE_MODE: tl.constexpr, PRECISION: tl.constexpr,
    T_PRECISION: tl.constexpr, A_IS_X: tl.constexpr, CROSS_ENTROPY: tl.constexpr, COLS: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_blocks_a = tl.cdiv(n_a, BLOCK_A)
    col_start, col_end = split_columns(pid_c, cols_per_split, n_b)
    # scales in fp32 with log2(e) folded in (scalar scales only: 0-d tensor or a float)
    s2 = load_scalar(scale_ptr, scale_value, SCALE_MODE) * LOG2E
    t2_scale = load_scalar(t_scale_ptr, t_scale_value, T_SCALE_MODE) * LOG2E
    for blk in range(pid_r, n_blocks_a, progs_a):
        if COLS:
            # The previous A block's column partials were stored by other threads of this
            # program: order those stores before this block's loads.
            tl.debug_barrier()
        a_idx, a_ok = row_indices(blk, n_a, BLOCK_A)
        m_s, l_s, m_t, l_t, w, e = _empty_states(BLOCK_A)
        # −inf on padded rows (broadcast over the tile with the column padding below)
        a_pad = tl.where(a_ok, 0.0, float("-inf"))
        for j0 in range(col_start, col_end, BLOCK_B):
            b_idx = tl.cast(j0, tl.int64) + tl.arange(0, BLOCK_B).to(tl.int64)
            b_ok = b_idx < col_end
            b_pad = tl.where(b_ok, 0.0, float("-inf"))
            # Student first: its statistics are done before the teacher's GEMM, so only the
            # finite student logits stay live across it (fewer registers: no spills at the
            # table's tiles, tests/triton_compile/test_kl_compile.py).
            acc = pair_logits(a_ptr, b_ptr, a_idx, a_ok, b_idx, b_ok, dim, stride_a0, stride_a1,
                              stride_b0, stride_b1, BLOCK_A, BLOCK_B, BLOCK_K, PRECISION, A_IS_X)
            # Padded pairs loaded zeros: their logits are exactly 0 (finite) before padding.
            s_fin = acc * s2
            st = s_fin + a_pad[:, None] + b_pad[None, :]
            tm_s, tl_s = _tile_student(st, PER_ROW)
            m_s, l_s = _merge_student(m_s, l_s, tm_s, tl_s)
            if COLS:
                # columns: merge into this program's partials (nothing to merge on its first block)
                part = tl.cast(pid_r, tl.int64) * n_b + b_idx
                cm_s, cl_s = _tile_student(st, PER_COLUMN)
                if blk != pid_r:
                    pm_s, pl_s = _load_student(b_part_ptr, b_field, part, b_ok)
                    cm_s, cl_s = _merge_student(pm_s, pl_s, cm_s, cl_s)
                _store_student(b_part_ptr, b_field, part, b_ok, cm_s, cl_s)
            acc_t = pair_logits(ta_ptr, tb_ptr, a_idx, a_ok, b_idx, b_ok, dim_t, stride_ta0, stride_ta1,
                                stride_tb0, stride_tb1, BLOCK_A, BLOCK_B, BLOCK_K, T_PRECISION, A_IS_X)
            t_fin = acc_t * t2_scale
            # T − S from the finite tiles (0 on padded pairs), teacher logits padded with −inf
            diff = t_fin - s_fin
            tt = t_fin + a_pad[:, None] + b_pad[None, :]
            tm_t, tl_t, tw, te = _tile_teacher(tt, t_fin, diff, PER_ROW, CROSS_ENTROPY)
            m_t, l_t, w, e = _merge_teacher(m_t, l_t, w, e, tm_t, tl_t, tw, te, CROSS_ENTROPY)
            if COLS:
                cm_t, cl_t, cw, ce = _tile_teacher(tt, t_fin, diff, PER_COLUMN, CROSS_ENTROPY)
                if blk != pid_r:
                    pm_t, pl_t, pw, pe = _load_teacher(b_part_ptr, b_field, part, b_ok, CROSS_ENTROPY)
                    cm_t, cl_t, cw, ce = _merge_teacher(pm_t, pl_t, pw, pe, cm_t, cl_t, cw, ce, CROSS_ENTROPY)
                _store_teacher(b_part_ptr, b_field, part, b_ok, cm_t, cl_t, cw, ce, CROSS_ENTROPY)
        if SPLIT:
            part_a = tl.cast(pid_c, tl.int64) * n_a + a_idx
            _store_student(a_part_ptr, a_field, part_a, a_ok, m_s, l_s)
            _store_teacher(a_part_ptr, a_field, part_a, a_ok, m_t, l_t, w, e, CROSS_ENTROPY)
        else:
            _store_result(a_out_ptr, a_stat_ptr, stride_stat, a_idx, a_ok, m_s, l_s, m_t, l_t, w, e,
                          CROSS_ENTROPY)


@triton.jit
def _kl_combine_kernel(part_ptr, field, parts, n, out_ptr, stat_ptr, stride_stat,
                       CROSS_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    """out[i], stats[:, i] from the ``parts`` partial states of entry i, merged in part order."""
    idx, ok = row_indices(tl.program_id(0), n, BLOCK)
    m_s, l_s, m_t, l_t, w, e = _empty_states(BLOCK)
    for p in range(0, parts):
        at = tl.cast(p, tl.int64) * n + idx
        pm_s, pl_s = _load_student(part_ptr, field, at, ok)
        pm_t, pl_t, pw, pe = _load_teacher(part_ptr, field, at, ok, CROSS_ENTROPY)
        m_s, l_s = _merge_student(m_s, l_s, pm_s, pl_s)
        m_t, l_t, w, e = _merge_teacher(m_t, l_t, w, e, pm_t, pl_t, pw, pe, CROSS_ENTROPY)
    _store_result(out_ptr, stat_ptr, stride_stat, idx, ok, m_s, l_s, m_t, l_t, w, e, CROSS_ENTROPY)


# ----------------------------------------------------------------------------- host


def operand_args(student: Pair, teacher: Pair) -> dict:
    """Keyword arguments of both KL matrix kernels: the student pair (A, B over D_s, the names
    the autotuner keys on: n_a, n_b, dim) and the teacher pair (over D_t) in one orientation,
    their scalar scales and ``tl.dot`` precisions."""
    return dict(
        a_ptr=student.a, b_ptr=student.b, n_a=student.n_a, n_b=student.n_b, dim=student.dim,
        stride_a0=student.a.stride(0), stride_a1=student.a.stride(1),
        stride_b0=student.b.stride(0), stride_b1=student.b.stride(1),
        ta_ptr=teacher.a, tb_ptr=teacher.b, dim_t=teacher.dim,
        stride_ta0=teacher.a.stride(0), stride_ta1=teacher.a.stride(1),
        stride_tb0=teacher.b.stride(0), stride_tb1=teacher.b.stride(1),
        scale_ptr=student.scale, scale_value=student.scale_value,
        t_scale_ptr=teacher.scale, t_scale_value=teacher.scale_value,
        SCALE_MODE=int(student.scale_mode), T_SCALE_MODE=int(teacher.scale_mode),
        PRECISION=dot_precision(student.a.dtype), T_PRECISION=dot_precision(teacher.a.dtype),
        A_IS_X=student.a_is_x,
    )


def _combine(part: torch.Tensor, out: torch.Tensor, stats: torch.Tensor, cross_entropy: bool) -> None:
    _, parts, n = part.shape
    t = tiles("combine", out.device, torch.float32)
    _counts.combine_launch("kl_combine", parts, n, fields=part.shape[0], out_fields=len(KLStat))
    _autotune.launch_fixed(
        _kl_combine_kernel, (triton.cdiv(n, t.block_a),),
        dict(part_ptr=part, field=part.stride(0), parts=parts, n=n, out_ptr=out, stat_ptr=stats,
             stride_stat=stats.stride(0), CROSS_ENTROPY=cross_entropy, BLOCK=t.block_a),
        t.num_warps,
    )


def kl_statistics(spec: KLSpec, rows: bool, cols: bool, cross_entropy: bool):
    """(row (N,) | (0,), col (M,) | (0,), row_stats (4, N) | (4, 0), col_stats (4, M) | (4, 0)),
    fp32: the ``similarity_kl_forward`` contract of ``mmloss.ops.torch_kl``; stats are
    ``[m_s, log2 l_s, m_t, log2 l_t]`` in log2 units (module docstring)."""
    dev = spec.x_s.device
    # Columns only: the rows of the swapped problem (no column workspace); its tiles are still
    # formed as x·yᵀ (A_IS_X False in pair_logits), so the backward reproduces them.
    student = make_pair(spec.student(), a_is_x=rows)
    teacher = make_pair(spec.teacher(), a_is_x=rows)
    want_cols = rows and cols
    fields = FIELDS_CE if cross_entropy else FIELDS_KL
    t = tiles("kl_stats", dev, table_dtype(student.a.dtype, teacher.a.dtype))
    plan = stats_plan(student.n_a, student.n_b, t.block_a, split_align(dev),
                      target_programs(dev, t.programs_per_sm))
    f32 = dict(dtype=torch.float32, device=dev)
    a_out = torch.empty(student.n_a, **f32)
    a_stats = torch.empty((len(KLStat), student.n_a), **f32)
    split = plan.splits > 1
    a_part = torch.empty((fields, plan.splits, student.n_a), **f32) if split else a_out
    b_part = torch.empty((fields, plan.progs_a, student.n_b), **f32) if want_cols else a_out
    _counts.stats_launch("kl_stats", student.n_a, student.n_b,
                         ((student.dim, student.a.element_size(), student.a.dtype),
                          (teacher.dim, teacher.a.element_size(), teacher.a.dtype)), t, plan,
                         cols=want_cols, row_fields=fields, col_fields=fields)
    _autotune.launch(
        _kl_stats_kernel, "kl_stats", t, (plan.progs_a, plan.splits),
        dict(operand_args(student, teacher),
             a_out_ptr=a_out, a_stat_ptr=a_stats, stride_stat=a_stats.stride(0),
             a_part_ptr=a_part, a_field=a_part.stride(0) if split else 0,
             b_part_ptr=b_part, b_field=b_part.stride(0) if want_cols else 0,
             progs_a=plan.progs_a, cols_per_split=plan.cols_per_split,
             CROSS_ENTROPY=cross_entropy, COLS=want_cols, SPLIT=split, BLOCK_A=t.block_a),
    )
    if split:
        _combine(a_part, a_out, a_stats, cross_entropy)
    empty, empty_stats = torch.empty(0, **f32), torch.empty((len(KLStat), 0), **f32)
    if not rows:
        return empty, a_out, empty_stats, a_stats
    if want_cols:
        b_out = torch.empty(student.n_b, **f32)
        b_stats = torch.empty((len(KLStat), student.n_b), **f32)
        _combine(b_part, b_out, b_stats, cross_entropy)
        return a_out, b_out, a_stats, b_stats
    return a_out, empty, a_stats, empty_stats
