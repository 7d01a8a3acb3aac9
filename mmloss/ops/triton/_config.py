"""Per-architecture tile table for the triton kernels (one place; docs/kernels.md, "Forward"/"Backward").

Every launch asks ``tiles(kind, device, dtype)`` for its block sizes. Keys:

- architecture: ``"sm90"`` (H100/H200), ``"sm80"`` (A100), ``"default"`` (any other CUDA GPU:
  conservative tiles that fit 99 KiB of shared memory), ``"interpret"`` (``TRITON_INTERPRET=1``
  on CPU tensors: 16-wide tiles so the numpy interpreter stays fast and ragged edges, several
  accumulators, several D slices and column splits are all exercised by tiny shapes);
- operand class: ``"half"`` (fp16/bf16) or ``"fp32"`` (twice the shared memory per element, so
  half the K-chunk);
- kernel kind: ``"stats"`` (the forward LSE statistics kernel), ``"owner"`` (the deterministic
  row-/column-owner kernels of backward, the sigmoid forward and the SigLIP path), ``"atomic"``
  (the owner kernel when it also adds the other operand's gradient with atomics),
  ``"combine"`` (the partial-statistics merge) and ``"kl_stats"`` (the ``similarity_kl``
  statistics kernel: two logit tiles and six running statistics per row and column, so half
  the rows of ``"stats"`` per program keeps it free of register spills; its backward uses the
  ``"owner"`` / ``"atomic"`` rows).

Fields of the matrix kernels: ``block_a`` rows owned per program, ``block_b`` rows of the streamed
operand per tile, ``block_k`` the D-chunk of the logit GEMM, ``block_dv`` the widest output
D-chunk per accumulator and ``max_width`` the most output columns (accumulator chunks × width)
one program holds in registers — wider D is split into slices that each recompute the logit tile
(docs/kernels.md: the register budget limits ``block_a · D``). ``programs_per_sm`` sizes persistent /
split grids. The sm_90 and sm_80 entries were chosen to compile without register spills and
within the shared-memory budget (tests/triton_compile checks both); their speed is tuned on the
GPU (benchmarks/gpu/README.md says what to try first). ``MMLOSS_TRITON_AUTOTUNE=1`` lets the
autotuner re-pick ``block_b``, ``num_warps`` and ``num_stages`` (never the sizes that shape the
grid or the workspaces, nor ``block_k``) from the candidates below.

Invariant (checked at import): within one (architecture, operand class) row, the statistics
kinds (``"stats"``, ``"kl_stats"``) and the owner kinds (``"owner"``, ``"atomic"``) share one
``block_k``. The backward recomputes each logit tile bit for bit as the forward formed it (the
saved max/log-sum statistics are only exact against the forward's own rounding); a different
K-chunk sums D in a different order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from ..._device import triton_interpreting

KINDS = ("stats", "owner", "atomic", "combine", "kl_stats")
ARCHS = ("sm90", "sm80", "default", "interpret")


@dataclass(frozen=True)
class Tiles:
    block_a: int
    block_b: int
    block_k: int
    num_warps: int
    num_stages: int
    block_dv: int = 16
    max_width: int = 16
    programs_per_sm: int = 1


def _t(a, b, k, w, s, dv=16, width=16, per_sm=1) -> Tiles:
    return Tiles(a, b, k, w, s, dv, width, per_sm)


# (architecture, operand class) → kind → tiles
TABLE: dict[tuple[str, str], dict[str, Tiles]] = {
    ("sm90", "half"): {
        "stats": _t(128, 64, 64, 8, 3, per_sm=1),
        # 3 accumulators of 128: at 4 (512 columns) the sigmoid and similarity_kl owners spill
        # 16–32 B (issue 11; tests/triton_compile/test_no_spills.py)
        "owner": _t(64, 64, 64, 8, 3, dv=128, width=384, per_sm=1),
        "atomic": _t(64, 64, 64, 8, 3, dv=64, width=256, per_sm=1),
        "combine": _t(256, 1, 1, 4, 1),
        "kl_stats": _t(64, 64, 64, 8, 3, per_sm=1),
    },
    ("sm90", "fp32"): {
        "stats": _t(128, 64, 32, 8, 3, per_sm=1),
        "owner": _t(64, 64, 32, 8, 3, dv=64, width=256, per_sm=1),
        "atomic": _t(64, 64, 32, 8, 3, dv=64, width=256, per_sm=1),
        "combine": _t(256, 1, 1, 4, 1),
        "kl_stats": _t(64, 64, 32, 8, 3, per_sm=1),
    },
    ("sm80", "half"): {
        "stats": _t(128, 64, 32, 8, 3, per_sm=1),
        "owner": _t(64, 64, 32, 8, 3, dv=128, width=256, per_sm=1),
        # 2 stages: the similarity_kl atomic owner holds two (max, weight) pairs per row since
        # the statistics stay unrounded, and at 3 stages it needs 8 B of stack at 255 registers
        # (at 4 chunks of 32 it still spilled 8 B at D = 128: 2 chunks, issue 11)
        "atomic": _t(64, 64, 32, 8, 2, dv=32, width=64, per_sm=1),
        "combine": _t(256, 1, 1, 4, 1),
        "kl_stats": _t(64, 64, 32, 8, 3, per_sm=1),
    },
    ("sm80", "fp32"): {
        "stats": _t(128, 64, 32, 8, 2, per_sm=1),
        # chunks of 64: one 128-wide chunk (D = 128) spilled 8 B in the column owner; four chunks
        # (256 columns) 8–16 B in the column owners of similarity_lse and similarity_kl, three
        # still 16 B in the similarity_kl column owner (issue 11; tests/triton_compile/test_no_spills.py)
        "owner": _t(64, 32, 32, 8, 2, dv=64, width=128, per_sm=1),
        "atomic": _t(64, 32, 32, 8, 2, dv=32, width=128, per_sm=1),
        "combine": _t(256, 1, 1, 4, 1),
        "kl_stats": _t(64, 64, 32, 8, 2, per_sm=1),
    },
    ("default", "half"): {
        "stats": _t(64, 64, 32, 4, 2, per_sm=2),
        "owner": _t(64, 64, 32, 4, 2, dv=64, width=128, per_sm=2),
        "atomic": _t(64, 64, 32, 4, 2, dv=64, width=128, per_sm=2),
        "combine": _t(256, 1, 1, 4, 1),
        "kl_stats": _t(32, 64, 32, 4, 2, per_sm=2),
    },
    ("default", "fp32"): {
        "stats": _t(64, 64, 16, 4, 2, per_sm=2),
        "owner": _t(64, 64, 16, 4, 2, dv=64, width=128, per_sm=2),
        "atomic": _t(64, 64, 16, 4, 2, dv=64, width=128, per_sm=2),
        "combine": _t(256, 1, 1, 4, 1),
        "kl_stats": _t(32, 64, 16, 4, 2, per_sm=2),
    },
    ("interpret", "any"): {
        "stats": _t(16, 16, 16, 1, 1),
        "owner": _t(16, 16, 16, 1, 1, dv=16, width=64),
        "atomic": _t(16, 16, 16, 1, 1, dv=16, width=64),
        "combine": _t(32, 1, 1, 1, 1),
        "kl_stats": _t(16, 16, 16, 1, 1),
    },
}

# Programs the interpreter pretends to have (it runs them one after another): small, so that
# shapes of a few dozen rows already need persistent loops and column splits.
INTERPRET_PROGRAMS = 3

# Kinds whose logit tiles must agree bit for bit (the forward statistics and the backward passes).
TILE_KINDS = ("stats", "owner", "atomic", "kl_stats")


def shared_block_k(row: dict) -> int:
    """The one ``block_k`` of a table row's matrix kinds; AssertionError if they differ."""
    ks = {kind: row[kind].block_k for kind in TILE_KINDS}
    assert len(set(ks.values())) == 1, (
        f"the forward statistics and the backward owner kernels must share block_k (the backward "
        f"recomputes the forward's logit tiles bit for bit), got {ks}")
    return next(iter(ks.values()))


