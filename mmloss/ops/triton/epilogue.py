"""Triton kernels of the triton backend's "gemm" path (``gemm_path.py``): one fused epilogue per
block of the logit matrix, the deterministic merges of their partial statistics, and a
GEMM-shaped kernel with fp32 output (the path's GEMM where torch has no fp32-output GEMM for the
operands: under ``TRITON_INTERPRET=1``, and on CUDA builds without ``aten::mm.dtype``).

A block is rows [i0, i0 + rows) of x against columns [j0, j0 + cols) of y. Its raw products
``P = x_blk·y_blkᵀ`` arrive as an fp32 (rows, cols) matrix (never rounded to the input dtype); each
epilogue applies the scale exactly as the fused kernels do (``_common.scaled_log2``: ``t2 =
P·(s·log2 e)``), the marks (global indices: ``i0 + r``, ``j0 + c``) and its family's formula:

- ``_lse_forward_epilogue``: per-row (max, Σ2^(t2 − max)) over the program's columns into
  row partials (2, splits, rows), per-column (max, sum) over the program's rows into column
  partials (2, row_blocks, cols), log2 units, excluded pairs at −inf;
- ``_lse_backward_epilogue``: ``G = g_i·p_row + h_j·p_col`` from ``_launch.weighted_shifts``
  (global indices), written as ``s_i·G`` in the operand dtype (the scale folded in, in fp32,
  before the cast: both gradient GEMMs then need no scaled operand), and the scale-gradient
  partials ``Σ_j G_ij·P_ij = ⟨x_i, (G·y)_i⟩`` from the fp32 G (splits, rows);
- ``_sigmoid_epilogue``: per-row softplus sums, ``s_i·G`` with ``G = −z·sigmoid(−z·L)·g_i``,
  scale- and bias-gradient partials;
- ``_kl_forward_epilogue`` / ``_kl_backward_epilogue``: the same for a student block S and a
  teacher block T (``kl_forward``'s running states and merges, ``kl_backward``'s G).

Merges (``_merge_lse_kernel``, ``_merge_kl_kernel``): partials (fields, parts, n) folded in part
order into a running state (fields, n) — per row over the column blocks of a row chunk, per column
over the row chunks — so results are deterministic (no atomics). ``_finish_lse_kernel`` /
``_finish_kl_kernel`` turn states into values and the saved statistics of the fused kernels:
``[m2, lg2]`` (``lse_forward``) and ``[m_s, lg_s, m_t, lg_t]`` (``kl_forward``), log2 units.

Partials layouts follow ``kl_forward``'s ``(fields, parts, n)`` with the field stride passed as
``field``; a state is the ``parts = 1`` case.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (finite_shift, load_side_scale, load_scalar, load_weighted_shift, marked_pairs,
                      row_indices, scaled_log2, softplus_and_sigmoid, split_columns, store_stats,
                      weighted_probabilities)
from ._modes import (KL_STUDENT_MAX, KL_TEACHER_MAX, LOG2E, MARKS_NONE, MARKS_SAME_LABEL, PER_COLUMN,
                     PER_ROW, SCALE_PER_A_ROW)
from .kl_forward import (_empty_states, _load_student, _load_teacher, _merge_student, _merge_teacher,
                         _store_result, _store_student, _store_teacher, _tile_student, _tile_teacher)


# ----------------------------------------------------------------------------- tiles


@dataclass(frozen=True)
class EpilogueTiles:
    """Tiles of the epilogue kernels: ``block_r`` rows × ``block_c`` columns per step, a program
    owns one row block and one column split; ``programs_per_sm`` sizes the split count."""

    block_r: int
    block_c: int
    num_warps: int
    programs_per_sm: int = 4


@dataclass(frozen=True)
class GemmTiles:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def epilogue_tiles(device: torch.device, kl: bool = False) -> EpilogueTiles:
    """GPU (and ``meta`` tensors, which stand for one): 64×64 (32 wide for the KL kernels' two
    tiles); the interpreter (CPU tensors): 16×16 so tiny shapes cross several tiles."""
    if device.type == "cpu":
        return EpilogueTiles(16, 16, 1, 1)
    return EpilogueTiles(64, 32 if kl else 64, 8)


def gemm_tiles(device: torch.device, dtype: torch.dtype) -> GemmTiles:
    """Large output tiles pipelined over D on GPUs (Triton's matmul tutorial shapes; fp32 takes
    half the K-chunk); 16³ under the interpreter (CPU tensors)."""
    if device.type == "cpu":
        return GemmTiles(16, 16, 16, 4, 1, 1)
    if dtype == torch.float32:
        return GemmTiles(128, 128, 32, 8, 8, 3)
    return GemmTiles(128, 128, 64, 8, 8, 3)


# ----------------------------------------------------------------------------- GEMM


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, m, n, k, stride_am, stride_ak, stride_bk, stride_bn,
                 stride_cm, stride_cn, ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C (m×n, fp32) = A (m×k)·B (k×n) (+ C with ACCUMULATE), operands in their dtype into the
    MMA, fp32 accumulation; grouped tile order for L2 reuse, K streamed in BLOCK_K chunks (the
    loads of the next chunks pipelined by ``num_stages``). Any strides."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(m, BLOCK_M)
    grid_n = tl.cdiv(n, BLOCK_N)
    per_group = GROUP_M * grid_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rm = tl.cast(pid_m, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rn = tl.cast(pid_n, tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m_ok = rm < m
    n_ok = rn < n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k
        k64 = kk.to(tl.int64)
        a = tl.load(a_ptr + rm[:, None] * stride_am + k64[None, :] * stride_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + k64[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    c_at = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c_at, mask=c_mask, other=0.0)
    tl.store(c_at, acc, mask=c_mask)


def gemm_launch(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool, precision: str):
    """(grid, keyword arguments with the launch options) of ``_gemm_kernel`` for ``out (+)= a·b``."""
    m, k = a.shape
    n = b.shape[1]
    t = gemm_tiles(a.device, a.dtype)
    grid = (triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n),)
    kwargs = dict(a_ptr=a, b_ptr=b, c_ptr=out, m=m, n=n, k=k, stride_am=a.stride(0), stride_ak=a.stride(1),
                  stride_bk=b.stride(0), stride_bn=b.stride(1), stride_cm=out.stride(0), stride_cn=out.stride(1),
                  ACCUMULATE=accumulate, PRECISION=precision, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                  BLOCK_K=t.block_k, GROUP_M=t.group_m, num_warps=t.num_warps, num_stages=t.num_stages)
    return grid, kwargs


def triton_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool, precision: str) -> None:
    """``out (+)= a·b`` with the Triton GEMM: a (m×k), b (k×n) of one dtype, out (m×n) fp32 (or
    any float dtype when not accumulating: the fp32 sums are rounded once on the store)."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return
    if k == 0:
        if not accumulate:
            out.zero_()
        return
    grid, kwargs = gemm_launch(a, b, out, accumulate, precision)
    _gemm_kernel[grid](**kwargs)


