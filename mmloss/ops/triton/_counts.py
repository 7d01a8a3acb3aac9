"""What each fused-kernel launch does, reported to ``mmloss.ops._traffic`` for the performance
model (``python -m mmloss.bench --model``). Every figure comes from the launch's own grid plan and
tiles (``_launch.stats_plan`` / ``owner_plan``, ``_config`` tiles), so a different plan (another
architecture, more D slices, column splits, the atomic mode) changes the counts by itself.

Outside ``_traffic.counting()`` each function returns after one check: the hot path pays nothing.

Record names: ``"<kernel>#<launch>: <detail>"`` — one launch per kernel id, so the model can take
each kernel's roofline (max of compute and traffic) separately; details starting with ``gemm``
are the traffic that feeds the tensor cores (operand tiles), everything else is epilogue traffic
(statistics, partials, outputs, atomics).

The model per launch (docs: benchmarks/README.md, "Performance model"):

- GEMMs: the logit tile ``n_a × n_b × D`` once per D slice (the owner kernels recompute it per
  slice; the KL kernels form a student and a teacher tile), plus the owner's ``G·B``
  (``n_a × W × n_b``, W the slice widths summed, padding included) and, in the atomic mode,
  ``Gᵀ·A`` (``n_b × W × n_a``). D is padded to the K-chunk, as the tensor cores see it.
- L2: every tile loads its A rows (``block_a × D``) and its B rows (``block_b × D``) again —
  the kernels keep no operand resident across tiles — plus the owner's B (and, atomic, A)
  output chunks; atomics are read-modify-writes of fp32 at L2.
- HBM: A once per pass (per D slice for the owners), B once per wave of programs that run at
  the same time (persistent grids: once per round over A blocks) — B is assumed not to stay in
  L2 between waves (pessimistic when B fits in L2) —, partial statistics and outputs once.
"""
from __future__ import annotations

import torch
import triton

from .. import _traffic
from ._config import Tiles
from ._launch import OwnerPlan, StatsPlan, target_programs

F32 = 4


def _kernel_id(name: str) -> str:
    """Count one launch and return its record prefix."""
    rec = _traffic.active()
    _traffic.launch()
    return f"{name}#{rec.launches}"


def _padded(dim: int, block_k: int) -> int:
    return triton.cdiv(dim, block_k) * block_k


def stats_launch(name: str, n_a: int, n_b: int, sources, t: Tiles, plan: StatsPlan, *, cols: bool,
                 row_fields: int, col_fields: int) -> None:
    """A persistent statistics kernel (``lse_forward`` / ``kl_forward``): ``sources`` lists the
    logit tiles formed per tile pair as (D, operand element bytes, operand dtype) — one for the
    LSE kernel, the student's and the teacher's for KL. ``row_fields`` / ``col_fields`` fp32
    values per row / column of statistics or partials."""
    if _traffic.active() is None:
        return
    kid = _kernel_id(name)
    blocks_a = triton.cdiv(n_a, t.block_a)
    tiles_b = triton.cdiv(n_b, t.block_b)
    rounds = triton.cdiv(blocks_a, plan.progs_a)
    for dim, elem, dtype in sources:
        k = _padded(dim, t.block_k)
        _traffic.gemm(f"{kid}: logit tile", n_a, n_b, k, dtype, torch.float32)
        _traffic.transfer(f"{kid}: gemm operands, A and B tiles per tile", level="l2",
                          read=blocks_a * tiles_b * (t.block_a + t.block_b) * k * elem)
        _traffic.transfer(f"{kid}: gemm operands, A once, B once per round", level="hbm",
                          read=(n_a + rounds * n_b) * dim * elem)
    if cols:
        # each (A block, B tile) merges into the program's column partials: load + store
        _traffic.transfer(f"{kid}: column partials", level="hbm",
                          read=(blocks_a - plan.progs_a) * n_b * col_fields * F32,
                          write=blocks_a * n_b * col_fields * F32)
        _traffic.workspace(f"{name}: column partials", plan.progs_a * n_b * col_fields * F32)
    if plan.splits > 1:
        _traffic.transfer(f"{kid}: row partials", level="hbm", write=plan.splits * n_a * row_fields * F32)
        _traffic.workspace(f"{name}: row partials", plan.splits * n_a * row_fields * F32)
    else:
        _traffic.transfer(f"{kid}: row statistics", level="hbm", write=n_a * (row_fields + 1) * F32)


