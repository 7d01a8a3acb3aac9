"""Host-side helpers shared by the triton launchers: dtype checks, the ``tl.dot`` precision, the
operand orientation and its kernel modes (``Pair``), grid plans (persistent programs, column
splits, D slices) and what an owner pass computes and writes (``OwnerFlags``, ``OwnerOutputs``).

Nothing here reads a device value: grids and workspaces depend only on shapes, dtypes and the
device's properties, so a launch never synchronises the host (CUDA graphs can capture it).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from ..._device import triton_interpreting
from .._spec import PairSpec
from . import _config
from ._config import INTERPRET_PROGRAMS, DeviceFigures, Tiles
from ._modes import BiasMode, LseStat, MarkMode, ScaleMode

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# PairSpec.marks → the kernels' MARKS
MARK_MODES = {"none": MarkMode.NONE, "diagonal": MarkMode.DIAGONAL, "same_label": MarkMode.SAME_LABEL}
# Column splits start at multiples of this many columns, a multiple of every block_b the table or
# the autotuner may use, so the split (and the workspace it sizes) never depends on block_b.
SPLIT_ALIGN = 256
SPLIT_ALIGN_INTERPRET = 16


def check_supported(spec: PairSpec, names: tuple[str, str] = ("x", "y")) -> None:
    """TypeError for dtypes the kernels do not take (fp64 belongs to the torch/reference backends).
    ``names`` are the argument names of (x, y) in the messages (e.g. the student's x_s, y_s)."""
    for name, t in zip(names, (spec.x, spec.y)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"the triton backend takes float32, float16 or bfloat16 features, got {name} of dtype "
                f"{t.dtype} (use backend='torch' or 'reference' for float64, e.g. for gradcheck)"
            )
    if spec.x.dtype != spec.y.dtype:
        raise TypeError(f"{names[0]} and {names[1]} must share a dtype, got {spec.x.dtype} and {spec.y.dtype}")
    if spec.x.dtype == torch.bfloat16 and triton_interpreting():
        # Triton's interpreter hands tl.dot the raw bfloat16 bit patterns (numpy has no bfloat16):
        # products come out 1e11–1e13× off, silently. Refuse instead (issue 8, item 10).
        raise TypeError(
            f"the triton backend cannot take {names[0]}/{names[1]} of dtype {spec.x.dtype} under "
            "TRITON_INTERPRET=1: "
            "the Triton interpreter multiplies bfloat16 bit patterns as integers (results 1e11–1e13× "
            "off); use float16 or float32 under the interpreter, bfloat16 on a CUDA GPU, or "
            "backend='torch'"
        )


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 follows torch's fp32 matmul setting (exact "ieee" for
    "highest" / ``fp32_precision = "ieee"``, TF32 otherwise); half operands ignore it."""
    if dtype == torch.float32 and _fp32_matmul_is_exact():
        return "ieee"
    return "tf32"


def _fp32_matmul_is_exact() -> bool:
    """True when torch's CUDA fp32 matmuls are exact. Reads the newer
    ``torch.backends.cuda.matmul.fp32_precision`` when a user set it: after that,
    ``torch.get_float32_matmul_precision()`` raises (a mix of the two APIs), so it is consulted
    only while the new setting is still "none". Anything unreadable counts as exact."""
    matmul = getattr(getattr(torch.backends, "cuda", None), "matmul", None)
    setting = getattr(matmul, "fp32_precision", "none")
    if setting in ("ieee", "tf32"):
        return setting == "ieee"
    try:
        return torch.get_float32_matmul_precision() == "highest"
    except RuntimeError:
        return True


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device, per_sm: int) -> int:
    """How many programs fill the device (the interpreter pretends to have a few)."""
    if device.type != "cuda":
        return INTERPRET_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index) * per_sm


def split_align(device: torch.device) -> int:
    return SPLIT_ALIGN if device.type == "cuda" else SPLIT_ALIGN_INTERPRET


# ----------------------------------------------------------------------------- orientation


@dataclass
class Pair:
    """One orientation of the problem: A rows are owned by programs, B rows are streamed.

    ``a_is_x`` True: A = x, B = y, pairs marked where ``b == a + offset``; False: A = y, B = x,
    the offset negated and the labels swapped. The per-row scale of x becomes a per-B-row scale
    (``ScaleMode.PER_B_ROW``) when A is y.
    """

    a: torch.Tensor
    b: torch.Tensor
    a_is_x: bool
    scale_mode: ScaleMode
    scale: torch.Tensor          # fp32 copy of the scale tensor, or a dummy for a float scale
    scale_value: float
    bias_mode: BiasMode
    bias: torch.Tensor
    bias_value: float
    marks: MarkMode
    offset: int
    a_labels: torch.Tensor
    b_labels: torch.Tensor

    @property
    def n_a(self) -> int:
        return self.a.shape[0]

    @property
    def n_b(self) -> int:
        return self.b.shape[0]

    @property
    def dim(self) -> int:
        return self.a.shape[1]

    def args(self) -> dict:
        """Keyword arguments every matrix kernel takes (modes as the plain integers the kernels
        compare with the ``_modes`` constants)."""
        return dict(
            a_ptr=self.a, b_ptr=self.b, n_a=self.n_a, n_b=self.n_b, dim=self.dim,
            stride_a0=self.a.stride(0), stride_a1=self.a.stride(1),
            stride_b0=self.b.stride(0), stride_b1=self.b.stride(1),
            scale_ptr=self.scale, scale_value=self.scale_value,
            bias_ptr=self.bias, bias_value=self.bias_value,
            offset=self.offset, a_lab_ptr=self.a_labels, b_lab_ptr=self.b_labels,
            stride_alab=self.a_labels.stride(0), stride_blab=self.b_labels.stride(0),
            MARKS=int(self.marks), SCALE_MODE=int(self.scale_mode), BIAS_MODE=int(self.bias_mode),
            PRECISION=dot_precision(self.a.dtype), A_IS_X=self.a_is_x,
        )


def dummy(device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """A one-element tensor for pointer arguments a constexpr flag leaves unused."""
    return torch.empty(1, dtype=dtype, device=device)


def host_value(t: Optional[torch.Tensor], device: torch.device) -> Optional[float]:
    """The value of a 0-d CPU tensor ``t`` that is not on ``device`` (a CPU ``logit_scale`` reaching
    an op called directly with CUDA features), read on the host, or None. The kernels then take
    it as the float argument: no host→device copy inside the op (CUDA graphs can capture the
    launch); the op's gradient for ``t`` does not depend on where its value was read."""
    if t is not None and t.dim() == 0 and t.device.type == "cpu" and t.device != device:
        return t.item()
    return None


