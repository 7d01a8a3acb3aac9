"""``similarity_kl`` on the triton backend's "gemm" path (``gemm_path.py`` for the plan, the GEMMs
and the gradient accumulation; ``epilogue.py`` for the kernels). Same math as
``mmloss.ops.torch_kl`` and the fused ``kl_forward`` / ``kl_backward``, and the fused kernels'
saved statistics ``[m_s, lg_s, m_t, lg_t]`` (log2 units).

Per block (rows [i0, i1) × columns [j0, j1)): two GEMMs with fp32 output, the student's raw
products ``P_s = x_s·y_sᵀ`` (over D_s) and the teacher's ``P_t = x_t·y_tᵀ`` (over D_t), then
- forward: one epilogue reading both, the per-row states (student max / sum, teacher max / sum /
  weighted difference [/ entropy sum]) over the block's columns and the per-column states over
  its rows, folded in block order into the running row state (over column blocks) and column
  state (over row chunks) — deterministic; values and statistics by ``kl_forward``'s finish;
- backward (student only): the same two GEMMs (the forward's plan, so both blocks are
  bit-identical), an epilogue writing ``s_s·G`` in the student dtype with
  ``G = g_i·(p^s − p^t) + h_j·(q^s − q^t)`` and the scale-gradient partials Σ G·P_s, then
  ``dx_s (+)= (s·G)·y_s`` and ``dy_s (+)= (s·G)ᵀ·x_s`` (``gemm_path.FeatureGrads``).

Cost: forward 1 + r GEMM-equivalents (r = D_t/D_s), backward 3 + r. Traffic per logit outside the
GEMMs: 16 B forward (two fp32 product blocks written and read), 16 B + 3·sizeof(G) backward.
Workspace: two fp32 product blocks and G within ``MMLOSS_GEMM_PATH_BYTES`` (default 64 MiB), the
partial states, and for half inputs the fp32 dx / dy accumulators.
"""
from __future__ import annotations

import torch

from .. import _traffic
from .._spec import KLSpec
from ._launch import fp32_vector, make_pair, weighted_shifts
from ._modes import KLPartial, KLStat
from .epilogue import _finish_kl_kernel, _kl_backward_epilogue, _kl_forward_epilogue, _merge_kl_kernel
from .gemm_path import (F32, BlockPlan, FeatureGrads, block_plan, epilogue_grid, epilogue_kwargs, launch,
                        matmul, max_epilogue_grid, merge_grid, view, MERGE_BLOCK)

FIELDS_KL = int(KLPartial.ENTROPY_SUM)
FIELDS_CE = len(KLPartial)


class _KLBlocks:
    """The plan and the student / teacher product blocks (fp32) and the gradient block of one
    call (``gemm_path.Blocks`` for two GEMMs per block)."""

    def __init__(self, spec: KLSpec, need_g: bool):
        self.spec = spec
        dev = spec.x_s.device
        self.device = dev
        self.dim = spec.x_s.shape[1]
        # Both product blocks and G count, forward and backward alike (one plan).
        self.plan: BlockPlan = block_plan(spec.n, spec.m, spec.chunk_size, 8 + spec.x_s.element_size(), dev)
        area = self.plan.rows * self.plan.cols
        self.s_buf = torch.empty(area, dtype=F32, device=dev)
        self.t_buf = torch.empty(area, dtype=F32, device=dev)
        _traffic.workspace("gemm path: student and teacher products blocks (fp32)", 2 * area * 4)
        self.g_buf = None
        if need_g:
            self.g_buf = torch.empty(area, dtype=spec.x_s.dtype, device=dev)
            _traffic.workspace("gemm path: gradient block", area * self.g_buf.element_size())

    def blocks(self):
        for ri, (i0, i1) in enumerate(self.plan.row_ranges()):
            for ci, (j0, j1) in enumerate(self.plan.col_ranges()):
                yield ri, i0, i1, ci, j0, j1

    def products(self, i0, i1, j0, j1):
        spec = self.spec
        r, c = i1 - i0, j1 - j0
        s = view(self.s_buf, r, c)
        t = view(self.t_buf, r, c)
        matmul("student products P_s = x_s·y_sᵀ", spec.x_s[i0:i1], spec.y_s[j0:j1].t(), s, False)
        matmul("teacher products P_t = x_t·y_tᵀ", spec.x_t[i0:i1], spec.y_t[j0:j1].t(), t, False)
        _traffic.transfer("logits: P_s, P_t write (GEMM)", write=8 * r * c)
        _traffic.transfer("logits: P_s, P_t read (epilogue)", read=8 * r * c)
        return s, t

    def grad_block(self, r, c):
        g = view(self.g_buf, r, c)
        _traffic.transfer("logits: G write (epilogue)", write=g.numel() * g.element_size())
        return g