for _row in TABLE.values():
    shared_block_k(_row)

# Autotuning candidates (only with MMLOSS_TRITON_AUTOTUNE=1): (block_b, warps, stages). block_k
# stays the table's (see shared_block_k).
AUTOTUNE_CANDIDATES = {
    "stats": [(128, 8, 3), (128, 8, 4), (64, 4, 3), (256, 8, 3)],
    "owner": [(64, 4, 3), (64, 8, 3), (128, 8, 3), (64, 4, 4), (32, 4, 3)],
    "atomic": [(64, 4, 3), (64, 8, 3), (128, 8, 3), (64, 4, 4)],
    "kl_stats": [(64, 8, 3), (64, 8, 4), (32, 4, 3)],
}


@dataclass(frozen=True)
class DeviceFigures:
    """Published peak figures of the GPU a table row stands for, as ratios for host decisions
    (``_launch.atomic_pass_pays``). FLOP/s are NVIDIA's dense tensor-core figures (FMA units
    for exact fp32), bandwidths NVIDIA's HBM figures; L2 bandwidth is not published and is an
    ESTIMATE (the same figures and sources as ``mmloss/bench/devices.py``)."""

    half_flops: float      # dense fp16/bf16 tensor-core FLOP/s
    tf32_flops: float      # dense TF32 tensor-core FLOP/s
    fp32_flops: float      # FMA FLOP/s (exact fp32 products, no tensor cores)
    hbm_bw: float          # bytes/s
    l2_bw: float           # bytes/s, ESTIMATE
    l2_bytes: int

    def gemm_flops(self, dtype: torch.dtype, exact_fp32: bool) -> float:
        if dtype != torch.float32:
            return self.half_flops
        return self.fp32_flops if exact_fp32 else self.tf32_flops

    def atomic_bw(self, target_bytes: int) -> float:
        """Read-modify-write bandwidth of fp32 atomics into a ``target_bytes`` buffer: they run
        in the L2 while the target fits there, else every RMW also moves the line to HBM."""
        return self.l2_bw if target_bytes <= self.l2_bytes else self.hbm_bw


