"""The triton backend's "gemm" path (``_path.choose_path``): ``similarity_lse`` and
``pairwise_sigmoid`` from blocks of the logit matrix computed by a GEMM with fp32 output, each
consumed by one fused Triton epilogue (``epilogue.py``), gradients applied by two more GEMMs per
block and accumulated in fp32. ``gemm_path_kl.py`` does the same for ``similarity_kl``. Same
math and the same mark / label / offset / per-row-scale / bias semantics as
``mmloss.ops.torch_chunked`` and the fused kernels; same saved statistics as the fused kernels
(``[m2, lg2]``, log2 units, ``lse_forward``), so ``merge_lse_stats`` and ``mmloss.ring`` work
whichever path ran.

Blocks. The logit matrix is cut into row chunks of ``rows`` and column blocks of ``cols``
(``BlockPlan``): ``spec.chunk_size`` for both when > 0, else a near-square block whose workspace
(fp32 products + the gradient block G in the operand dtype) fits ``MMLOSS_GEMM_PATH_BYTES``
(default 64 MiB), multiples of 128 rows / columns. Square blocks keep the fp32 accumulators'
traffic (dx across column blocks, dy across row chunks: 8·D·(1/rows + 1/cols) bytes per logit)
small. The backward replays the forward's plan, so every product block is recomputed by the same
GEMM call on the same operands: bit-identical, and the saved maxima are exact against it.

GEMMs (``matmul``, ``gemm_engine``): CUDA, fp16/bf16 operands: ``torch.mm`` / ``torch.addmm``
with ``out_dtype=torch.float32`` (cuBLAS, fp32 accumulation and output; probed once per device),
or where that overload is missing the Triton GEMM (``epilogue._gemm_kernel``, with
``_launch.dot_precision``). CUDA fp32: plain ``torch.mm`` / ``addmm``, which follow torch's fp32
matmul precision (TF32 or exact). CPU tensors (``TRITON_INTERPRET=1``; ``aten::mm.dtype`` has no
CPU kernel): the operands upcast to fp32 and ``torch.mm`` (exact products of half inputs, fp32
sums); the Triton GEMM is run under the interpreter by the tests. Logits are never rounded to
the input dtype: the products block is fp32 and the epilogue applies the scale
(``t2 = P·s·log2 e``, as the fused kernels do).

Per block (rows r × cols c, feature width D):
- forward: P = x_blk·y_blkᵀ (GEMM), the epilogue's row / column partial statistics, merged in
  block order into the running row state (over column blocks) and column state (over row chunks)
  — deterministic, no atomics;
- backward: P again, the epilogue writes ``s_i·G`` in the operand dtype (fp32 for fp32 inputs)
  and the scale-gradient partials Σ_j G_ij·P_ij = ⟨x_i, (G·y)_i⟩ from the fp32 G; then
  ``dx_blk (+)= (s·G)·y_blk`` and ``dy_blk (+)= (s·G)ᵀ·x_blk``, fp32 accumulation (written once
  in the input dtype when a single block spans the other dimension);
- ``pairwise_sigmoid_sum``: the loss and G in one epilogue, so 3 GEMM-equivalents in all.

Cost: CLIP forward + backward 4 GEMM-equivalents (2·N·M·D FLOPs each), the SigLIP sum 3.
Memory traffic per logit outside the GEMMs' operand reads ("logits:" transfers of
``_traffic``): forward 8 B (fp32 P written by the GEMM, read by the epilogue), backward 8 B +
3·sizeof(G) (G written once, read by each gradient GEMM) — 22 B for bf16 CLIP; the partial
statistics add about 16/64 B; the fp32 accumulators of dx, dy and the GEMMs' operand reads are
reported separately ("accumulators:", "operands:"). Workspace: the P and G blocks (≤ the budget),
partials O(rows + cols), an fp32 (M, D) dy accumulator and (rows, D) dx accumulator for
half inputs (none for fp32: gradients accumulate in place). At N = M = 32768, D = 768, bf16:
64 MiB + 96 MiB + 10 MiB.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from .. import _traffic
from .._spec import PairSpec
from ..torch_chunked import _parse_bytes
from ._launch import Pair, dot_precision, fp32_vector, make_pair, target_programs, weighted_shifts
from .epilogue import (_finish_lse_kernel, _lse_backward_epilogue, _lse_forward_epilogue, _merge_lse_kernel,
                       _sigmoid_epilogue, epilogue_tiles, triton_gemm)
from .lse_backward import _bias_weights

F32 = torch.float32
BYTES_ENV = "MMLOSS_GEMM_PATH_BYTES"
DEFAULT_BYTES = 64 << 20
# Block edges from the budget are multiples of this (GEMM tiles) on GPUs; a dimension shorter than
# one block is taken whole.
ALIGN = 128
# SMs of the GPU that ``meta`` tensors stand for (the counted / compile-only runs at N = M = 32768).
META_SMS = 132
# Statistics merge / finish kernels: entries per program.
MERGE_BLOCK = 256


# ----------------------------------------------------------------------------- plan


def budget_bytes() -> int:
    """The workspace budget of the product and gradient blocks: ``MMLOSS_GEMM_PATH_BYTES`` (e.g.
    "128MiB"), default 64 MiB."""
    env = os.environ.get(BYTES_ENV)
    if not env:
        return DEFAULT_BYTES
    try:
        value = _parse_bytes(env)
    except ValueError:
        raise ValueError(f"{BYTES_ENV} must be a byte count such as 64MiB, got {env!r}") from None
    if value <= 0:
        raise ValueError(f"{BYTES_ENV} must be positive, got {env!r}")
    return value


@dataclass(frozen=True)
class BlockPlan:
    """Row chunks of ``rows`` and column blocks of ``cols`` over an n × m logit matrix."""

    n: int
    m: int
    rows: int
    cols: int

    def row_ranges(self):
        return [(i0, min(self.n, i0 + self.rows)) for i0 in range(0, self.n, self.rows)]

    def col_ranges(self):
        return [(j0, min(self.m, j0 + self.cols)) for j0 in range(0, self.m, self.cols)]


def _edge(length: int, want: int, align: int) -> int:
    """A block edge ≤ ``want``: the whole dimension when it fits, else a multiple of ``align``."""
    if want >= length:
        return length
    return max(min(align, length), want // align * align)


def block_plan(n: int, m: int, chunk_size: int, bytes_per_logit: int, device: torch.device) -> BlockPlan:
    """``chunk_size`` rows and columns when > 0; else the near-square block whose
    ``bytes_per_logit`` workspace fits ``budget_bytes()``, edges multiples of 128 (GEMM tiles;
    any size on CPU tensors, so a small budget cuts the interpreter's tiny problems unevenly)."""
    n1, m1 = max(n, 1), max(m, 1)
    if chunk_size > 0:
        return BlockPlan(n, m, min(chunk_size, n1), min(chunk_size, m1))
    align = 1 if device.type == "cpu" else ALIGN
    area = max(1, budget_bytes() // bytes_per_logit)
    side = math.isqrt(area)
    if n1 <= side:
        rows = n1
        cols = _edge(m1, area // rows, align)
    elif m1 <= side:
        cols = m1
        rows = _edge(n1, area // cols, align)
    else:
        rows = cols = _edge(min(n1, m1), side, align)
    return BlockPlan(n, m, rows, cols)


# ----------------------------------------------------------------------------- GEMM


def executing(device: torch.device) -> bool:
    """Whether kernels run: not on ``meta`` tensors, not under ``_traffic.counting(execute=False)``."""
    return device.type != "meta" and _traffic.launches_enabled()


@functools.lru_cache(maxsize=None)
def _vendor_fp32_out(device_index: int, dtype: torch.dtype) -> bool:
    """Whether torch has cuBLAS GEMMs with fp32 output for ``dtype`` operands on this device
    (``aten::mm.dtype_out`` / ``addmm.dtype_out``, accumulating in place; CUDA builds of recent
    torch). Probed once per device and dtype by calling both on 2×2 tensors; nothing is read
    back (no host synchronisation)."""
    dev = torch.device("cuda", device_index)
    try:
        a = torch.ones((2, 2), dtype=dtype, device=dev)
        out = torch.empty((2, 2), dtype=F32, device=dev)
        torch.mm(a, a, out_dtype=F32, out=out)
        torch.addmm(out, a, a, out_dtype=F32, out=out)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def gemm_engine(device: torch.device, dtype: torch.dtype) -> str:
    """How ``matmul`` multiplies on this device: "torch" (cuBLAS through torch.mm / addmm, fp32
    output), "triton" (``epilogue._gemm_kernel``: CUDA without the fp32-output overload) or
    "upcast" (CPU tensors, the interpreter's stand-in: both operands converted to fp32 and
    ``torch.mm`` — exact products of half inputs summed in fp32, what the tensor cores do; the
    Triton GEMM runs under the interpreter in the tests instead of in every call, which would
    dominate the interpreter's time)."""
    if device.type != "cuda":
        return "upcast"
    if dtype == F32:
        return "torch"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return "torch" if _vendor_fp32_out(index, dtype) else "triton"


def matmul(what: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool,
           a_counted: bool = False) -> None:
    """``out (+)= a·b``: a (r×k), b (k×c) of one dtype; out (r×c) fp32, or the operand dtype when
    not accumulating (fp32 accumulation inside, one rounding). Counted in ``_traffic``: the GEMM
    and its feature-operand reads ("operands:"; ``a_counted``: a is a gradient block whose reads
    the caller counts as "logits:"); the caller counts what it does with ``out``."""
    r, k = a.shape
    c = b.shape[1]
    _traffic.gemm(what, r, c, k, a.dtype, out.dtype)
    _traffic.launch()
    _traffic.transfer(f"operands: {what}", read=((0 if a_counted else r * k) + k * c) * a.element_size())
    if not executing(out.device):
        return
    engine = gemm_engine(a.device, a.dtype)
    if engine == "triton":
        triton_gemm(a, b, out, accumulate, dot_precision(a.dtype))
    elif engine == "upcast":
        prod = torch.mm(a.to(F32), b.to(F32))
        out.add_(prod) if accumulate else out.copy_(prod)
    elif out.dtype == a.dtype:
        torch.addmm(out, a, b, out=out) if accumulate else torch.mm(a, b, out=out)
    elif accumulate:
        torch.addmm(out, a, b, out_dtype=F32, out=out)
    else:
        torch.mm(a, b, out_dtype=F32, out=out)


def _count_accumulator(what: str, out: torch.Tensor, accumulate: bool) -> None:
    nbytes = out.numel() * out.element_size()
    _traffic.transfer(f"accumulators: {what}", read=nbytes if accumulate else 0, write=nbytes)


# ----------------------------------------------------------------------------- grids


@dataclass(frozen=True)
class EpilogueGrid:
    """(row blocks, column splits) of one block's epilogue launch."""

    row_blocks: int
    splits: int
    cols_per_split: int

    @property
    def grid(self):
        return (self.row_blocks, self.splits)

    @property
    def programs(self) -> int:
        return self.row_blocks * self.splits


def epilogue_grid(rows: int, cols: int, device: torch.device, kl: bool = False) -> EpilogueGrid:
    """Row blocks of ``block_r`` and enough column splits (whole ``block_c`` tiles each) to give
    the device ``programs_per_sm`` programs per SM."""
    t = epilogue_tiles(device, kl)
    row_blocks = triton.cdiv(max(rows, 1), t.block_r)
    tiles_c = triton.cdiv(max(cols, 1), t.block_c)
    if device.type == "cuda":
        want = target_programs(device, t.programs_per_sm)
    else:  # meta tensors stand for an H100 (132 SMs); the interpreter pretends to have 3 programs
        want = META_SMS * t.programs_per_sm if device.type == "meta" else 3
    splits = max(1, min(tiles_c, triton.cdiv(want, row_blocks)))
    per_split = triton.cdiv(tiles_c, splits)
    splits = triton.cdiv(tiles_c, per_split)
    return EpilogueGrid(row_blocks, splits, per_split * t.block_c)


def max_epilogue_grid(plan: BlockPlan, device: torch.device, kl: bool = False) -> tuple[int, int]:
    """(most row blocks, most splits) any block of ``plan`` launches: partials buffers' sizes."""
    row_ranges = plan.row_ranges() or [(0, 0)]
    col_ranges = plan.col_ranges() or [(0, 0)]
    grids = [epilogue_grid(i1 - i0, j1 - j0, device, kl)
             for i0, i1 in row_ranges[-1:] + row_ranges[:1]
             for j0, j1 in col_ranges[-1:] + col_ranges[:1]]
    return max(g.row_blocks for g in grids), max(g.splits for g in grids)


def epilogue_kwargs(device: torch.device, kl: bool = False) -> dict:
    t = epilogue_tiles(device, kl)
    return dict(BLOCK_R=t.block_r, BLOCK_C=t.block_c, num_warps=t.num_warps)


def launch(kernel, grid, **kwargs) -> None:
    """One counted kernel launch (skipped when not executing)."""
    _traffic.launch()
    device = next(v.device for v in kwargs.values() if isinstance(v, torch.Tensor))
    if executing(device):
        kernel[grid](**kwargs)


def merge_grid(n: int):
    return (triton.cdiv(max(n, 1), MERGE_BLOCK),)


def view(buf: torch.Tensor, *shape: int) -> torch.Tensor:
    """A contiguous view of the first prod(shape) elements of a flat buffer."""
    return buf[: math.prod(shape)].view(*shape)


def pair_kwargs(pair: Pair) -> dict:
    """The x-rows pair's scale, marks and labels as the epilogues take them."""
    return dict(scale_ptr=pair.scale, scale_value=pair.scale_value, offset=pair.offset,
                a_lab_ptr=pair.a_labels, b_lab_ptr=pair.b_labels, stride_alab=pair.a_labels.stride(0),
                stride_blab=pair.b_labels.stride(0), MARKS=int(pair.marks), SCALE_MODE=int(pair.scale_mode))


class Blocks:
    """The plan, the products block P (fp32) and the gradient block G of one call, and the
    forward GEMM of each block."""

    def __init__(self, spec: PairSpec, grad_dtype: torch.dtype, need_g: bool):
        self.spec = spec
        dev = spec.x.device
        self.device = dev
        self.dim = spec.x.shape[1]
        # The plan's workspace always counts G, so forward and backward cut the same blocks.
        self.plan = block_plan(spec.n, spec.m, spec.chunk_size, 4 + spec.x.element_size(), dev)
        area = self.plan.rows * self.plan.cols
        self.p_buf = torch.empty(area, dtype=F32, device=dev)
        _traffic.workspace("gemm path: products block (fp32)", area * 4)
        self.g_buf = None
        if need_g:
            self.g_buf = torch.empty(area, dtype=grad_dtype, device=dev)
            _traffic.workspace("gemm path: gradient block", area * self.g_buf.element_size())

    def blocks(self):
        """(row chunk index, i0, i1, column block index, j0, j1) in the fixed order."""
        for ri, (i0, i1) in enumerate(self.plan.row_ranges()):
            for ci, (j0, j1) in enumerate(self.plan.col_ranges()):
                yield ri, i0, i1, ci, j0, j1

    def products(self, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        """P = x[i0:i1]·y[j0:j1]ᵀ (fp32), written by the GEMM ("logits:" write counted)."""
        r, c = i1 - i0, j1 - j0
        p = view(self.p_buf, r, c)
        matmul("products P = x·yᵀ", self.spec.x[i0:i1], self.spec.y[j0:j1].t(), p, False)
        _traffic.transfer("logits: P write (GEMM)", write=4 * r * c)
        _traffic.transfer("logits: P read (epilogue)", read=4 * r * c)
        return p

    def grad_block(self, r: int, c: int) -> torch.Tensor:
        g = view(self.g_buf, r, c)
        _traffic.transfer("logits: G write (epilogue)", write=g.numel() * g.element_size())
        return g


class FeatureGrads:
    """dx, dy (and the per-row scale-gradient sums) from gradient blocks s·G: ``dx (+)= (s·G)·y``,
    ``dy (+)= (s·G)ᵀ·x`` with fp32 accumulation across blocks; the output is written once in the
    input dtype when a single block spans the summed dimension (or accumulated in place for fp32
    / ``keep_fp32``)."""

    def __init__(self, spec: PairSpec, plan: BlockPlan, need_x: bool, need_y: bool, need_scale: bool,
                 keep_fp32: bool = False):
        dev, d = spec.x.device, spec.x.shape[1]
        self.spec, self.dim, self.need_x, self.need_y = spec, d, need_x, need_y
        self.one_col_block = plan.cols >= spec.m
        self.one_row_chunk = plan.rows >= spec.n
        dx_dtype = F32 if keep_fp32 else spec.x.dtype
        dy_dtype = F32 if keep_fp32 else spec.y.dtype
        self.dx = torch.empty((spec.n, d), dtype=dx_dtype, device=dev) if need_x else None
        self.dx_acc = None
        if need_x and dx_dtype != F32 and not self.one_col_block:
            self.dx_acc = torch.empty(plan.rows * d, dtype=F32, device=dev)
            _traffic.workspace("gemm path: dx accumulator (fp32)", plan.rows * d * 4)
        self.dy = None
        self.dy_acc = None
        if need_y:
            if dy_dtype == F32 or self.one_row_chunk:
                self.dy = torch.empty((spec.m, d), dtype=dy_dtype, device=dev)
                self.dy_acc = self.dy
            else:
                self.dy_acc = torch.empty((spec.m, d), dtype=F32, device=dev)
                _traffic.workspace("gemm path: dy accumulator (fp32)", spec.m * d * 4)
        self.dscale_rows = torch.empty(spec.n, dtype=F32, device=dev) if need_scale else None

    def add(self, ri: int, i0: int, i1: int, ci: int, j0: int, j1: int, g: torch.Tensor) -> None:
        """Apply the gradient block ``g`` = s·G of rows [i0, i1) × columns [j0, j1) (row chunk
        ``ri``, column block ``ci``)."""
        spec, d = self.spec, self.dim
        if self.need_x:
            target = self.dx[i0:i1] if self.dx_acc is None else view(self.dx_acc, i1 - i0, d)
            matmul("dx (+)= (s·G)·y", g, spec.y[j0:j1], target, ci > 0, a_counted=True)
            _traffic.transfer("logits: G read (dx GEMM)", read=g.numel() * g.element_size())
            _count_accumulator("dx", target, ci > 0)
            if self.dx_acc is not None and j1 == spec.m:
                self._copy("dx", self.dx[i0:i1], target)
        if self.need_y:
            target = self.dy_acc[j0:j1]
            matmul("dy (+)= (s·G)ᵀ·x", g.t(), spec.x[i0:i1], target, ri > 0, a_counted=True)
            _traffic.transfer("logits: G read (dy GEMM)", read=g.numel() * g.element_size())
            _count_accumulator("dy", target, ri > 0)

    def add_dscale(self, ci: int, i0: int, i1: int, partials: torch.Tensor) -> None:
        """Per-row sums of the epilogue's (splits, rows) partials, in split then block order."""
        if self.dscale_rows is None or not executing(partials.device):
            return
        total = partials.sum(dim=0)
        if ci == 0:
            self.dscale_rows[i0:i1] = total
        else:
            self.dscale_rows[i0:i1] += total

    def _copy(self, what: str, dst: torch.Tensor, src: torch.Tensor) -> None:
        _traffic.launch()
        _traffic.transfer(f"accumulators: {what} cast", read=src.numel() * 4, write=dst.numel() * dst.element_size())
        if executing(dst.device):
            dst.copy_(src)

    def finish(self):
        """(dx, dy, per-row scale-gradient sums)."""
        dy = self.dy
        if self.need_y and dy is None:
            dy = torch.empty(self.dy_acc.shape, dtype=self.spec.y.dtype, device=self.dy_acc.device)
            self._copy("dy", dy, self.dy_acc)
        return self.dx, dy, self.dscale_rows


def _finish_scale(spec: PairSpec, rows: Optional[torch.Tensor]):
    if rows is None:
        return None
    ds = rows if spec.per_row_scale else rows.sum()
    return ds.to(spec.scale.dtype)


# ----------------------------------------------------------------------------- similarity_lse


def _merge(state: torch.Tensor, part: torch.Tensor, first: bool) -> None:
    """Fold (2, parts, n) partials into a (2, n) state (field stride = the state's row stride)."""
    n = state.shape[1]
    _traffic.transfer("stats: merge partials", read=part.numel() * 4 + (0 if first else state.numel() * 4),
                      write=state.numel() * 4)
    launch(_merge_lse_kernel, merge_grid(n), state_ptr=state, state_field=state.stride(0), part_ptr=part,
           part_field=part.stride(0), parts=part.shape[1], n=n, FIRST=first, BLOCK=MERGE_BLOCK)


def _finish(state: torch.Tensor, out: torch.Tensor, pair: Pair) -> None:
    n = state.shape[1]
    _traffic.transfer("stats: finish", read=state.numel() * 4, write=state.numel() * 4 + out.numel() * 4)
    launch(_finish_lse_kernel, merge_grid(n), state_ptr=state, state_field=state.stride(0), n=n, out_ptr=out,
           bias_ptr=pair.bias, bias_value=pair.bias_value, BIAS_MODE=int(pair.bias_mode), BLOCK=MERGE_BLOCK)


def similarity_lse_forward(spec: PairSpec, rows: bool, cols: bool):
    """``similarity_lse_forward`` of the triton backend on the gemm path: the same outputs and
    statistics format (``[m2, lg2]``) as the fused kernels (``mmloss.ops.triton``)."""
    dev = spec.x.device
    f32 = dict(dtype=F32, device=dev)
    pair = make_pair(spec, a_is_x=True)
    blocks = Blocks(spec, spec.x.dtype, need_g=False)
    row_blocks_max, splits_max = max_epilogue_grid(blocks.plan, dev)
    row_out = torch.empty(spec.n if rows else 0, **f32)
    row_stats = torch.empty((2, spec.n if rows else 0), **f32)
    col_out = torch.empty(spec.m if cols else 0, **f32)
    col_stats = torch.empty((2, spec.m if cols else 0), **f32)
    row_part = torch.empty(2 * splits_max * blocks.plan.rows if rows else 1, **f32)
    col_part = torch.empty(2 * row_blocks_max * blocks.plan.cols if cols else 1, **f32)
    _traffic.workspace("gemm path: partial statistics", 4 * (row_part.numel() + col_part.numel()))
    common = pair_kwargs(pair)
    for ri, i0, i1, ci, j0, j1 in blocks.blocks():
        r, c = i1 - i0, j1 - j0
        p = blocks.products(i0, i1, j0, j1)
        eg = epilogue_grid(r, c, dev)
        rp = view(row_part, 2, eg.splits, r) if rows else row_part
        cp = view(col_part, 2, eg.row_blocks, c) if cols else col_part
        _traffic.transfer("stats: partials write (epilogue)",
                          write=4 * ((2 * eg.splits * r if rows else 0) + (2 * eg.row_blocks * c if cols else 0)))
        launch(_lse_forward_epilogue, eg.grid, s_ptr=p, stride_s0=p.stride(0), rows=r, cols=c, i0=i0, j0=j0,
               **common, row_part_ptr=rp, row_field=rp.stride(0) if rows else 0, col_part_ptr=cp,
               col_field=cp.stride(0) if cols else 0, cols_per_split=eg.cols_per_split, ROWS=rows, COLS=cols,
               **epilogue_kwargs(dev))
        if rows:
            _merge(row_stats[:, i0:i1], rp, ci == 0)
            if j1 == spec.m:
                _finish(row_stats[:, i0:i1], row_out[i0:i1], pair)
        if cols:
            _merge(col_stats[:, j0:j1], cp, ri == 0)
    if cols:
        _finish(col_stats, col_out, pair)
    return row_out, col_out, row_stats, col_stats


def similarity_lse_backward(spec: PairSpec, grad_row, grad_col, row_stats, col_stats, needs):
    """(dx, dy, dscale, dbias) from the forward's ``[m2, lg2]`` statistics (either path's), every
    products block recomputed by the forward's GEMM call."""
    need_x, need_y, need_scale, need_bias = needs
    dev = spec.x.device
    g, h = fp32_vector(grad_row), fp32_vector(grad_col)
    r_st = fp32_vector(row_stats) if g is not None else None
    c_st = fp32_vector(col_stats) if h is not None else None
    poison = None if spec.bias is None else spec.bias.detach().to(F32) * 0.0
    wr = weighted_shifts(r_st, g, poison) if g is not None else None
    wc = weighted_shifts(c_st, h, poison) if h is not None else None
    dx = dy = dscale = None
    run = (g is not None or h is not None) and (need_x or need_y or need_scale)
    if run:
        pair = make_pair(spec, a_is_x=True)
        store_g = need_x or need_y
        blocks = Blocks(spec, spec.x.dtype, need_g=store_g)
        grads = FeatureGrads(spec, blocks.plan, need_x, need_y, need_scale)
        _, splits_max = max_epilogue_grid(blocks.plan, dev)
        ds_part = torch.empty(splits_max * blocks.plan.rows if need_scale else 1, dtype=F32, device=dev)
        dummy = torch.empty(1, dtype=F32, device=dev)
        common = pair_kwargs(pair)
        for ri, i0, i1, ci, j0, j1 in blocks.blocks():
            r, c = i1 - i0, j1 - j0
            p = blocks.products(i0, i1, j0, j1)
            eg = epilogue_grid(r, c, dev)
            gb = blocks.grad_block(r, c) if store_g else dummy
            dsp = view(ds_part, eg.splits, r) if need_scale else ds_part
            weights = (r if g is not None else 0) + (c * eg.row_blocks if h is not None else 0)
            _traffic.transfer("stats: weights read (epilogue)", read=8 * weights,
                              write=4 * eg.splits * r * int(need_scale))
            launch(_lse_backward_epilogue, eg.grid, s_ptr=p, stride_s0=p.stride(0), rows=r, cols=c, i0=i0, j0=j0,
                   **common, a_stat_ptr=wr if wr is not None else dummy,
                   stride_astat=wr.stride(0) if wr is not None else 0,
                   b_stat_ptr=wc if wc is not None else dummy, stride_bstat=wc.stride(0) if wc is not None else 0,
                   g_ptr=gb, stride_g0=gb.stride(0) if store_g else 0, dscale_ptr=dsp,
                   cols_per_split=eg.cols_per_split, HAS_A_GRAD=g is not None, HAS_B_GRAD=h is not None,
                   STORE_G=store_g, NEED_DSCALE=need_scale, **epilogue_kwargs(dev))
            if store_g:
                grads.add(ri, i0, i1, ci, j0, j1, gb)
            grads.add_dscale(ci, i0, i1, dsp)
        dx, dy, ds_rows = grads.finish()
        dscale = _finish_scale(spec, ds_rows)
    if need_x and dx is None:
        dx = torch.zeros(spec.x.shape, dtype=spec.x.dtype, device=dev)
    if need_y and dy is None:
        dy = torch.zeros(spec.y.shape, dtype=spec.y.dtype, device=dev)
    if need_scale and dscale is None:
        dscale = torch.zeros(spec.scale.shape, dtype=spec.scale.dtype, device=dev)
    dbias = None
    if need_bias:
        # Σ_ij G_ij = Σ_i g_i + Σ_j h_j over rows / columns with an allowed pair (lse_backward)
        total = torch.zeros((), dtype=F32, device=dev)
        if g is not None:
            total = total + (g * _bias_weights(r_st)).sum()
        if h is not None:
            total = total + (h * _bias_weights(c_st)).sum()
        if spec.bias is not None:
            total = total + poison
        dbias = total.to(spec.bias.dtype) if spec.bias is not None else total
    return dx, dy, dscale, dbias


# ----------------------------------------------------------------------------- pairwise_sigmoid


def _sigmoid(spec: PairSpec, needs, upstream: Optional[torch.Tensor], with_loss: bool, keep_fp32: bool):
    """(per-row loss (N,) | None, dx, dy, per-row dscale sums, dbias 0-d fp32) of one pass over
    the blocks: the loss and/or G = −z·sigmoid(−z·L)·upstream_i (upstream None: 1)."""
    need_x, need_y, need_scale, need_bias = needs
    dev = spec.x.device
    f32 = dict(dtype=F32, device=dev)
    pair = make_pair(spec, a_is_x=True)
    store_g = need_x or need_y
    blocks = Blocks(spec, spec.x.dtype, need_g=store_g)
    grads = FeatureGrads(spec, blocks.plan, need_x, need_y, need_scale, keep_fp32)
    row_blocks_max, splits_max = max_epilogue_grid(blocks.plan, dev)
    loss = torch.empty(spec.n, **f32) if with_loss else None
    rows_part = torch.empty(splits_max * blocks.plan.rows, **f32)
    loss_part = rows_part if with_loss else None
    ds_part = torch.empty(splits_max * blocks.plan.rows, **f32) if need_scale else None
    db_part = torch.empty(row_blocks_max * splits_max, **f32) if need_bias else None
    dbias = torch.zeros((), **f32) if need_bias else None
    dummy = torch.empty(1, **f32)
    common = pair_kwargs(pair)
    for ri, i0, i1, ci, j0, j1 in blocks.blocks():
        r, c = i1 - i0, j1 - j0
        p = blocks.products(i0, i1, j0, j1)
        eg = epilogue_grid(r, c, dev)
        gb = blocks.grad_block(r, c) if store_g else dummy
        lp = view(loss_part, eg.splits, r) if with_loss else dummy
        dsp = view(ds_part, eg.splits, r) if need_scale else dummy
        dbp = view(db_part, eg.programs) if need_bias else dummy
        per_row = int(with_loss) + int(need_scale)
        _traffic.transfer("stats: partials write (epilogue)",
                          write=4 * eg.splits * r * per_row + 4 * eg.programs * int(need_bias))
        launch(_sigmoid_epilogue, eg.grid, s_ptr=p, stride_s0=p.stride(0), rows=r, cols=c, i0=i0, j0=j0,
               **common, bias_ptr=pair.bias, bias_value=pair.bias_value, BIAS_MODE=int(pair.bias_mode),
               grad_ptr=upstream if upstream is not None else dummy, loss_ptr=lp, g_ptr=gb,
               stride_g0=gb.stride(0) if store_g else 0, dscale_ptr=dsp, dbias_ptr=dbp,
               cols_per_split=eg.cols_per_split, HAS_GRAD=upstream is not None, WITH_LOSS=with_loss,
               STORE_G=store_g, NEED_DSCALE=need_scale, NEED_DBIAS=need_bias, **epilogue_kwargs(dev))
        if store_g:
            grads.add(ri, i0, i1, ci, j0, j1, gb)
        grads.add_dscale(ci, i0, i1, dsp)
        if executing(dev):
            if with_loss:
                if ci == 0:
                    loss[i0:i1] = lp.sum(dim=0)
                else:
                    loss[i0:i1] += lp.sum(dim=0)
            if need_bias:
                dbias += dbp.sum()
    dx, dy, ds_rows = grads.finish()
    return loss, dx, dy, ds_rows, dbias


def pairwise_sigmoid_forward(spec: PairSpec) -> torch.Tensor:
    """(N,) fp32 Σ_j softplus(−z_ij·L_ij): 1 GEMM-equivalent."""
    return _sigmoid(spec, (False, False, False, False), None, True, False)[0]


def _finish_bias(spec: PairSpec, total):
    if total is None:
        return None
    return total.to(spec.bias.dtype) if spec.bias is not None else total


def pairwise_sigmoid_backward(spec: PairSpec, grad: torch.Tensor, needs):
    """(dx, dy, dscale, dbias) of ⟨grad, per-row sums⟩: 3 GEMM-equivalents."""
    upstream = grad.detach().to(F32).contiguous()
    _, dx, dy, ds_rows, dbias = _sigmoid(spec, needs, upstream, False, False)
    return dx, dy, _finish_scale(spec, ds_rows), _finish_bias(spec, dbias)


def pairwise_sigmoid_sum(spec: PairSpec, needs):
    """(Σ_i σ_i 0-d fp32, dx, dy, dscale, dbias) with the gradients of the total formed in the
    same pass (3 GEMM-equivalents; 1 without gradients). Gradients stay fp32 (the op casts them
    after the upstream scale, ``_schema._register_precomputed``)."""
    loss, dx, dy, ds_rows, dbias = _sigmoid(spec, needs, None, True, True)
    dscale = None
    if ds_rows is not None:
        dscale = ds_rows if spec.per_row_scale else ds_rows.sum()
    return loss.sum(), dx, dy, dscale, dbias