def make_pair(spec: PairSpec, a_is_x: bool) -> Pair:
    dev = spec.x.device
    host_scale, host_bias = host_value(spec.scale, dev), host_value(spec.bias, dev)
    if spec.scale is None or host_scale is not None:
        scale_value = float(spec.scale_value) if host_scale is None else host_scale
        scale_mode, scale = ScaleMode.FLOAT, dummy(dev)
    elif spec.scale.dim() == 0:
        scale_mode = ScaleMode.TENSOR
        scale, scale_value = spec.scale.detach().to(device=dev, dtype=torch.float32).reshape(1), 0.0
    else:
        scale_mode = ScaleMode.PER_A_ROW if a_is_x else ScaleMode.PER_B_ROW
        scale = spec.scale.detach().to(device=dev, dtype=torch.float32).contiguous()
        scale_value = 0.0
    if spec.bias is None or host_bias is not None:
        bias_value = float(spec.bias_value) if host_bias is None else host_bias
        bias_mode, bias = BiasMode.FLOAT, dummy(dev)
    else:
        bias_mode = BiasMode.TENSOR
        bias, bias_value = spec.bias.detach().to(device=dev, dtype=torch.float32).reshape(1), 0.0
    marks = MARK_MODES[spec.marks]
    x_lab = spec.x_labels if marks == MarkMode.SAME_LABEL else dummy(dev, torch.int64)
    y_lab = spec.y_labels if marks == MarkMode.SAME_LABEL else dummy(dev, torch.int64)
    if a_is_x:
        return Pair(spec.x, spec.y, True, scale_mode, scale, scale_value, bias_mode, bias, bias_value,
                    marks, int(spec.offset), x_lab, y_lab)
    return Pair(spec.y, spec.x, False, scale_mode, scale, scale_value, bias_mode, bias, bias_value,
                marks, -int(spec.offset), y_lab, x_lab)