def _scales(spec: KLSpec) -> dict:
    student, teacher = make_pair(spec.student(), True), make_pair(spec.teacher(), True)
    return dict(scale_ptr=student.scale, scale_value=student.scale_value, t_scale_ptr=teacher.scale,
                t_scale_value=teacher.scale_value, SCALE_MODE=int(student.scale_mode),
                T_SCALE_MODE=int(teacher.scale_mode))


def _merge(state, part, first: bool, cross_entropy: bool) -> None:
    n = state.shape[1]
    _traffic.transfer("stats: merge partials", read=part.numel() * 4 + (0 if first else state.numel() * 4),
                      write=state.numel() * 4)
    launch(_merge_kl_kernel, merge_grid(n), state_ptr=state, state_field=state.stride(0), part_ptr=part,
           part_field=part.stride(0), parts=part.shape[1], n=n, FIRST=first, CROSS_ENTROPY=cross_entropy,
           BLOCK=MERGE_BLOCK)


def _finish(state, out, stats, cross_entropy: bool) -> None:
    n = state.shape[1]
    _traffic.transfer("stats: finish", read=state.numel() * 4, write=out.numel() * 4 + stats.numel() * 4)
    launch(_finish_kl_kernel, merge_grid(n), state_ptr=state, state_field=state.stride(0), n=n, out_ptr=out,
           stat_ptr=stats, stride_stat=stats.stride(0), CROSS_ENTROPY=cross_entropy, BLOCK=MERGE_BLOCK)


def similarity_kl_forward(spec: KLSpec, rows: bool, cols: bool, cross_entropy: bool):
    """(row (N,) | (0,), col (M,) | (0,), row_stats (4, N) | (4, 0), col_stats (4, M) | (4, 0))."""
    dev = spec.x_s.device
    f32 = dict(dtype=F32, device=dev)
    fields = FIELDS_CE if cross_entropy else FIELDS_KL
    blocks = _KLBlocks(spec, need_g=False)
    plan = blocks.plan
    row_blocks_max, splits_max = max_epilogue_grid(plan, dev, kl=True)
    n_stats = len(KLStat)
    row_out = torch.empty(spec.n if rows else 0, **f32)
    row_stats = torch.empty((n_stats, spec.n if rows else 0), **f32)
    col_out = torch.empty(spec.m if cols else 0, **f32)
    col_stats = torch.empty((n_stats, spec.m if cols else 0), **f32)
    row_state = torch.empty((fields, plan.rows), **f32) if rows else None
    col_state = torch.empty((fields, spec.m), **f32) if cols else None
    row_part = torch.empty(fields * splits_max * plan.rows if rows else 1, **f32)
    col_part = torch.empty(fields * row_blocks_max * plan.cols if cols else 1, **f32)
    _traffic.workspace("gemm path: partial states", 4 * (row_part.numel() + col_part.numel()
                                                         + fields * (plan.rows * rows + spec.m * cols)))
    scales = _scales(spec)
    for ri, i0, i1, ci, j0, j1 in blocks.blocks():
        r, c = i1 - i0, j1 - j0
        s, t = blocks.products(i0, i1, j0, j1)
        eg = epilogue_grid(r, c, dev, kl=True)
        rp = view(row_part, fields, eg.splits, r) if rows else row_part
        cp = view(col_part, fields, eg.row_blocks, c) if cols else col_part
        _traffic.transfer("stats: partials write (epilogue)",
                          write=4 * fields * ((eg.splits * r if rows else 0) + (eg.row_blocks * c if cols else 0)))
        launch(_kl_forward_epilogue, eg.grid, s_ptr=s, t_ptr=t, stride_s0=s.stride(0), rows=r, cols=c,
               i0=i0, j0=j0, **scales, row_part_ptr=rp, row_field=rp.stride(0) if rows else 0,
               col_part_ptr=cp, col_field=cp.stride(0) if cols else 0, cols_per_split=eg.cols_per_split,
               CROSS_ENTROPY=cross_entropy, ROWS=rows, COLS=cols, **epilogue_kwargs(dev, kl=True))
        if rows:
            state = row_state[:, :r]
            _merge(state, rp, ci == 0, cross_entropy)
            if j1 == spec.m:
                _finish(state, row_out[i0:i1], row_stats[:, i0:i1], cross_entropy)
        if cols:
            _merge(col_state[:, j0:j1], cp, ri == 0, cross_entropy)
    if cols:
        _finish(col_state, col_out, col_stats, cross_entropy)
    return row_out, col_out, row_stats, col_stats