_T = 1e12
# sm90: H100 SXM (datasheet: 989 dense BF16, 494 dense TF32, 67 FP32 TFLOP/s, HBM3 3.35 TB/s,
# 50 MB L2; L2 ≈ 7 TB/s estimated; H200 has more HBM bandwidth, H100's is the conservative
# choice). sm80: A100 SXM4 (312 / 156 / 19.5 TFLOP/s, HBM2e 2.0 TB/s, 40 MB L2; L2 ≈ 5 TB/s
# estimated). "default" (other CUDA GPUs): A100's figures as a stand-in (consumer GPUs have a
# higher FLOP/byte ratio still, so atomics pay there even less). The interpreter has no entry:
# it has no memory system to weigh, and it must still exercise the atomic kernels.
FIGURES: dict[str, DeviceFigures] = {
    "sm90": DeviceFigures(989 * _T, 494 * _T, 67 * _T, 3.35 * _T, 7.0 * _T, 50 << 20),
    "sm80": DeviceFigures(312 * _T, 156 * _T, 19.5 * _T, 2.0 * _T, 5.0 * _T, 40 << 20),
    "default": DeviceFigures(312 * _T, 156 * _T, 19.5 * _T, 2.0 * _T, 5.0 * _T, 40 << 20),
}


def autotuning() -> bool:
    return os.environ.get("MMLOSS_TRITON_AUTOTUNE", "0") not in ("", "0") and not triton_interpreting()


def arch_key(device: torch.device) -> str:
    """"interpret" for CPU tensors, else the table row of this CUDA device's capability."""
    if device.type != "cuda":
        return "interpret"
    major, minor = torch.cuda.get_device_capability(device)
    return arch_for_capability(major, minor)


def arch_for_capability(major: int, minor: int) -> str:
    if (major, minor) == (9, 0):
        return "sm90"
    if (major, minor) == (8, 0):
        return "sm80"
    return "default"


def operand_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def table_tiles(arch: str, dtype: torch.dtype, kind: str) -> Tiles:
    if kind not in KINDS:
        raise KeyError(f"unknown kernel kind {kind!r}; expected one of {KINDS}")
    if arch == "interpret":
        return TABLE[("interpret", "any")][kind]
    return TABLE[(arch, operand_class(dtype))][kind]


def tiles(kind: str, device: torch.device, dtype: torch.dtype) -> Tiles:
    """The tiles of ``kind`` for tensors of ``dtype`` on ``device``."""
    return table_tiles(arch_key(device), dtype, kind)


def with_candidate(t: Tiles, block_b: int, warps: int, stages: int) -> Tiles:
    return replace(t, block_b=block_b, num_warps=warps, num_stages=stages)