# ----------------------------------------------------------------------------- grid plans


@dataclass(frozen=True)
class StatsPlan:
    """Persistent grid of the statistics kernel: ``progs_a`` programs stride over the A blocks,
    ``splits`` column ranges of ``cols_per_split`` columns each."""

    progs_a: int
    splits: int
    cols_per_split: int


def stats_plan(n_a: int, n_b: int, block_a: int, align: int, target: int) -> StatsPlan:
    """Choose (programs over A blocks) × (column splits) ≤ ``target`` minimising the per-program
    work (rounds over A blocks × column units), ties to fewer splits (smaller workspace)."""
    n_blocks = triton.cdiv(n_a, block_a)
    units = triton.cdiv(n_b, align)
    best = None
    for splits in range(1, min(units, max(1, target)) + 1):
        progs = max(1, min(n_blocks, target // splits))
        rounds = triton.cdiv(n_blocks, progs)
        progs = triton.cdiv(n_blocks, rounds)           # same rounds, no idle programs
        per_split = triton.cdiv(units, splits)
        used = triton.cdiv(units, per_split)
        cost = rounds * per_split
        if best is None or cost < best[0]:
            best = (cost, StatsPlan(progs, used, per_split * align))
    return best[1]


@dataclass(frozen=True)
class OwnerPlan:
    """Grid of an owner kernel: (A blocks, D slices, column splits); each program holds
    ``num_dv`` accumulators of ``block_dv`` output columns."""

    blocks_a: int
    slices: int
    splits: int
    cols_per_split: int
    block_dv: int
    num_dv: int


def dv_chunks(width: int, max_dv: int, max_chunks: int = 4) -> tuple[int, int]:
    """(chunk width, chunks) covering ``width`` output columns with the least padding
    (then the fewest chunks); widths are powers of two ≥ 16, at most ``max_dv``."""
    best = None
    dv = 16
    while dv <= max_dv:
        chunks = triton.cdiv(width, dv)
        if chunks <= max_chunks:
            key = (chunks * dv, chunks)
            if best is None or key < best[0]:
                best = (key, (dv, chunks))
        dv *= 2
    if best is None:  # width beyond max_chunks × max_dv: the caller slices first
        raise ValueError(f"cannot cover {width} columns with {max_chunks} chunks of ≤ {max_dv}")
    return best[1]


def owner_plan(n_a: int, n_b: int, dim: int, tiles: Tiles, accumulate: bool, align: int,
               target: int) -> OwnerPlan:
    blocks_a = triton.cdiv(n_a, tiles.block_a)
    if accumulate:
        max_width = max(16, min(tiles.max_width, 4 * tiles.block_dv))
        slices = triton.cdiv(dim, max_width)
        block_dv, num_dv = dv_chunks(triton.cdiv(dim, slices), tiles.block_dv)
        slices = triton.cdiv(dim, block_dv * num_dv)
    else:
        slices, block_dv, num_dv = 1, 16, 1
    units = triton.cdiv(n_b, align)
    splits = 1
    if blocks_a * slices < target:
        splits = max(1, min(units, target // (blocks_a * slices)))
    per_split = triton.cdiv(units, splits)
    splits = triton.cdiv(units, per_split)
    return OwnerPlan(blocks_a, slices, splits, per_split * align, block_dv, num_dv)


def atomic_bytes(n_a: int, n_b: int, dim: int, block_a: int) -> int:
    """Bytes the atomic owner pass moves for dy: every program adds its ``(G∘s_a)ᵀ·A`` update
    into each streamed tile and D chunk of its range (``_common.chunk_step``; masked by the B rows
    and D only), so each of the ``cdiv(n_a, block_a)`` A blocks adds into all ``n_b × dim``
    elements once, over its slices and splits: one fp32 read-modify-write, 4 B read + 4 B
    written, per element and A block."""
    return triton.cdiv(n_a, block_a) * n_b * dim * 8


def atomic_pass_cost(n_a: int, n_b: int, dim: int, *, owner_slices: int, atomic_slices: int,
                     atomic_block_a: int, figures: Optional[DeviceFigures], flops: float = 0.0,
                     recompute: float = 1.0) -> tuple[float, float]:
    """(two owner passes, one atomic pass) in GEMM-equivalents (one = ``2·n_a·n_b·dim`` FLOPs at
    the GEMM peak ``flops``). Owner passes: a row and a column pass, each recomputing the logit
    tile once per D slice (``recompute`` GEMMs per recompute: 1, or 1 + D_t/D_s for
    similarity_kl's two tiles) plus its gradient GEMM: ``2·(s_owner·r + 1)``. Atomic pass:
    ``s_atomic·r + 2`` plus the time of its ``atomic_bytes`` at the device's atomic bandwidth
    expressed in GEMM-equivalents. ``figures`` None (the interpreter): atomics weigh nothing."""
    owner = 2.0 * (owner_slices * recompute + 1.0)
    atomic = atomic_slices * recompute + 2.0
    if figures is not None:
        gemm_equivalent_s = 2.0 * n_a * n_b * dim / flops
        traffic_s = atomic_bytes(n_a, n_b, dim, atomic_block_a) / figures.atomic_bw(n_b * dim * 4)
        atomic += traffic_s / gemm_equivalent_s
    return owner, atomic


def atomic_pass_pays(n_a: int, n_b: int, dim: int, owner_tiles: Tiles, atomic_tiles: Tiles,
                     device: torch.device, dtype: torch.dtype, recompute: float = 1.0) -> bool:
    """Whether ``deterministic=False`` should form dy by fp32 atomics in the row-owner pass
    instead of running a column-owner pass: ``atomic_pass_cost`` with the D slices each tile
    configuration needs, the device's published figures (``_config.FIGURES``) and the GEMM
    peak of ``dtype`` at the current fp32 matmul precision. The interpreter (no figures)
    compares GEMM work only, so its tests keep exercising the atomic kernels."""
    align = split_align(device)
    s_owner, s_atomic = (owner_plan(n_a, n_b, dim, t, True, align, 1).slices for t in (owner_tiles, atomic_tiles))
    figures = _config.FIGURES.get(_config.arch_key(device))
    flops = figures.gemm_flops(dtype, dot_precision(dtype) == "ieee") if figures is not None else 0.0
    owner, atomic = atomic_pass_cost(n_a, n_b, dim, owner_slices=s_owner, atomic_slices=s_atomic,
                                     atomic_block_a=atomic_tiles.block_a, figures=figures, flops=flops,
                                     recompute=recompute)
    return atomic < owner


def launch_options(t: Tiles) -> dict:
    return dict(num_warps=t.num_warps, num_stages=t.num_stages)


def weighted_shifts(stats: torch.Tensor, grad: torch.Tensor, poison: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What the softmax-family owner kernels read (``_common.load_weighted_shift``): for each
    (max m2, log-sum lg2) row pair of the forward's (2k, n) fp32 ``stats``, the pair
    ``[m2', w]`` with ``grad·2^((t2 − m2) − lg2) = w·2^(t2 − m2')``: ``w = grad·2^(−lg2)`` (the
    upstream gradient ``grad`` (n,) folded in), and for a row with no allowed pair (lg2 −inf)
    ``m2' = +inf``, ``w = grad`` (every probability exactly 0). ``poison`` (0-d: 0, or NaN for
    a non-finite bias, which the statistics leave out) joins lg2 of the other rows, so their
    gradients turn NaN as torch's do. Returns a (2k, n) fp32 contiguous tensor; O(k·n) work on
    the device, no host synchronisation. Precomputing this keeps two per-row vectors live in the
    kernels instead of three and an exp2 per row out of every tile (no register spills)."""
    stats = stats.detach().to(torch.float32)
    m2, lg2 = stats[LseStat.MAX::2], stats[LseStat.LOG_SUM::2]
    empty = lg2 == float("-inf")
    if poison is not None:
        lg2 = lg2 + poison
    w = grad[None, :] * torch.exp2(-torch.where(empty, 0.0, lg2))
    m2 = torch.where(empty, float("inf"), m2)
    return torch.stack((m2, w), dim=1).reshape(stats.shape).contiguous()


def optional(t: Optional[torch.Tensor], device: torch.device, dtype=torch.float32) -> torch.Tensor:
    return t if t is not None else dummy(device, dtype)


def fp32_vector(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """An fp32 contiguous copy (upstream gradients may be expanded, stride 0, or half; saved
    statistics are read with one row stride): O(n) work; None stays None."""
    return None if t is None else t.detach().to(torch.float32).contiguous()


def zeros_if_missing(grad: Optional[torch.Tensor], needed: bool, like: torch.Tensor) -> Optional[torch.Tensor]:
    """``grad``, or contiguous zeros of ``like``'s shape, dtype and device when a needed feature
    gradient had no pass to form it (no upstream gradient reached the kernels)."""
    if grad is None and needed:
        return torch.zeros(like.shape, dtype=like.dtype, device=like.device)
    return grad


# ----------------------------------------------------------------------------- owner passes


@dataclass(frozen=True)
class OwnerFlags:
    """What one owner pass computes: the flag constexprs shared by ``owner._owner_kernel`` and
    ``kl_backward._kl_owner_kernel`` (``constexprs()``), checked here and, as
    ``tl.static_assert``, in the kernels.

    ``has_a_grad`` / ``has_b_grad``: the owned (A) / streamed (B) rows have an upstream gradient
    (at least one does); ``store_out``: write ``s ∘ (G·B)`` for the owned rows (dx in a row pass,
    dy in a column pass); ``need_dscale``: the scale-gradient partials ``⟨a_i, (G·B)_i⟩``;
    ``atomic_b``: also add ``Gᵀ·A`` to an fp32 gradient of the streamed rows with atomics (the
    ``deterministic=False`` row pass: it needs ``accumulate`` and no per-B-row scale). The
    passes the backends run: a row pass (A = x) with any of store_out / need_dscale / atomic_b;
    a column pass (A = y) with store_out; and, for the sigmoid only (``owner.run_owner``'s
    ``with_loss`` / ``need_dbias``), a pass that accumulates nothing (the per-row loss).
    """

    has_a_grad: bool
    has_b_grad: bool
    store_out: bool = False
    need_dscale: bool = False
    atomic_b: bool = False

    @property
    def accumulate(self) -> bool:
        """Whether the pass forms ``G·B`` (``owner._owner_kernel`` tests ``STORE_OUT or
        NEED_DSCALE``; the KL owner kernel always forms it)."""
        return self.store_out or self.need_dscale

    def check(self, scale_mode: ScaleMode) -> None:
        if self.atomic_b and (not self.accumulate or scale_mode == ScaleMode.PER_B_ROW):
            raise AssertionError("ATOMIC_B runs in the row-owner pass (A = x) that accumulates dx")

    def constexprs(self) -> dict:
        return dict(HAS_A_GRAD=self.has_a_grad, HAS_B_GRAD=self.has_b_grad, STORE_OUT=self.store_out,
                    NEED_DSCALE=self.need_dscale, ATOMIC_B=self.atomic_b)


@dataclass
class OwnerResult:
    out: Optional[torch.Tensor]          # (n_a, D) in the operand dtype: s ∘ (G·B)
    dscale_rows: Optional[torch.Tensor]  # (n_a,) fp32: ⟨a_i, (G·B)_i⟩ before the scale
    out_b: Optional[torch.Tensor]        # (n_b, D) fp32 atomic accumulation (ATOMIC_B)
    loss_rows: Optional[torch.Tensor] = None  # (n_a,) fp32 per-row softplus sums (sigmoid)
    dbias: Optional[torch.Tensor] = None      # 0-d fp32 Σ G (sigmoid)


@dataclass
class OwnerOutputs:
    """The gradient buffers of one owner pass, allocated for its flags and grid plan: ``out``
    (n_a, D) in the operand dtype, or (splits, n_a, D) fp32 partials when the columns are split;
    ``dscale`` (splits·slices, n_a) fp32 partials; ``out_b`` (n_b, D) fp32 zeros for the atomics.
    One-element dummies stand in for what the flags leave unwritten."""

    flags: OwnerFlags
    plan: OwnerPlan
    dtype: torch.dtype
    out: torch.Tensor
    out_strides: tuple
    dscale: torch.Tensor
    out_b: torch.Tensor

    @staticmethod
    def allocate(flags: OwnerFlags, plan: OwnerPlan, a: torch.Tensor, n_b: int) -> "OwnerOutputs":
        dev, (n_a, dim) = a.device, a.shape
        f32 = dict(dtype=torch.float32, device=dev)
        if flags.store_out and plan.splits == 1:
            out = torch.empty((n_a, dim), dtype=a.dtype, device=dev)
            out_strides = (0, out.stride(0), out.stride(1))
        elif flags.store_out:
            out = torch.empty((plan.splits, n_a, dim), **f32)
            out_strides = out.stride()
        else:
            out, out_strides = dummy(dev), (0, 0, 0)
        dscale = torch.empty((plan.splits * plan.slices, n_a), **f32) if flags.need_dscale else dummy(dev)
        out_b = torch.zeros((n_b, dim), **f32) if flags.atomic_b else dummy(dev)
        return OwnerOutputs(flags, plan, a.dtype, out, out_strides, dscale, out_b)

    def args(self) -> dict:
        """Keyword arguments of the outputs, the grid plan and the flags."""
        atomic_b = self.flags.atomic_b
        return dict(
            out_ptr=self.out, stride_oc=self.out_strides[0], stride_o0=self.out_strides[1],
            stride_o1=self.out_strides[2], dscale_ptr=self.dscale, out_b_ptr=self.out_b,
            stride_ob0=self.out_b.stride(0) if atomic_b else 0, stride_ob1=self.out_b.stride(1) if atomic_b else 0,
            cols_per_split=self.plan.cols_per_split, slices=self.plan.slices,
            **self.flags.constexprs(), BLOCK_DV=self.plan.block_dv, NUM_DV=self.plan.num_dv,
        )

    def result(self) -> OwnerResult:
        """The finished gradients after the launch: split partials summed in a fixed order
        (deterministic); None for what the flags did not ask."""
        flags, out = self.flags, self.out
        if flags.store_out and self.plan.splits > 1:
            out = out.sum(dim=0).to(self.dtype)
        return OwnerResult(
            out=out if flags.store_out else None,
            dscale_rows=self.dscale.sum(dim=0) if flags.need_dscale else None,
            out_b=self.out_b if flags.atomic_b else None,
        )