def _weights(stats, grad):
    """``_launch.weighted_shifts`` of the student's and the teacher's (max, log-sum) pairs, one
    call each: elementwise CPU kernels may round a value differently at another position of one
    tensor (vectorised body vs. tail), and a teacher identical to the student must get exactly
    the student's weights (KL 0, gradient exactly 0)."""
    if grad is None:
        return None
    pairs = [weighted_shifts(stats[k:k + 2], grad) for k in (KLStat.STUDENT_MAX, KLStat.TEACHER_MAX)]
    return torch.cat(pairs).contiguous()


def similarity_kl_backward(spec: KLSpec, grad_row, grad_col, row_stats, col_stats, needs):
    """(dx_s, dy_s, dscale_s) of ⟨grad_row, row⟩ + ⟨grad_col, col⟩ from the (4, ·) statistics."""
    need_x, need_y, need_scale = needs
    need_scale = need_scale and spec.scale_s is not None
    dev = spec.x_s.device
    g, h = fp32_vector(grad_row), fp32_vector(grad_col)
    wr = _weights(row_stats, g)
    wc = _weights(col_stats, h)
    dx = dy = dscale = None
    if (g is not None or h is not None) and (need_x or need_y or need_scale):
        store_g = need_x or need_y
        blocks = _KLBlocks(spec, need_g=store_g)
        grads = FeatureGrads(spec.student(), blocks.plan, need_x, need_y, need_scale)
        _, splits_max = max_epilogue_grid(blocks.plan, dev, kl=True)
        ds_part = torch.empty(splits_max * blocks.plan.rows if need_scale else 1, dtype=F32, device=dev)
        dummy = torch.empty(1, dtype=F32, device=dev)
        scales = _scales(spec)
        for ri, i0, i1, ci, j0, j1 in blocks.blocks():
            r, c = i1 - i0, j1 - j0
            s, t = blocks.products(i0, i1, j0, j1)
            eg = epilogue_grid(r, c, dev, kl=True)
            gb = blocks.grad_block(r, c) if store_g else dummy
            dsp = view(ds_part, eg.splits, r) if need_scale else ds_part
            launch(_kl_backward_epilogue, eg.grid, s_ptr=s, t_ptr=t, stride_s0=s.stride(0), rows=r, cols=c,
                   i0=i0, j0=j0, **scales, a_stat_ptr=wr if wr is not None else dummy,
                   stride_astat=wr.stride(0) if wr is not None else 0,
                   b_stat_ptr=wc if wc is not None else dummy, stride_bstat=wc.stride(0) if wc is not None else 0,
                   g_ptr=gb, stride_g0=gb.stride(0) if store_g else 0, dscale_ptr=dsp,
                   cols_per_split=eg.cols_per_split, HAS_A_GRAD=g is not None, HAS_B_GRAD=h is not None,
                   STORE_G=store_g, NEED_DSCALE=need_scale, **epilogue_kwargs(dev, kl=True))
            if store_g:
                grads.add(ri, i0, i1, ci, j0, j1, gb)
            grads.add_dscale(ci, i0, i1, dsp)
        dx, dy, ds_rows = grads.finish()
        if need_scale:
            dscale = ds_rows.sum()
    if need_x and dx is None:
        dx = torch.zeros(spec.x_s.shape, dtype=spec.x_s.dtype, device=dev)
    if need_y and dy is None:
        dy = torch.zeros(spec.y_s.shape, dtype=spec.y_s.dtype, device=dev)
    if need_scale:
        if dscale is None:
            dscale = torch.zeros((), dtype=F32, device=dev)
        dscale = dscale.to(spec.scale_s.dtype)
    return dx, dy, dscale
