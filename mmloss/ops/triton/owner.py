"""Owner kernels: recompute logit tiles, form the logit-gradient tile G and accumulate one
operand's gradient ``out_a = s ∘ (G·B)`` in registers, written once (docs/kernels.md, "Backward" and
"pairwise_sigmoid"). The same kernel, by constexpr flags, is

- the row owner (A = x): dx, the scale-gradient partials ⟨x_i, (G·y)_i⟩ and, for the sigmoid,
  the bias-gradient partials and the per-row loss (the SigLIP path forms dx in its forward pass);
  with ``ATOMIC_B`` it also adds dy with fp32 atomics (the ``deterministic=False`` mode: one
  recompute instead of two);
- the column owner (A = y, B = x, the x-side per-row scale folded into G in fp32 before the
  cast): dy; for the softmax family its logit tiles are formed as x·yᵀ and transposed in
  registers (``A_IS_X`` False in ``_common.pair_logits``: one layout conversion per tile), so
  they are bit for bit the forward's;
- with nothing to accumulate, the sigmoid forward (per-row softplus sums only).

Constexpr groups (names in ``_modes``): the pair's modes (``MARKS``, ``SCALE_MODE``,
``BIAS_MODE``, ``PRECISION``, ``A_IS_X``: ``_launch.Pair.args``); the gradient-tile family
``KIND`` (``OwnerKind``); the pass flags of ``_launch.OwnerFlags`` (``HAS_A_GRAD``,
``HAS_B_GRAD``, ``STORE_OUT``, ``NEED_DSCALE``, ``ATOMIC_B``; the pass forms G·B when
``STORE_OUT or NEED_DSCALE``); the sigmoid-only outputs ``WITH_LOSS`` / ``NEED_DBIAS``; tiles.
Combinations no pass uses fail at compile time (``tl.static_assert``).

Gradient tiles: softmax family (``KIND_LSE``), ``G_ab = g_a·2^((t2_ab − m2_a) − lg2_a) +
h_b·2^((t2_ab − m2_b) − lg2_b)`` on allowed pairs from the forward's saved (max, log-sum)
statistics (``lse_forward``), with each t2 recomputed bit for bit as the forward formed it (x the
MMA's left operand, ``_common.pair_logits``; the same BLOCK_K, ``_config``): the exponent is
exact near the max at any |L|. Sigmoid family (``KIND_SIGMOID``), ``G = −z·sigmoid(−z·L)`` times
the upstream gradient of the x row (1 for the summed loss). G is cast to the input dtype as the
MMA operand; accumulation is fp32.

Large D: a program holds ``NUM_DV`` (≤ 4) fp32 accumulators of ``BLOCK_DV`` columns; wider D is
split into slices (grid axis 1), each recomputing the tile (``_launch.owner_plan``). Few A blocks:
the B columns are split (grid axis 2) into fp32 partial outputs summed by torch in a fixed order.
Cost per owner pass: (slices) recompute GEMM-equivalents + 1 for the output; memory O((N+M)·D).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _autotune, _counts
from ._common import (load_scalar, load_side_scale, load_weighted_shift, marked_pairs, owner_program,
                      pair_logits, scaled_log2, slice_accumulators, softplus_and_sigmoid, step_slices,
                      store_slices, weighted_probabilities)
from ._config import tiles
from ._launch import (OwnerFlags, OwnerOutputs, OwnerResult, Pair, atomic_pass_pays, dummy, optional, owner_plan,
                      split_align, target_programs)
from ._modes import (KIND_LSE, KIND_SIGMOID, LOG2E, MARKS_NONE, MARKS_SAME_LABEL, PER_COLUMN, PER_ROW,
                     SCALE_PER_A_ROW, SCALE_PER_B_ROW, OwnerKind)


@triton.jit
def _owner_kernel(
    a_ptr, b_ptr, n_a, n_b, dim, stride_a0, stride_a1, stride_b0, stride_b1,
    scale_ptr, scale_value, bias_ptr, bias_value, offset, a_lab_ptr, b_lab_ptr, stride_alab, stride_blab,
    a_grad_ptr, a_stat_ptr, stride_astat, b_grad_ptr, b_stat_ptr, stride_bstat,
    out_ptr, stride_oc, stride_o0, stride_o1, dscale_ptr,
    out_b_ptr, stride_ob0, stride_ob1, loss_ptr, dbias_ptr, cols_per_split, slices,
    # the pair's modes (_launch.Pair.args)
    MARKS: tl.constexpr, SCALE_MODE: tl.constexpr, BIAS_MODE: tl.constexpr, PRECISION: tl.constexpr,
    A_IS_X: tl.constexpr,
    # what the pass computes: the gradient-tile family, then _launch.OwnerFlags, then the
    # sigmoid-only per-row loss and bias-gradient partials
    KIND: tl.constexpr, HAS_A_GRAD: tl.constexpr, HAS_B_GRAD: tl.constexpr,
    STORE_OUT: tl.constexpr, NEED_DSCALE: tl.constexpr, ATOMIC_B: tl.constexpr,
    WITH_LOSS: tl.constexpr, NEED_DBIAS: tl.constexpr,
    # tiles (_config) and output chunks (_launch.owner_plan)
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr,
):
    tl.static_assert(NUM_DV >= 1 and NUM_DV <= 4, "one to four output accumulators per program")
    tl.static_assert(KIND == KIND_LSE or KIND == KIND_SIGMOID, "KIND is KIND_LSE or KIND_SIGMOID")
    tl.static_assert(KIND == KIND_SIGMOID or not (WITH_LOSS or NEED_DBIAS),
                     "loss rows and bias partials belong to the sigmoid (the softmax bias gradient needs no kernel)")
    tl.static_assert(not ATOMIC_B or ((STORE_OUT or NEED_DSCALE) and SCALE_MODE != SCALE_PER_B_ROW),
                     "ATOMIC_B runs in the row-owner pass (A = x) that accumulates dx")
    pid_a, pid_s, pid_c, a_idx, a_ok, col_start, col_end, d_start = owner_program(
        n_a, n_b, cols_per_split, BLOCK_A, BLOCK_DV, NUM_DV)
    s_a = load_side_scale(scale_ptr, scale_value, a_idx, a_ok, SCALE_MODE, SCALE_PER_A_ROW)
    bias = load_scalar(bias_ptr, bias_value, BIAS_MODE)
    if MARKS == MARKS_SAME_LABEL:
        a_lab = tl.load(a_lab_ptr + a_idx * stride_alab, mask=a_ok, other=0)
    else:
        a_lab = a_idx
    # Per-A-row inputs of the gradient tile, loaded once.
    if HAS_A_GRAD:
        if KIND == KIND_LSE:
            # (max, g·2^(−log-sum)) of the owned rows (_launch.weighted_shifts)
            m2_a, w_a = load_weighted_shift(a_stat_ptr, stride_astat, a_idx, a_ok)
        else:
            g_a = tl.load(a_grad_ptr + a_idx, mask=a_ok, other=0.0)
    acc0, acc1, acc2, acc3 = slice_accumulators(BLOCK_A, BLOCK_DV, NUM_DV)
    loss_rows = tl.zeros((BLOCK_A,), tl.float32)
    dbias_rows = tl.zeros((BLOCK_A,), tl.float32)
    for j0 in range(col_start, col_end, BLOCK_B):
        b_idx = tl.cast(j0, tl.int64) + tl.arange(0, BLOCK_B).to(tl.int64)
        b_ok = b_idx < col_end
        # softmax family: the forward's orientation (x left); the sigmoid needs no such match
        acc = pair_logits(a_ptr, b_ptr, a_idx, a_ok, b_idx, b_ok, dim, stride_a0, stride_a1, stride_b0,
                          stride_b1, BLOCK_A, BLOCK_B, BLOCK_K, PRECISION, A_IS_X or KIND == KIND_SIGMOID)
        s_b = load_side_scale(scale_ptr, scale_value, b_idx, b_ok, SCALE_MODE, SCALE_PER_B_ROW)
        t2 = scaled_log2(acc, s_a, s_b, SCALE_MODE)
        valid = a_ok[:, None] & b_ok[None, :]
        if MARKS != MARKS_NONE:
            marked = marked_pairs(a_idx, b_idx, b_ok, a_lab, b_lab_ptr, stride_blab, offset, MARKS)
        if KIND == KIND_LSE:
            allowed = valid
            if MARKS != MARKS_NONE:
                allowed = allowed & ~marked
            # excluded pairs at −inf: their probabilities are exactly 0 (and nothing overflows)
            t2 = tl.where(allowed, t2, float("-inf"))
            g = tl.zeros((BLOCK_A, BLOCK_B), tl.float32)
            if HAS_A_GRAD:
                g += weighted_probabilities(t2, m2_a, w_a, PER_ROW)
            if HAS_B_GRAD:
                m2_b, w_b = load_weighted_shift(b_stat_ptr, stride_bstat, b_idx, b_ok)
                g += weighted_probabilities(t2, m2_b, w_b, PER_COLUMN)
            # excluded and padded pairs get exactly 0, also beside a NaN row (torch's pattern)
            g = tl.where(allowed, g, 0.0)
        else:
            # T = −z·L (z = +1 on marked pairs): softplus(T) is the loss, −z·sigmoid(T) = dσ/dL
            big_t2 = t2 + bias * LOG2E
            if MARKS != MARKS_NONE:
                big_t2 = tl.where(marked, -big_t2, big_t2)
            sp, sig = softplus_and_sigmoid(big_t2, WITH_LOSS)
            if MARKS != MARKS_NONE:
                sig = tl.where(marked, -sig, sig)
            if HAS_A_GRAD:
                sig = sig * g_a[:, None]
            if HAS_B_GRAD:
                g_b = tl.load(b_grad_ptr + b_idx, mask=b_ok, other=0.0)
                sig = sig * g_b[None, :]
            g = tl.where(valid, sig, 0.0)
            if WITH_LOSS:
                loss_rows += tl.sum(tl.where(valid, sp, 0.0), axis=PER_ROW)
        if NEED_DBIAS:
            dbias_rows += tl.sum(g, axis=PER_ROW)
        if STORE_OUT or NEED_DSCALE:
            # G·B: a per-row scale of B (x, when A is y) joins G in fp32 before the cast
            if SCALE_MODE == SCALE_PER_B_ROW:
                g_op = (g * s_b[None, :]).to(b_ptr.dtype.element_ty)
            else:
                g_op = g.to(b_ptr.dtype.element_ty)
            if ATOMIC_B:
                if SCALE_MODE == SCALE_PER_A_ROW:
                    gsa_op = (g * s_a[:, None]).to(a_ptr.dtype.element_ty)
                else:
                    gsa_op = (g * s_a).to(a_ptr.dtype.element_ty)
            else:
                gsa_op = g_op
            acc0, acc1, acc2, acc3 = step_slices(
                acc0, acc1, acc2, acc3, g_op, gsa_op, b_ptr, b_idx, b_ok, a_ptr, a_idx, a_ok, out_b_ptr,
                d_start, dim, stride_a0, stride_a1, stride_b0, stride_b1, stride_ob0, stride_ob1,
                BLOCK_DV, NUM_DV, ATOMIC_B, PRECISION)
    if STORE_OUT or NEED_DSCALE:
        store_slices(acc0, acc1, acc2, acc3, a_ptr, a_idx, a_ok, out_ptr, dscale_ptr, pid_c, pid_s, slices,
                     n_a, d_start, dim, stride_a0, stride_a1, stride_oc, stride_o0, stride_o1, s_a,
                     BLOCK_A, SCALE_MODE, BLOCK_DV, NUM_DV, STORE_OUT, NEED_DSCALE)
    # Loss and bias partials: every slice computes them, slice 0 stores.
    if pid_s == 0:
        if WITH_LOSS:
            tl.store(loss_ptr + tl.cast(pid_c, tl.int64) * n_a + a_idx, loss_rows, mask=a_ok)
        if NEED_DBIAS:
            slot = tl.cast(pid_c, tl.int64) * tl.num_programs(0) + pid_a
            tl.store(dbias_ptr + slot, tl.sum(dbias_rows, axis=0))


def atomic_pays(pair: Pair) -> bool:
    """Whether the ``deterministic=False`` pass (row owner + dy by fp32 atomics) is faster than
    the two owner passes: ``_launch.atomic_pass_pays`` weighs the GEMM work both save or add
    (s_atomic recomputes + 2 GEMMs against 2·(s_owner + 1)) together with the atomic
    read-modify-write traffic of dy at the device's published bandwidth (issue 11)."""
    dev, dtype = pair.a.device, pair.a.dtype
    return atomic_pass_pays(pair.n_a, pair.n_b, pair.dim, tiles("owner", dev, dtype), tiles("atomic", dev, dtype),
                            dev, dtype)


