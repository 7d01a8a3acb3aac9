"""``similarity_lse`` forward: row and column log-sum-exp of ``L = s·x·yᵀ + b`` from one pass
over the logit tiles (docs/kernels.md, "Forward").

Kernels:
- ``_lse_stats_kernel``: a persistent grid of ``progs_a × splits`` programs. Program (r, c) owns
  A blocks r, r + progs_a, … and streams the B columns of split c. Per tile: fp32 logits in log2
  units, marks and ragged edges set to −inf, then (ROWS) the online row max/sum merge in
  registers and (COLS) the column max/sum merged into the program's own row of a (progs_a, n_b)
  partials workspace. No fixed shift anywhere: every merge rescales by the running max, so any
  scale (1000 included) and unnormalised inputs are exact to fp32.
- ``_lse_combine_kernel``: merges the partials of each column (and of each row when the columns
  were split) in a fixed order: deterministic.

Outputs: the natural-log LSEs (bias included) and the statistics the backward reads, kept
unrounded (``_common``, "Exactness across passes"): ``stats[0]`` the max ``m2`` of
``t2 = log2(e)·s·⟨x_i, y_j⟩`` over allowed pairs (log2 units, no bias), ``stats[1]``
``lg2 = log2 Σ 2^(t2 − m2)``; (−inf, −inf) for a row / column with no allowed pair. Tiles are
always formed as x·yᵀ (``pair_logits``), also when the columns-only call swaps the problem.

Cost: one GEMM-equivalent for both directions; two exp2 per logit when both are asked (row and
column shifts differ), one otherwise. Memory: the outputs plus O(P·(N + M)) fp32 partials for
P ≤ (programs per SM) × SMs programs — 32 MiB at N = M = 32768 on an H200 (128 programs), 1 GiB
at N = M = 2²⁰ —, nothing N×M. A columns-only call runs the rows-only kernel on the swapped
problem (no column workspace).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._spec import PairSpec
from . import _autotune, _counts
from ._common import (finite_shift, load_scalar, load_side_scale, marked_pairs, pair_logits, row_indices,
                      scaled_log2, split_columns, store_stats)
from ._config import tiles
from ._launch import Pair, make_pair, split_align, stats_plan, target_programs
from ._modes import MARKS_NONE, MARKS_SAME_LABEL, PER_COLUMN, PER_ROW, SCALE_PER_A_ROW, SCALE_PER_B_ROW


@triton.jit
def _lse_stats_kernel(
    a_ptr, b_ptr, n_a, n_b, dim, stride_a0, stride_a1, stride_b0, stride_b1,
    scale_ptr, scale_value, bias_ptr, bias_value, offset, a_lab_ptr, b_lab_ptr, stride_alab, stride_blab,
    a_out_ptr, a_stat_ptr, stride_stat, a_pmax_ptr, a_psum_ptr, b_pmax_ptr, b_psum_ptr, progs_a,
    cols_per_split,
    MARKS: tl.constexpr, SCALE_MODE: tl.constexpr, BIAS_MODE: tl.constexpr, PRECISION: tl.constexpr,
    A_IS_X: tl.constexpr, COLS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_blocks_a = tl.cdiv(n_a, BLOCK_A)
    col_start, col_end = split_columns(pid_c, cols_per_split, n_b)
    bias = load_scalar(bias_ptr, bias_value, BIAS_MODE)
    for blk in range(pid_r, n_blocks_a, progs_a):
        if COLS:
            # The previous A block's column partials were stored by other threads of this
            # program: order those stores before this block's loads.
            tl.debug_barrier()
        a_idx, a_ok = row_indices(blk, n_a, BLOCK_A)
        s_a = load_side_scale(scale_ptr, scale_value, a_idx, a_ok, SCALE_MODE, SCALE_PER_A_ROW)
        if MARKS == MARKS_SAME_LABEL:
            a_lab = tl.load(a_lab_ptr + a_idx * stride_alab, mask=a_ok, other=0)
        else:
            a_lab = a_idx
        m_row = tl.full((BLOCK_A,), float("-inf"), tl.float32)
        l_row = tl.zeros((BLOCK_A,), tl.float32)
        for j0 in range(col_start, col_end, BLOCK_B):
            b_idx = tl.cast(j0, tl.int64) + tl.arange(0, BLOCK_B).to(tl.int64)
            b_ok = b_idx < col_end
            acc = pair_logits(a_ptr, b_ptr, a_idx, a_ok, b_idx, b_ok, dim, stride_a0, stride_a1,
                              stride_b0, stride_b1, BLOCK_A, BLOCK_B, BLOCK_K, PRECISION, A_IS_X)
            s_b = load_side_scale(scale_ptr, scale_value, b_idx, b_ok, SCALE_MODE, SCALE_PER_B_ROW)
            t2 = scaled_log2(acc, s_a, s_b, SCALE_MODE)
            allowed = a_ok[:, None] & b_ok[None, :]
            if MARKS != MARKS_NONE:
                allowed = allowed & ~marked_pairs(a_idx, b_idx, b_ok, a_lab, b_lab_ptr, stride_blab, offset, MARKS)
            t2 = tl.where(allowed, t2, float("-inf"))
            # rows: online max/sum in registers
            m_new = tl.maximum(m_row, tl.max(t2, axis=PER_ROW))
            shift = finite_shift(m_new)
            l_row = l_row * tl.exp2(m_row - shift) + tl.sum(tl.exp2(t2 - shift[:, None]), axis=PER_ROW)
            m_row = m_new
            if COLS:
                # columns: merge into this program's partials (nothing to merge on its first block)
                part = tl.cast(pid_r, tl.int64) * n_b + b_idx
                if blk == pid_r:
                    pm = tl.full((BLOCK_B,), float("-inf"), tl.float32)
                    pl = tl.zeros((BLOCK_B,), tl.float32)
                else:
                    pm = tl.load(b_pmax_ptr + part, mask=b_ok, other=float("-inf"))
                    pl = tl.load(b_psum_ptr + part, mask=b_ok, other=0.0)
                cm = tl.maximum(pm, tl.max(t2, axis=PER_COLUMN))
                cshift = finite_shift(cm)
                pl = pl * tl.exp2(pm - cshift) + tl.sum(tl.exp2(t2 - cshift[None, :]), axis=PER_COLUMN)
                tl.store(b_pmax_ptr + part, cm, mask=b_ok)
                tl.store(b_psum_ptr + part, pl, mask=b_ok)
        if SPLIT:
            part_a = tl.cast(pid_c, tl.int64) * n_a + a_idx
            tl.store(a_pmax_ptr + part_a, m_row, mask=a_ok)
            tl.store(a_psum_ptr + part_a, l_row, mask=a_ok)
        else:
            store_stats(a_out_ptr, a_stat_ptr, stride_stat, a_idx, a_ok, m_row, l_row, bias)


@triton.jit
def _lse_combine_kernel(pmax_ptr, psum_ptr, parts, n, out_ptr, stat_ptr, stride_stat, bias_ptr, bias_value,
                        BIAS_MODE: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = LSE and stat[:, i] = (max, log-sum) merged over ``parts`` (max, sum) partials of
    entry i, in part order."""
    idx, ok = row_indices(tl.program_id(0), n, BLOCK)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK,), tl.float32)
    for p in range(0, parts):
        at = tl.cast(p, tl.int64) * n + idx
        pm = tl.load(pmax_ptr + at, mask=ok, other=float("-inf"))
        pl = tl.load(psum_ptr + at, mask=ok, other=0.0)
        m_new = tl.maximum(m, pm)
        shift = finite_shift(m_new)
        l = l * tl.exp2(m - shift) + pl * tl.exp2(pm - shift)
        m = m_new
    bias = load_scalar(bias_ptr, bias_value, BIAS_MODE)
    store_stats(out_ptr, stat_ptr, stride_stat, idx, ok, m, l, bias)