# ----------------------------------------------------------------------------- shared pieces


@triton.jit
def _block_coords(rows, cols, i0, j0, cols_per_split, BLOCK_R: tl.constexpr):
    """(local row indices, their mask, global row indices, column start, column end) of this
    program: row block ``program_id(0)``, column split ``program_id(1)``."""
    r_idx, r_ok = row_indices(tl.program_id(0), rows, BLOCK_R)
    col_start, col_end = split_columns(tl.program_id(1), cols_per_split, cols)
    return r_idx, r_ok, r_idx + i0, col_start, col_end


@triton.jit
def _load_products(s_ptr, stride_s0, r_idx, r_ok, c0, col_end, j0, BLOCK_C: tl.constexpr):
    """(fp32 raw products P (BLOCK_R, BLOCK_C) — 0 outside the block —, local column indices,
    their mask, global column indices) of the tile at local column c0."""
    c_idx = tl.cast(c0, tl.int64) + tl.arange(0, BLOCK_C).to(tl.int64)
    c_ok = c_idx < col_end
    p = tl.load(s_ptr + r_idx[:, None] * stride_s0 + c_idx[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
    return p, c_idx, c_ok, c_idx + j0


@triton.jit
def _allowed(r_ok, c_ok, a_idx, b_idx, a_lab, b_lab_ptr, stride_blab, offset, MARKS: tl.constexpr,
             EXCLUDE: tl.constexpr):
    """(in-block mask, marked mask or the in-block mask when MARKS is none, allowed mask):
    allowed = in block and (not marked when EXCLUDE)."""
    valid = r_ok[:, None] & c_ok[None, :]
    if MARKS != MARKS_NONE:
        marked = marked_pairs(a_idx, b_idx, c_ok, a_lab, b_lab_ptr, stride_blab, offset, MARKS)
    else:
        marked = valid
    allowed = valid
    if EXCLUDE and MARKS != MARKS_NONE:
        allowed = valid & ~marked
    return valid, marked, allowed


@triton.jit
def _row_labels(a_lab_ptr, stride_alab, a_idx, r_ok, MARKS: tl.constexpr):
    if MARKS == MARKS_SAME_LABEL:
        a_lab = tl.load(a_lab_ptr + a_idx * stride_alab, mask=r_ok, other=0)
    else:
        a_lab = a_idx
    return a_lab


@triton.jit
def _store_scaled_grad(g_ptr, stride_g0, r_idx, c_idx, valid, g, s_a, SCALE_MODE: tl.constexpr):
    """Write s_i·G in the operand dtype (the scale folded in fp32 before the cast)."""
    if SCALE_MODE == SCALE_PER_A_ROW:
        out = g * s_a[:, None]
    else:
        out = g * s_a
    tl.store(g_ptr + r_idx[:, None] * stride_g0 + c_idx[None, :], out.to(g_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------- similarity_lse


@triton.jit
def _lse_forward_epilogue(
    s_ptr, stride_s0, rows, cols, i0, j0,
    scale_ptr, scale_value, offset, a_lab_ptr, b_lab_ptr, stride_alab, stride_blab,
    row_part_ptr, row_field, col_part_ptr, col_field, cols_per_split,
    MARKS: tl.constexpr, SCALE_MODE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r_idx, r_ok, a_idx, col_start, col_end = _block_coords(rows, cols, i0, j0, cols_per_split, BLOCK_R)
    s_a = load_side_scale(scale_ptr, scale_value, a_idx, r_ok, SCALE_MODE, SCALE_PER_A_ROW)
    a_lab = _row_labels(a_lab_ptr, stride_alab, a_idx, r_ok, MARKS)
    m_row = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_row = tl.zeros((BLOCK_R,), tl.float32)
    for c0 in range(col_start, col_end, BLOCK_C):
        p, c_idx, c_ok, b_idx = _load_products(s_ptr, stride_s0, r_idx, r_ok, c0, col_end, j0, BLOCK_C)
        t2 = scaled_log2(p, s_a, s_a, SCALE_MODE)
        valid, marked, allowed = _allowed(r_ok, c_ok, a_idx, b_idx, a_lab, b_lab_ptr, stride_blab, offset,
                                          MARKS, True)
        t2 = tl.where(allowed, t2, float("-inf"))
        if ROWS:
            m_new = tl.maximum(m_row, tl.max(t2, axis=PER_ROW))
            shift = finite_shift(m_new)
            l_row = l_row * tl.exp2(m_row - shift) + tl.sum(tl.exp2(t2 - shift[:, None]), axis=PER_ROW)
            m_row = m_new
        if COLS:
            cm = tl.max(t2, axis=PER_COLUMN)
            cl = tl.sum(tl.exp2(t2 - finite_shift(cm)[None, :]), axis=PER_COLUMN)
            at = tl.cast(tl.program_id(0), tl.int64) * cols + c_idx
            _store_student(col_part_ptr, col_field, at, c_ok, cm, cl)
    if ROWS:
        _store_student(row_part_ptr, row_field, tl.cast(tl.program_id(1), tl.int64) * rows + r_idx, r_ok,
                       m_row, l_row)


@triton.jit
def _lse_backward_epilogue(
    s_ptr, stride_s0, rows, cols, i0, j0,
    scale_ptr, scale_value, offset, a_lab_ptr, b_lab_ptr, stride_alab, stride_blab,
    a_stat_ptr, stride_astat, b_stat_ptr, stride_bstat, g_ptr, stride_g0, dscale_ptr, cols_per_split,
    MARKS: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_A_GRAD: tl.constexpr, HAS_B_GRAD: tl.constexpr,
    STORE_G: tl.constexpr, NEED_DSCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r_idx, r_ok, a_idx, col_start, col_end = _block_coords(rows, cols, i0, j0, cols_per_split, BLOCK_R)
    s_a = load_side_scale(scale_ptr, scale_value, a_idx, r_ok, SCALE_MODE, SCALE_PER_A_ROW)
    a_lab = _row_labels(a_lab_ptr, stride_alab, a_idx, r_ok, MARKS)
    if HAS_A_GRAD:
        m2_a, w_a = load_weighted_shift(a_stat_ptr, stride_astat, a_idx, r_ok)
    ds = tl.zeros((BLOCK_R,), tl.float32)
    for c0 in range(col_start, col_end, BLOCK_C):
        p, c_idx, c_ok, b_idx = _load_products(s_ptr, stride_s0, r_idx, r_ok, c0, col_end, j0, BLOCK_C)
        t2 = scaled_log2(p, s_a, s_a, SCALE_MODE)
        valid, marked, allowed = _allowed(r_ok, c_ok, a_idx, b_idx, a_lab, b_lab_ptr, stride_blab, offset,
                                          MARKS, True)
        t2 = tl.where(allowed, t2, float("-inf"))
        g = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        if HAS_A_GRAD:
            g += weighted_probabilities(t2, m2_a, w_a, PER_ROW)
        if HAS_B_GRAD:
            m2_b, w_b = load_weighted_shift(b_stat_ptr, stride_bstat, b_idx, c_ok)
            g += weighted_probabilities(t2, m2_b, w_b, PER_COLUMN)
        # excluded and padded pairs get exactly 0, also beside a NaN row (torch's pattern)
        g = tl.where(allowed, g, 0.0)
        if NEED_DSCALE:
            ds += tl.sum(g * p, axis=PER_ROW)
        if STORE_G:
            _store_scaled_grad(g_ptr, stride_g0, r_idx, c_idx, valid, g, s_a, SCALE_MODE)
    if NEED_DSCALE:
        tl.store(dscale_ptr + tl.cast(tl.program_id(1), tl.int64) * rows + r_idx, ds, mask=r_ok)


# ----------------------------------------------------------------------------- pairwise_sigmoid


@triton.jit
def _sigmoid_epilogue(
    s_ptr, stride_s0, rows, cols, i0, j0,
    scale_ptr, scale_value, bias_ptr, bias_value, offset, a_lab_ptr, b_lab_ptr, stride_alab, stride_blab,
    grad_ptr, loss_ptr, g_ptr, stride_g0, dscale_ptr, dbias_ptr, cols_per_split,
    MARKS: tl.constexpr, SCALE_MODE: tl.constexpr, BIAS_MODE: tl.constexpr, HAS_GRAD: tl.constexpr,
    WITH_LOSS: tl.constexpr, STORE_G: tl.constexpr, NEED_DSCALE: tl.constexpr, NEED_DBIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per-row softplus(−z·L) partials (splits, rows) (WITH_LOSS); s_i·G with
    G = −z·sigmoid(−z·L)·g_i (STORE_G; g_i = grad[i0 + r] with HAS_GRAD, else 1); Σ_j G_ij·P_ij
    partials (splits, rows) (NEED_DSCALE); one Σ G partial per program (NEED_DBIAS)."""
    r_idx, r_ok, a_idx, col_start, col_end = _block_coords(rows, cols, i0, j0, cols_per_split, BLOCK_R)
    s_a = load_side_scale(scale_ptr, scale_value, a_idx, r_ok, SCALE_MODE, SCALE_PER_A_ROW)
    bias2 = load_scalar(bias_ptr, bias_value, BIAS_MODE) * LOG2E
    a_lab = _row_labels(a_lab_ptr, stride_alab, a_idx, r_ok, MARKS)
    if HAS_GRAD:
        g_a = tl.load(grad_ptr + a_idx, mask=r_ok, other=0.0)
    loss_rows = tl.zeros((BLOCK_R,), tl.float32)
    ds = tl.zeros((BLOCK_R,), tl.float32)
    dbias_rows = tl.zeros((BLOCK_R,), tl.float32)
    for c0 in range(col_start, col_end, BLOCK_C):
        p, c_idx, c_ok, b_idx = _load_products(s_ptr, stride_s0, r_idx, r_ok, c0, col_end, j0, BLOCK_C)
        t2 = scaled_log2(p, s_a, s_a, SCALE_MODE)
        valid, marked, allowed = _allowed(r_ok, c_ok, a_idx, b_idx, a_lab, b_lab_ptr, stride_blab, offset,
                                          MARKS, False)
        # T = −z·L (z = +1 on marked pairs): softplus(T) is the loss, −z·sigmoid(T) = dσ/dL
        big_t2 = t2 + bias2
        if MARKS != MARKS_NONE:
            big_t2 = tl.where(marked, -big_t2, big_t2)
        sp, sig = softplus_and_sigmoid(big_t2, WITH_LOSS)
        if WITH_LOSS:
            loss_rows += tl.sum(tl.where(valid, sp, 0.0), axis=PER_ROW)
        if STORE_G or NEED_DSCALE or NEED_DBIAS:
            if MARKS != MARKS_NONE:
                sig = tl.where(marked, -sig, sig)
            if HAS_GRAD:
                sig = sig * g_a[:, None]
            g = tl.where(valid, sig, 0.0)
            if NEED_DBIAS:
                dbias_rows += tl.sum(g, axis=PER_ROW)
            if NEED_DSCALE:
                ds += tl.sum(g * p, axis=PER_ROW)
            if STORE_G:
                _store_scaled_grad(g_ptr, stride_g0, r_idx, c_idx, valid, g, s_a, SCALE_MODE)
    split_at = tl.cast(tl.program_id(1), tl.int64) * rows + r_idx
    if WITH_LOSS:
        tl.store(loss_ptr + split_at, loss_rows, mask=r_ok)
    if NEED_DSCALE:
        tl.store(dscale_ptr + split_at, ds, mask=r_ok)
    if NEED_DBIAS:
        slot = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        tl.store(dbias_ptr + slot, tl.sum(dbias_rows, axis=0))


# ----------------------------------------------------------------------------- similarity_kl


@triton.jit
def _kl_forward_epilogue(
    s_ptr, t_ptr, stride_s0, rows, cols, i0, j0,
    scale_ptr, scale_value, t_scale_ptr, t_scale_value,
    row_part_ptr, row_field, col_part_ptr, col_field, cols_per_split,
    SCALE_MODE: tl.constexpr, T_SCALE_MODE: tl.constexpr, CROSS_ENTROPY: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``kl_forward._kl_stats_kernel``'s per-tile step on a student block S and a teacher block T
    (raw fp32 products, both (rows, cols) with row stride ``stride_s0``): row states over the
    program's columns into (fields, splits, rows), column states over its rows into (fields,
    row_blocks, cols)."""
    r_idx, r_ok, a_idx, col_start, col_end = _block_coords(rows, cols, i0, j0, cols_per_split, BLOCK_R)
    s2 = load_scalar(scale_ptr, scale_value, SCALE_MODE) * LOG2E
    t2_scale = load_scalar(t_scale_ptr, t_scale_value, T_SCALE_MODE) * LOG2E
    m_s, l_s, m_t, l_t, w, e = _empty_states(BLOCK_R)
    a_pad = tl.where(r_ok, 0.0, float("-inf"))
    for c0 in range(col_start, col_end, BLOCK_C):
        p, c_idx, c_ok, b_idx = _load_products(s_ptr, stride_s0, r_idx, r_ok, c0, col_end, j0, BLOCK_C)
        b_pad = tl.where(c_ok, 0.0, float("-inf"))
        s_fin = p * s2
        st = s_fin + a_pad[:, None] + b_pad[None, :]
        at = tl.cast(tl.program_id(0), tl.int64) * cols + c_idx
        if ROWS:
            tm_s, tl_s = _tile_student(st, PER_ROW)
            m_s, l_s = _merge_student(m_s, l_s, tm_s, tl_s)
        if COLS:
            cm_s, cl_s = _tile_student(st, PER_COLUMN)
            _store_student(col_part_ptr, col_field, at, c_ok, cm_s, cl_s)
        q, c_idx, c_ok, b_idx = _load_products(t_ptr, stride_s0, r_idx, r_ok, c0, col_end, j0, BLOCK_C)
        t_fin = q * t2_scale
        diff = t_fin - s_fin
        tt = t_fin + a_pad[:, None] + b_pad[None, :]
        if ROWS:
            tm_t, tl_t, tw, te = _tile_teacher(tt, t_fin, diff, PER_ROW, CROSS_ENTROPY)
            m_t, l_t, w, e = _merge_teacher(m_t, l_t, w, e, tm_t, tl_t, tw, te, CROSS_ENTROPY)
        if COLS:
            cm_t, cl_t, cw, ce = _tile_teacher(tt, t_fin, diff, PER_COLUMN, CROSS_ENTROPY)
            _store_teacher(col_part_ptr, col_field, at, c_ok, cm_t, cl_t, cw, ce, CROSS_ENTROPY)
    if ROWS:
        at_r = tl.cast(tl.program_id(1), tl.int64) * rows + r_idx
        _store_student(row_part_ptr, row_field, at_r, r_ok, m_s, l_s)
        _store_teacher(row_part_ptr, row_field, at_r, r_ok, m_t, l_t, w, e, CROSS_ENTROPY)


@triton.jit
def _side_weights(stat_ptr, stride_stat, idx, ok, FIELD: tl.constexpr, HAS_GRAD: tl.constexpr,
                  BLOCK: tl.constexpr):
    if HAS_GRAD:
        m2, w = load_weighted_shift(stat_ptr + stride_stat * FIELD, stride_stat, idx, ok)
    else:
        m2 = tl.zeros((BLOCK,), tl.float32)
        w = m2
    return m2, w


@triton.jit
def _kl_probabilities(l2, m2_a, w_a, m2_b, w_b, HAS_A_GRAD: tl.constexpr, HAS_B_GRAD: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    if HAS_A_GRAD:
        p += weighted_probabilities(l2, m2_a, w_a, PER_ROW)
    if HAS_B_GRAD:
        p += weighted_probabilities(l2, m2_b, w_b, PER_COLUMN)
    return p


@triton.jit
def _kl_backward_epilogue(
    s_ptr, t_ptr, stride_s0, rows, cols, i0, j0,
    scale_ptr, scale_value, t_scale_ptr, t_scale_value,
    a_stat_ptr, stride_astat, b_stat_ptr, stride_bstat, g_ptr, stride_g0, dscale_ptr, cols_per_split,
    SCALE_MODE: tl.constexpr, T_SCALE_MODE: tl.constexpr, HAS_A_GRAD: tl.constexpr,
    HAS_B_GRAD: tl.constexpr, STORE_G: tl.constexpr, NEED_DSCALE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``G = g_i·(p^s − p^t) + h_j·(q^s − q^t)`` (``kl_backward``) from the (4, ·)
    ``weighted_shifts`` of the rows (global index) and columns; writes s·G in the operand dtype
    and the Σ_j G_ij·P_ij scale-gradient partials."""
    r_idx, r_ok, a_idx, col_start, col_end = _block_coords(rows, cols, i0, j0, cols_per_split, BLOCK_R)
    s_raw = load_scalar(scale_ptr, scale_value, SCALE_MODE)
    s2 = s_raw * LOG2E
    t2_scale = load_scalar(t_scale_ptr, t_scale_value, T_SCALE_MODE) * LOG2E
    m2_sa, w_sa = _side_weights(a_stat_ptr, stride_astat, a_idx, r_ok, KL_STUDENT_MAX, HAS_A_GRAD, BLOCK_R)
    m2_ta, w_ta = _side_weights(a_stat_ptr, stride_astat, a_idx, r_ok, KL_TEACHER_MAX, HAS_A_GRAD, BLOCK_R)
    ds = tl.zeros((BLOCK_R,), tl.float32)
    for c0 in range(col_start, col_end, BLOCK_C):
        p, c_idx, c_ok, b_idx = _load_products(s_ptr, stride_s0, r_idx, r_ok, c0, col_end, j0, BLOCK_C)
        valid = r_ok[:, None] & c_ok[None, :]
        m2_sb, w_sb = _side_weights(b_stat_ptr, stride_bstat, b_idx, c_ok, KL_STUDENT_MAX, HAS_B_GRAD, BLOCK_C)
        m2_tb, w_tb = _side_weights(b_stat_ptr, stride_bstat, b_idx, c_ok, KL_TEACHER_MAX, HAS_B_GRAD, BLOCK_C)
        g = _kl_probabilities(p * s2, m2_sa, w_sa, m2_sb, w_sb, HAS_A_GRAD, HAS_B_GRAD, BLOCK_R, BLOCK_C)
        q, c_idx, c_ok, b_idx = _load_products(t_ptr, stride_s0, r_idx, r_ok, c0, col_end, j0, BLOCK_C)
        g -= _kl_probabilities(q * t2_scale, m2_ta, w_ta, m2_tb, w_tb, HAS_A_GRAD, HAS_B_GRAD, BLOCK_R, BLOCK_C)
        g = tl.where(valid, g, 0.0)
        if NEED_DSCALE:
            ds += tl.sum(g * p, axis=PER_ROW)
        if STORE_G:
            tl.store(g_ptr + r_idx[:, None] * stride_g0 + c_idx[None, :],
                     (g * s_raw).to(g_ptr.dtype.element_ty), mask=valid)
    if NEED_DSCALE:
        tl.store(dscale_ptr + tl.cast(tl.program_id(1), tl.int64) * rows + r_idx, ds, mask=r_ok)


# ----------------------------------------------------------------------------- merges, finish


@triton.jit
def _merge_lse_kernel(state_ptr, state_field, part_ptr, part_field, parts, n, FIRST: tl.constexpr,
                      BLOCK: tl.constexpr):
    """state[:, i] ← merge(state[:, i], part[:, 0, i], …, part[:, parts − 1, i]) in part order;
    FIRST: the state starts empty (not read)."""
    idx, ok = row_indices(tl.program_id(0), n, BLOCK)
    if FIRST:
        m = tl.full((BLOCK,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK,), tl.float32)
    else:
        m, l = _load_student(state_ptr, state_field, idx, ok)
    for p in range(0, parts):
        pm, pl = _load_student(part_ptr, part_field, tl.cast(p, tl.int64) * n + idx, ok)
        m, l = _merge_student(m, l, pm, pl)
    _store_student(state_ptr, state_field, idx, ok, m, l)


@triton.jit
def _finish_lse_kernel(state_ptr, state_field, n, out_ptr, bias_ptr, bias_value, BIAS_MODE: tl.constexpr,
                       BLOCK: tl.constexpr):
    """In place: the (2, n) state (m2, Σ2^(t2 − m2)) becomes the saved statistics (m2, lg2);
    out = LSE + bias (``_common.store_stats``)."""
    idx, ok = row_indices(tl.program_id(0), n, BLOCK)
    m, l = _load_student(state_ptr, state_field, idx, ok)
    store_stats(out_ptr, state_ptr, state_field, idx, ok, m, l, load_scalar(bias_ptr, bias_value, BIAS_MODE))


@triton.jit
def _merge_kl_kernel(state_ptr, state_field, part_ptr, part_field, parts, n, FIRST: tl.constexpr,
                     CROSS_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    """``_merge_lse_kernel`` for the KL states (``_modes.KLPartial`` fields)."""
    idx, ok = row_indices(tl.program_id(0), n, BLOCK)
    if FIRST:
        m_s, l_s, m_t, l_t, w, e = _empty_states(BLOCK)
    else:
        m_s, l_s = _load_student(state_ptr, state_field, idx, ok)
        m_t, l_t, w, e = _load_teacher(state_ptr, state_field, idx, ok, CROSS_ENTROPY)
    for p in range(0, parts):
        at = tl.cast(p, tl.int64) * n + idx
        pm_s, pl_s = _load_student(part_ptr, part_field, at, ok)
        pm_t, pl_t, pw, pe = _load_teacher(part_ptr, part_field, at, ok, CROSS_ENTROPY)
        m_s, l_s = _merge_student(m_s, l_s, pm_s, pl_s)
        m_t, l_t, w, e = _merge_teacher(m_t, l_t, w, e, pm_t, pl_t, pw, pe, CROSS_ENTROPY)
    _store_student(state_ptr, state_field, idx, ok, m_s, l_s)
    _store_teacher(state_ptr, state_field, idx, ok, m_t, l_t, w, e, CROSS_ENTROPY)


@triton.jit
def _finish_kl_kernel(state_ptr, state_field, n, out_ptr, stat_ptr, stride_stat, CROSS_ENTROPY: tl.constexpr,
                      BLOCK: tl.constexpr):
    """The value and the saved ``[m_s, lg_s, m_t, lg_t]`` of each entry from its KL state
    (``kl_forward._store_result``)."""
    idx, ok = row_indices(tl.program_id(0), n, BLOCK)
    m_s, l_s = _load_student(state_ptr, state_field, idx, ok)
    m_t, l_t, w, e = _load_teacher(state_ptr, state_field, idx, ok, CROSS_ENTROPY)
    _store_result(out_ptr, stat_ptr, stride_stat, idx, ok, m_s, l_s, m_t, l_t, w, e, CROSS_ENTROPY)
