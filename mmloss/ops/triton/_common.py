"""Shared ``@triton.jit`` helpers: program coordinates, logit tiles with scale and marks, online
log-sum-exp merges, the softplus/sigmoid pair, and the output-chunk steps and epilogue of the
owner kernels.

Conventions (docs/kernels.md): a kernel sees an "A" operand (the rows it owns, ``n_a × D``) and a "B"
operand (the rows it streams, ``n_b × D``); A is x or y depending on the orientation the host
chose. Logits are handled in log2 units, ``t2 = log2(e)·s·⟨a, b⟩`` (log2(e) folded into the scale,
so every exponential is one ``exp2``), bias added where a formula needs it. All index vectors are
int64 before they meet a stride, so N·D ≥ 2³¹ is addressed correctly; every load on a ragged edge
is masked.

Exactness across passes (issue 8, item 1): the statistics the forward saves are the row /
column max ``m2`` of t2 and ``lg2 = log2 Σ 2^(t2 − m2)`` (log2 units, bias excluded), kept apart,
and every backward pass recomputes each t2 bit for bit as the forward did — x is always the
MMA's left operand (``pair_logits``: a pass that owns y rows forms the x·yᵀ tile and transposes
it in registers), the same ``BLOCK_K`` (``_config`` asserts the kinds of one table row share it)
and the same K order, the scale applied by the same ``scaled_log2``. A probability is then
``2^(t2 − m2)·2^(−lg2)``: exactly ``2^(−lg2)`` at the argmax, whatever |L| is.

NaN/Inf (issue 8, item 2): NaN propagates as in torch — whatever a max does with a NaN
(``tl.max`` ignores it on GPUs, numpy's propagates it), ``2^(NaN − shift)`` makes the sum NaN,
and the LSE, value and gradients follow; a +inf logit gives a +inf LSE (``finite_shift`` maps
±inf to 0, as ``torch.logsumexp`` does). Clamps are written with ``tl.where`` so NaN passes.

Modes (constexpr ``SCALE_MODE``, ``BIAS_MODE``, ``MARKS``) and tile axes are the named
constants of ``_modes`` (``SCALE_PER_A_ROW``, ``MARKS_SAME_LABEL``, ``PER_ROW``, ...).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._modes import (LN2, LOG2E, MARKS_DIAGONAL, PER_ROW, SCALAR_FLOAT, SCALAR_TENSOR, SCALE_PER_A_ROW,
                     SCALE_PER_B_ROW)


@triton.jit
def row_indices(block, n, BLOCK: tl.constexpr):
    """int64 indices of block ``block`` and their in-range mask."""
    idx = tl.cast(block, tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    return idx, idx < n


@triton.jit
def split_columns(pid_c, cols_per_split, n_b):
    """[start, end) of the B columns of column split ``pid_c`` (``cols_per_split`` each)."""
    col_start = pid_c * cols_per_split
    return col_start, tl.minimum(col_start + cols_per_split, n_b)


@triton.jit
def owner_program(n_a, n_b, cols_per_split, BLOCK_A: tl.constexpr, BLOCK_DV: tl.constexpr,
                  NUM_DV: tl.constexpr):
    """Where an owner-kernel program works (grid: axis 0 the owned A block, axis 1 the output
    D slice, axis 2 the column split): (pid_a, pid_s, pid_c, owned row indices and mask,
    column start and end, first output column of the slice)."""
    pid_a = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_c = tl.program_id(2)
    a_idx, a_ok = row_indices(pid_a, n_a, BLOCK_A)
    col_start, col_end = split_columns(pid_c, cols_per_split, n_b)
    d_start = pid_s * (NUM_DV * BLOCK_DV)
    return pid_a, pid_s, pid_c, a_idx, a_ok, col_start, col_end, d_start


@triton.jit
def load_scalar(ptr, value, MODE: tl.constexpr):
    """A scalar operand (the bias, a scalar scale): the Python float ``value`` (MODE
    ``SCALAR_FLOAT``) or the first element of ``ptr`` (``SCALAR_TENSOR``)."""
    if MODE == SCALAR_FLOAT:
        out = value + 0.0  # fp32 kernel argument (a Python float under the interpreter)
    else:
        out = tl.load(ptr).to(tl.float32)
    return out


@triton.jit
def load_side_scale(scale_ptr, scale_value, idx, ok, SCALE_MODE: tl.constexpr, SIDE: tl.constexpr):
    """Scale for the rows ``idx`` of one side (SIDE: ``SCALE_PER_A_ROW`` for A rows,
    ``SCALE_PER_B_ROW`` for B rows) when the scale is per row of that side, else the scalar scale
    (per-row scales of the other side return 1.0)."""
    if SCALE_MODE == SIDE:
        s = tl.load(scale_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    elif SCALE_MODE == SCALAR_FLOAT or SCALE_MODE == SCALAR_TENSOR:
        s = load_scalar(scale_ptr, scale_value, SCALE_MODE)
    else:
        s = scale_value * 0.0 + 1.0  # unused by the callers (the other side carries the scale)
    return s


@triton.jit
def logit_tile(a_ptr, b_ptr, a_idx, a_ok, b_idx, b_ok, dim, stride_a0, stride_a1, stride_b0,
               stride_b1, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
               PRECISION: tl.constexpr):
    """fp32 (BLOCK_A, BLOCK_B) tile of ⟨a_i, b_j⟩, streaming D in BLOCK_K chunks (operands in the
    input dtype into the MMA, fp32 accumulation)."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    a_rows = a_ptr + a_idx[:, None] * stride_a0
    b_rows = b_ptr + b_idx[:, None] * stride_b0
    for k0 in range(0, dim, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < dim
        k64 = k.to(tl.int64)
        a = tl.load(a_rows + k64[None, :] * stride_a1, mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_rows + k64[None, :] * stride_b1, mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def pair_logits(a_ptr, b_ptr, a_idx, a_ok, b_idx, b_ok, dim, stride_a0, stride_a1, stride_b0,
                stride_b1, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr, A_LEFT: tl.constexpr):
    """``logit_tile`` (BLOCK_A, BLOCK_B) with a chosen MMA orientation: A_LEFT True is A·Bᵀ;
    False forms the (BLOCK_B, BLOCK_A) tile B·Aᵀ and transposes it in registers. Kernels pass
    A_LEFT = "A is x", so x is always the left operand and a pass that owns y rows gets bit for
    bit the values of a pass that owns x rows (operand roles change an MMA's rounding; the
    transposition costs one layout conversion per tile)."""
    if A_LEFT:
        acc = logit_tile(a_ptr, b_ptr, a_idx, a_ok, b_idx, b_ok, dim, stride_a0, stride_a1, stride_b0,
                         stride_b1, BLOCK_A, BLOCK_B, BLOCK_K, PRECISION)
    else:
        acc = tl.trans(logit_tile(b_ptr, a_ptr, b_idx, b_ok, a_idx, a_ok, dim, stride_b0, stride_b1,
                                  stride_a0, stride_a1, BLOCK_B, BLOCK_A, BLOCK_K, PRECISION))
    return acc


@triton.jit
def scaled_log2(acc, s_a, s_b, SCALE_MODE: tl.constexpr):
    """t2 = log2(e)·s·acc with the scale of the right side, in fp32."""
    if SCALE_MODE == SCALE_PER_A_ROW:
        t2 = acc * (s_a * LOG2E)[:, None]
    elif SCALE_MODE == SCALE_PER_B_ROW:
        t2 = acc * (s_b * LOG2E)[None, :]
    else:
        t2 = acc * (s_a * LOG2E)
    return t2


@triton.jit
def marked_pairs(a_idx, b_idx, b_ok, a_lab, b_lab_ptr, stride_blab, offset, MARKS: tl.constexpr):
    """(BLOCK_A, BLOCK_B) mask of the marked pairs (MARKS ``MARKS_DIAGONAL`` or
    ``MARKS_SAME_LABEL``; ``a_lab`` preloaded)."""
    if MARKS == MARKS_DIAGONAL:
        marked = b_idx[None, :] == (a_idx[:, None] + offset)
    else:
        b_lab = tl.load(b_lab_ptr + b_idx * stride_blab, mask=b_ok, other=0)
        marked = a_lab[:, None] == b_lab[None, :]
    return marked


@triton.jit
def finite_shift(m):
    """The shift for an online sum: the running max, or 0 where it is infinite — −inf (nothing
    allowed yet: the sum stays 0) or +inf (a +inf logit: the sum becomes +inf, the LSE +inf, as
    ``torch.logsumexp`` gives). NaN stays NaN."""
    return tl.where((m == float("-inf")) | (m == float("inf")), 0.0, m)


@triton.jit
def log2_sum(l):
    """log2 of an online sum: −inf for 0 (no allowed pair), NaN stays NaN (never the −inf of an
    empty row: ``NaN > 0`` is false, so the test is ``== 0``), +inf stays +inf."""
    some = l > 0.0
    return tl.where(some, tl.log2(tl.where(some, l, 1.0)), tl.where(l == 0.0, float("-inf"), l))


@triton.jit
def lse_from_stats(m2, lg2, bias):
    """Natural-log LSE from the log2-domain max and log-sum (+ bias); −inf for a row with no
    allowed pair (lg2 −inf), NaN where either statistic is NaN, +inf for a +inf logit."""
    return tl.where(lg2 == float("-inf"), float("-inf"), (m2 + lg2) * LN2 + bias)


@triton.jit
def store_stats(out_ptr, stat_ptr, stride_stat, idx, ok, m2, l, bias):
    """Write the LSE (``out``) and the saved statistics (rows ``LseStat.MAX`` = m2 at
    ``stat_ptr``, ``LseStat.LOG_SUM`` = lg2 one ``stride_stat`` on) of the rows ``idx`` from the
    log2-domain running max and sum."""
    lg2 = log2_sum(l)
    tl.store(out_ptr + idx, lse_from_stats(m2, lg2, bias), mask=ok)
    tl.store(stat_ptr + idx, m2, mask=ok)
    tl.store(stat_ptr + stride_stat + idx, lg2, mask=ok)


@triton.jit
def load_weighted_shift(stat_ptr, stride_stat, idx, ok):
    """(m2, w) of the rows ``idx`` from ``_launch.weighted_shifts`` (its ``LseStat.MAX`` and
    ``LseStat.LOG_SUM`` slots, at ``stat_ptr`` and one ``stride_stat`` on): ``grad·p =
    w·2^(t2 − m2)``. Padded rows read (+inf, 0): probability 0."""
    m2 = tl.load(stat_ptr + idx, mask=ok, other=float("inf"))
    w = tl.load(stat_ptr + stride_stat + idx, mask=ok, other=0.0)
    return m2, w


@triton.jit
def weighted_probabilities(t2, m2, w, AXIS: tl.constexpr):
    """``w·2^(t2 − m2)`` with per-row (AXIS ``PER_ROW``: m2, w indexed by tile rows) or
    per-column (``PER_COLUMN``) weights from ``load_weighted_shift``; ``t2 − m2`` is exact near
    the max, so the argmax gets exactly ``w = grad·2^(−lg2)``."""
    if AXIS == PER_ROW:
        p = w[:, None] * tl.exp2(t2 - m2[:, None])
    else:
        p = w[None, :] * tl.exp2(t2 - m2[None, :])
    return p


@triton.jit
def log1p_unit(u):
    """log(1 + u) for u in [0, 1] with relative accuracy everywhere (no log1p in Triton):
    a six-term series below 1/32 (truncation < u⁷/7), log2(1 + u)·ln 2 above."""
    series = u * (1.0 + u * (-0.5 + u * (0.3333333333333333 + u * (-0.25 + u * (0.2 - u * 0.16666666666666666)))))
    direct = tl.log2(1.0 + u) * LN2
    return tl.where(u < 0.03125, series, direct)


@triton.jit
def softplus_and_sigmoid(T2, WITH_LOSS: tl.constexpr):
    """For T = T2·ln 2: (softplus(T), sigmoid(T)) sharing one exp2; softplus is 0 unless
    WITH_LOSS (then one log2 more)."""
    u = tl.exp2(-tl.abs(T2))
    inv = 1.0 / (1.0 + u)
    sig = tl.where(T2 >= 0.0, inv, u * inv)
    if WITH_LOSS:
        sp = tl.maximum(T2, 0.0) * LN2 + log1p_unit(u)
    else:
        sp = sig * 0.0
    return sp, sig


@triton.jit
def chunk_step(acc, g_op, gsa_op, b_ptr, b_idx, b_ok, a_ptr, a_idx, a_ok, out_b_ptr, d0, dim,
               stride_a0, stride_a1, stride_b0, stride_b1, stride_ob0, stride_ob1,
               BLOCK_DV: tl.constexpr, ATOMIC_B: tl.constexpr, PRECISION: tl.constexpr):
    """One output D-chunk [d0, d0+BLOCK_DV) of an owner kernel for one logit tile:
    acc += G·B[:, chunk] (G already in the operand dtype); with ATOMIC_B also
    out_b[:, chunk] += (G∘s_a)ᵀ·A[:, chunk] with fp32 atomics (the fast, non-deterministic mode)."""
    dv = d0 + tl.arange(0, BLOCK_DV)
    dv_ok = dv < dim
    dv64 = dv.to(tl.int64)
    b_chunk = tl.load(b_ptr + b_idx[:, None] * stride_b0 + dv64[None, :] * stride_b1,
                      mask=b_ok[:, None] & dv_ok[None, :], other=0.0)
    acc = tl.dot(g_op, b_chunk, acc, input_precision=PRECISION)
    if ATOMIC_B:
        a_chunk = tl.load(a_ptr + a_idx[:, None] * stride_a0 + dv64[None, :] * stride_a1,
                          mask=a_ok[:, None] & dv_ok[None, :], other=0.0)
        upd = tl.dot(tl.trans(gsa_op), a_chunk, input_precision=PRECISION)
        tl.atomic_add(out_b_ptr + b_idx[:, None] * stride_ob0 + dv64[None, :] * stride_ob1, upd,
                      mask=b_ok[:, None] & dv_ok[None, :], sem="relaxed")
    return acc


@triton.jit
def chunk_finish(acc, ds, a_ptr, a_idx, a_ok, out_ptr, d0, dim, stride_a0, stride_a1,
                 stride_o0, stride_o1, s_a, SCALE_MODE: tl.constexpr, BLOCK_DV: tl.constexpr,
                 STORE_OUT: tl.constexpr, NEED_DSCALE: tl.constexpr):
    """Epilogue of one accumulator chunk: ds += ⟨a_i, acc_i⟩ over the chunk (the scale gradient
    before the scale is applied, so s = 0 works), then store s_a·acc (the B-side per-row scale
    was folded into G before the MMA)."""
    dv = d0 + tl.arange(0, BLOCK_DV)
    dv_ok = dv < dim
    dv64 = dv.to(tl.int64)
    mask = a_ok[:, None] & dv_ok[None, :]
    if NEED_DSCALE:
        a_chunk = tl.load(a_ptr + a_idx[:, None] * stride_a0 + dv64[None, :] * stride_a1,
                          mask=mask, other=0.0).to(tl.float32)
        ds += tl.sum(a_chunk * acc, axis=1)
    if STORE_OUT:
        if SCALE_MODE == SCALE_PER_A_ROW:
            out = acc * s_a[:, None]
        elif SCALE_MODE == SCALE_PER_B_ROW:
            out = acc
        else:
            out = acc * s_a
        tl.store(out_ptr + a_idx[:, None] * stride_o0 + dv64[None, :] * stride_o1,
                 out.to(out_ptr.dtype.element_ty), mask=mask)
    return ds


@triton.jit
def slice_accumulators(BLOCK_A: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr):
    """fp32 accumulators of an owner kernel's NUM_DV (≤ 4) output D-slices; unused ones are 1×1
    placeholders that step_slices / finish_slices never touch."""
    acc0 = tl.zeros((BLOCK_A, BLOCK_DV), tl.float32)
    if NUM_DV > 1:
        acc1 = tl.zeros((BLOCK_A, BLOCK_DV), tl.float32)
    else:
        acc1 = tl.zeros((1, 1), tl.float32)
    if NUM_DV > 2:
        acc2 = tl.zeros((BLOCK_A, BLOCK_DV), tl.float32)
    else:
        acc2 = tl.zeros((1, 1), tl.float32)
    if NUM_DV > 3:
        acc3 = tl.zeros((BLOCK_A, BLOCK_DV), tl.float32)
    else:
        acc3 = tl.zeros((1, 1), tl.float32)
    return acc0, acc1, acc2, acc3


@triton.jit
def step_slices(acc0, acc1, acc2, acc3, g_op, gsa_op, b_ptr, b_idx, b_ok, a_ptr, a_idx, a_ok, out_b_ptr,
                d_start, dim, stride_a0, stride_a1, stride_b0, stride_b1, stride_ob0, stride_ob1,
                BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr, ATOMIC_B: tl.constexpr,
                PRECISION: tl.constexpr):
    """chunk_step for each of the NUM_DV consecutive D-slices starting at d_start."""
    acc0 = chunk_step(acc0, g_op, gsa_op, b_ptr, b_idx, b_ok, a_ptr, a_idx, a_ok, out_b_ptr, d_start,
                      dim, stride_a0, stride_a1, stride_b0, stride_b1, stride_ob0, stride_ob1,
                      BLOCK_DV, ATOMIC_B, PRECISION)
    if NUM_DV > 1:
        acc1 = chunk_step(acc1, g_op, gsa_op, b_ptr, b_idx, b_ok, a_ptr, a_idx, a_ok, out_b_ptr,
                          d_start + BLOCK_DV, dim, stride_a0, stride_a1, stride_b0, stride_b1,
                          stride_ob0, stride_ob1, BLOCK_DV, ATOMIC_B, PRECISION)
    if NUM_DV > 2:
        acc2 = chunk_step(acc2, g_op, gsa_op, b_ptr, b_idx, b_ok, a_ptr, a_idx, a_ok, out_b_ptr,
                          d_start + 2 * BLOCK_DV, dim, stride_a0, stride_a1, stride_b0, stride_b1,
                          stride_ob0, stride_ob1, BLOCK_DV, ATOMIC_B, PRECISION)
    if NUM_DV > 3:
        acc3 = chunk_step(acc3, g_op, gsa_op, b_ptr, b_idx, b_ok, a_ptr, a_idx, a_ok, out_b_ptr,
                          d_start + 3 * BLOCK_DV, dim, stride_a0, stride_a1, stride_b0, stride_b1,
                          stride_ob0, stride_ob1, BLOCK_DV, ATOMIC_B, PRECISION)
    return acc0, acc1, acc2, acc3


@triton.jit
def finish_slices(acc0, acc1, acc2, acc3, a_ptr, a_idx, a_ok, out_ptr, d_start, dim, stride_a0,
                  stride_a1, stride_o0, stride_o1, s_a, BLOCK_A: tl.constexpr,
                  SCALE_MODE: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr,
                  STORE_OUT: tl.constexpr, NEED_DSCALE: tl.constexpr):
    """chunk_finish for each D-slice; returns the rows' scale-gradient partial Σ ⟨a_i, acc_i⟩."""
    ds = tl.zeros((BLOCK_A,), tl.float32)
    ds = chunk_finish(acc0, ds, a_ptr, a_idx, a_ok, out_ptr, d_start, dim, stride_a0, stride_a1,
                      stride_o0, stride_o1, s_a, SCALE_MODE, BLOCK_DV, STORE_OUT, NEED_DSCALE)
    if NUM_DV > 1:
        ds = chunk_finish(acc1, ds, a_ptr, a_idx, a_ok, out_ptr, d_start + BLOCK_DV, dim, stride_a0,
                          stride_a1, stride_o0, stride_o1, s_a, SCALE_MODE, BLOCK_DV, STORE_OUT,
                          NEED_DSCALE)
    if NUM_DV > 2:
        ds = chunk_finish(acc2, ds, a_ptr, a_idx, a_ok, out_ptr, d_start + 2 * BLOCK_DV, dim,
                          stride_a0, stride_a1, stride_o0, stride_o1, s_a, SCALE_MODE, BLOCK_DV,
                          STORE_OUT, NEED_DSCALE)
    if NUM_DV > 3:
        ds = chunk_finish(acc3, ds, a_ptr, a_idx, a_ok, out_ptr, d_start + 3 * BLOCK_DV, dim,
                          stride_a0, stride_a1, stride_o0, stride_o1, s_a, SCALE_MODE, BLOCK_DV,
                          STORE_OUT, NEED_DSCALE)
    return ds


@triton.jit
def store_slices(acc0, acc1, acc2, acc3, a_ptr, a_idx, a_ok, out_ptr, dscale_ptr, pid_c, pid_s, slices,
                 n_a, d_start, dim, stride_a0, stride_a1, stride_oc, stride_o0, stride_o1, s_a,
                 BLOCK_A: tl.constexpr, SCALE_MODE: tl.constexpr, BLOCK_DV: tl.constexpr,
                 NUM_DV: tl.constexpr, STORE_OUT: tl.constexpr, NEED_DSCALE: tl.constexpr):
    """An owner program's epilogue: its D slice of ``s_a ∘ acc`` into column split ``pid_c`` of
    ``out`` (STORE_OUT) and its scale-gradient partials into row ``pid_c·slices + pid_s`` of
    the (splits·slices, n_a) ``dscale`` (NEED_DSCALE)."""
    out_c = out_ptr + tl.cast(pid_c, tl.int64) * stride_oc
    ds = finish_slices(acc0, acc1, acc2, acc3, a_ptr, a_idx, a_ok, out_c, d_start, dim,
                       stride_a0, stride_a1, stride_o0, stride_o1, s_a, BLOCK_A, SCALE_MODE,
                       BLOCK_DV, NUM_DV, STORE_OUT, NEED_DSCALE)
    if NEED_DSCALE:
        part = tl.cast(pid_c * slices + pid_s, tl.int64) * n_a + a_idx
        tl.store(dscale_ptr + part, ds, mask=a_ok)