def combine(pmax: torch.Tensor, psum: torch.Tensor, out: torch.Tensor, stats: torch.Tensor, pair: Pair) -> None:
    parts, n = pmax.shape
    t = tiles("combine", out.device, pair.a.dtype)
    _counts.combine_launch("lse_combine", parts, n, fields=2, out_fields=2)
    _autotune.launch_fixed(
        _lse_combine_kernel, (triton.cdiv(n, t.block_a),),
        dict(pmax_ptr=pmax, psum_ptr=psum, parts=parts, n=n, out_ptr=out, stat_ptr=stats,
             stride_stat=stats.stride(0), bias_ptr=pair.bias,
             bias_value=pair.bias_value, BIAS_MODE=int(pair.bias_mode), BLOCK=t.block_a),
        t.num_warps,
    )


def lse_statistics(spec: PairSpec, rows: bool, cols: bool):
    """(row LSE (N,) | (0,), column LSE (M,) | (0,), row stats (2, N) | (2, 0), column stats
    (2, M) | (2, 0)), fp32: LSEs with the bias, stats ``[m2, lg2]`` in log2 units without it."""
    dev = spec.x.device
    # Columns only: the rows of the swapped problem (no column workspace); its tiles are still
    # formed as x·yᵀ (A_IS_X False in pair_logits), so the backward reproduces them.
    pair = make_pair(spec, a_is_x=rows)
    want_cols = rows and cols
    t = tiles("stats", dev, pair.a.dtype)
    plan = stats_plan(pair.n_a, pair.n_b, t.block_a, split_align(dev), target_programs(dev, t.programs_per_sm))
    f32 = dict(dtype=torch.float32, device=dev)
    a_out = torch.empty(pair.n_a, **f32)
    a_stats = torch.empty((2, pair.n_a), **f32)
    split = plan.splits > 1
    a_pmax = torch.empty((plan.splits, pair.n_a), **f32) if split else a_out
    a_psum = torch.empty_like(a_pmax) if split else a_out
    if want_cols:
        b_pmax = torch.empty((plan.progs_a, pair.n_b), **f32)
        b_psum = torch.empty_like(b_pmax)
    else:
        b_pmax = b_psum = a_out
    _counts.stats_launch("lse_stats", pair.n_a, pair.n_b, ((pair.dim, pair.a.element_size(), pair.a.dtype),), t,
                         plan, cols=want_cols, row_fields=2, col_fields=2)
    _autotune.launch(
        _lse_stats_kernel, "stats", t, (plan.progs_a, plan.splits),
        dict(pair.args(), a_out_ptr=a_out, a_stat_ptr=a_stats, stride_stat=a_stats.stride(0),
             a_pmax_ptr=a_pmax, a_psum_ptr=a_psum, b_pmax_ptr=b_pmax, b_psum_ptr=b_psum,
             progs_a=plan.progs_a, cols_per_split=plan.cols_per_split, COLS=want_cols, SPLIT=split,
             BLOCK_A=t.block_a),
    )
    if split:
        combine(a_pmax, a_psum, a_out, a_stats, pair)
    empty, empty_stats = torch.empty(0, **f32), torch.empty((2, 0), **f32)
    if not rows:
        return empty, a_out, empty_stats, a_stats
    if want_cols:
        b_out = torch.empty(pair.n_b, **f32)
        b_stats = torch.empty((2, pair.n_b), **f32)
        combine(b_pmax, b_psum, b_out, b_stats, pair)
        return a_out, b_out, a_stats, b_stats
    return a_out, empty, a_stats, empty_stats