def run_owner(pair: Pair, kind: OwnerKind, *, a_grad=None, a_stat=None, b_grad=None, b_stat=None,
              store_out: bool = False, need_dscale: bool = False, atomic_b: bool = False,
              with_loss: bool = False, need_dbias: bool = False) -> OwnerResult:
    """One owner pass over all tiles. Sigmoid family: ``a_grad``/``b_grad`` (fp32, contiguous)
    are the upstream gradients of the A / B rows. Softmax family: ``a_stat``/``b_stat`` are
    their (2, n) ``_launch.weighted_shifts`` (upstream gradient folded in) and ``a_grad`` /
    ``b_grad`` only say which sides have one. ``store_out`` … ``atomic_b``: ``_launch.OwnerFlags``;
    ``with_loss`` / ``need_dbias`` (``OwnerKind.SIGMOID`` only): the per-row softplus sums and
    the bias gradient Σ G."""
    dev = pair.a.device
    flags = OwnerFlags(a_grad is not None, b_grad is not None, store_out, need_dscale, atomic_b)
    flags.check(pair.scale_mode)
    if kind != OwnerKind.SIGMOID and (with_loss or need_dbias):
        raise AssertionError("loss rows and bias partials belong to the sigmoid owner pass")
    t = tiles("atomic" if atomic_b else "owner", dev, pair.a.dtype)
    plan = owner_plan(pair.n_a, pair.n_b, pair.dim, t, flags.accumulate, split_align(dev),
                      target_programs(dev, t.programs_per_sm))
    outputs = OwnerOutputs.allocate(flags, plan, pair.a, pair.n_b)
    f32 = dict(dtype=torch.float32, device=dev)
    loss = torch.empty((plan.splits, pair.n_a), **f32) if with_loss else dummy(dev)
    dbias = torch.empty(plan.splits * plan.blocks_a, **f32) if need_dbias else dummy(dev)
    _counts.owner_launch("owner", pair.n_a, pair.n_b, ((pair.dim, pair.a.element_size(), pair.a.dtype),),
                         pair.dim, pair.a.element_size(), t, plan, dev, accumulate=flags.accumulate,
                         atomic=atomic_b, store_out=store_out, dscale=need_dscale, loss_rows=with_loss,
                         stat_fields=2 * (b_stat is not None) + (b_grad is not None and kind == OwnerKind.SIGMOID))
    _autotune.launch(
        _owner_kernel, "atomic" if atomic_b else "owner", t, (plan.blocks_a, plan.slices, plan.splits),
        dict(pair.args(), **outputs.args(),
             a_grad_ptr=optional(a_grad, dev), a_stat_ptr=optional(a_stat, dev),
             stride_astat=a_stat.stride(0) if a_stat is not None else 0,
             b_grad_ptr=optional(b_grad, dev), b_stat_ptr=optional(b_stat, dev),
             stride_bstat=b_stat.stride(0) if b_stat is not None else 0,
             loss_ptr=loss, dbias_ptr=dbias, KIND=int(kind), WITH_LOSS=with_loss, NEED_DBIAS=need_dbias,
             BLOCK_A=t.block_a),
        atomic_target="out_b_ptr" if atomic_b else "",
    )
    result = outputs.result()
    result.loss_rows = loss.sum(dim=0) if with_loss else None
    result.dbias = dbias.sum() if need_dbias else None
    return result