def combine_launch(name: str, parts: int, n: int, fields: int, out_fields: int) -> None:
    """A partial-statistics combine: reads ``parts × n × fields`` fp32, writes the value and
    ``out_fields`` statistics per entry."""
    if _traffic.active() is None:
        return
    kid = _kernel_id(name)
    _traffic.transfer(f"{kid}: partials in, statistics out", level="hbm",
                      read=parts * n * fields * F32, write=n * (1 + out_fields) * F32)


def owner_launch(name: str, n_a: int, n_b: int, sources, out_dim: int, out_elem: int, t: Tiles,
                 plan: OwnerPlan, device, *, accumulate: bool, atomic: bool, store_out: bool,
                 stat_fields: int, dscale: bool = False, loss_rows: bool = False) -> None:
    """An owner kernel (``owner`` / ``kl_backward``) with grid (A blocks, D slices, column
    splits): ``sources`` as in ``stats_launch`` (each tile recomputed once per D slice);
    ``out_dim`` the D of the accumulated gradient (the student's); ``stat_fields`` fp32 values
    per streamed B row the gradient tile reads (weighted shifts, upstream gradients)."""
    if _traffic.active() is None:
        return
    kid = _kernel_id(name)
    tiles_b = triton.cdiv(n_b, t.block_b)
    programs = plan.blocks_a * plan.slices * plan.splits
    waves = triton.cdiv(programs, target_programs(device, t.programs_per_sm))
    # B re-read from HBM once per wave; a wave covers one column split of one slice
    b_reads = max(1.0, waves / plan.splits)
    for dim, elem, dtype in sources:
        k = _padded(dim, t.block_k)
        _traffic.gemm(f"{kid}: logit tile, once per D slice", n_a, n_b, k, dtype, torch.float32, times=plan.slices)
        _traffic.transfer(f"{kid}: gemm operands, A and B tiles per tile and slice", level="l2",
                          read=plan.slices * plan.blocks_a * tiles_b * (t.block_a + t.block_b) * k * elem)
        _traffic.transfer(f"{kid}: gemm operands, A per slice, B per wave", level="hbm",
                          read=int((plan.slices * n_a + b_reads * n_b) * dim * elem))
    width = plan.slices * plan.num_dv * plan.block_dv   # output columns, padding included
    dtype = sources[0][2]
    if accumulate:
        _traffic.gemm(f"{kid}: G·B", n_a, width, n_b, dtype, torch.float32)
        _traffic.transfer(f"{kid}: gemm operands, B output chunks per tile", level="l2",
                          read=plan.blocks_a * tiles_b * t.block_b * width * out_elem)
    if atomic:
        _traffic.gemm(f"{kid}: Gᵀ·A (atomic)", n_b, width, n_a, dtype, torch.float32)
        _traffic.transfer(f"{kid}: gemm operands, A output chunks per tile", level="l2",
                          read=plan.blocks_a * tiles_b * t.block_a * width * out_elem)
        _traffic.transfer(f"{kid}: fp32 atomic adds of Gᵀ·A", level="l2", atomic=True,
                          read=plan.blocks_a * n_b * width * F32, write=plan.blocks_a * n_b * width * F32)
    if stat_fields:
        _traffic.transfer(f"{kid}: streamed-row statistics per tile", level="l2",
                          read=plan.slices * plan.blocks_a * n_b * stat_fields * F32)
    if store_out:
        if plan.splits > 1:
            _traffic.transfer(f"{kid}: fp32 split partial outputs", level="hbm",
                              write=plan.splits * n_a * out_dim * F32)
            _traffic.workspace(f"{name}: split partial outputs", plan.splits * n_a * out_dim * F32)
        else:
            _traffic.transfer(f"{kid}: output rows", level="hbm", write=n_a * out_dim * out_elem)
    if dscale:
        _traffic.transfer(f"{kid}: scale-gradient partials", level="hbm",
                          write=plan.splits * plan.slices * n_a * F32)
    if loss_rows:
        _traffic.transfer(f"{kid}: per-row loss partials", level="hbm", write=plan.splits * n_a * F32)
