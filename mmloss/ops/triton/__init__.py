"""The ``triton`` backend: fused Triton kernels for ``similarity_lse`` and ``pairwise_sigmoid``
(DESIGN.md "Backends", KERNELS.md). ``mmloss.ops._primitives`` calls the five functions below
with a ``PairSpec``; they mirror ``mmloss.ops.torch_chunked``.

Files: ``lse_forward.py`` (row and column statistics in one pass + deterministic combine),
``owner.py`` (the row-/column-owner kernel behind every backward, the sigmoid forward and the
SigLIP path), ``lse_backward.py`` / ``sigmoid.py`` (which passes run), ``_common.py`` (jit
helpers), ``_launch.py`` (host helpers, grid plans), ``_config.py`` (per-architecture tiles),
``_autotune.py`` (``MMLOSS_TRITON_AUTOTUNE=1``).

Contract: x (N, D), y (M, D) of one dtype among fp32/fp16/bf16 (fp64 raises TypeError: use the
torch or reference backend), any strides, any D ≥ 1; outputs fp32, gradients in the dtypes of
the inputs they belong to. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``. No launch
reads a device value (no host synchronisation). GEMM-equivalents (2·N·M·D FLOPs each), with s
the D slices of an owner pass (1 while D fits one program's accumulators: 512 columns for
fp16/bf16 on sm_90, 256 for fp32 and on sm_80; see benchmarks/gpu/README.md):

- similarity_lse forward, rows and columns together: 1;
- similarity_lse backward: 2·(s + 1) deterministic (two owner passes, no atomics); with
  deterministic=False s + 2 (one pass, dy by fp32 atomics) when that is fewer;
- pairwise_sigmoid forward 1, backward as similarity_lse's;
- pairwise_sigmoid_sum (the SigLIP loss) with gradients: 2·(s + 1) deterministic (dx formed in
  the forward pass), s + 2 with deterministic=False; without gradients 1.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._spec import PairSpec
from ._launch import check_supported, device_guard
from .lse_backward import lse_gradients
from .lse_forward import lse_statistics
from .sigmoid import sigmoid_gradients, sigmoid_rows, sigmoid_sum

__all__ = [
    "pairwise_sigmoid_backward",
    "pairwise_sigmoid_forward",
    "pairwise_sigmoid_sum",
    "similarity_lse_backward",
    "similarity_lse_forward",
]


def similarity_lse_forward(spec: PairSpec, rows: bool, cols: bool):
    """(row LSE (N,) fp32 or empty, column LSE (M,) fp32 or empty) over allowed pairs; −inf for
    a row/column with none. One pass for both; O(P·(N + M)) fp32 workspace."""
    check_supported(spec)
    with device_guard(spec.x.device):
        return lse_statistics(spec, rows, cols)


def similarity_lse_backward(spec: PairSpec, grad_row: Optional[torch.Tensor], grad_col: Optional[torch.Tensor],
                            row_lse: torch.Tensor, col_lse: torch.Tensor, needs):
    """(dx, dy, dscale, dbias) of ⟨grad_row, row_lse⟩ + ⟨grad_col, col_lse⟩; None where not needed."""
    check_supported(spec)
    with device_guard(spec.x.device):
        return lse_gradients(spec, grad_row, grad_col, row_lse, col_lse, needs)


def pairwise_sigmoid_forward(spec: PairSpec) -> torch.Tensor:
    """(N,) fp32 per-row Σ_j softplus(−z_ij·L_ij)."""
    check_supported(spec)
    with device_guard(spec.x.device):
        return sigmoid_rows(spec)


def pairwise_sigmoid_backward(spec: PairSpec, grad: torch.Tensor, needs):
    """(dx, dy, dscale, dbias) of ⟨grad, per-row sums⟩; None where not needed."""
    check_supported(spec)
    with device_guard(spec.x.device):
        return sigmoid_gradients(spec, grad, needs)


def pairwise_sigmoid_sum(spec: PairSpec, needs):
    """(total 0-d fp32, dx, dy, dscale, dbias): the SigLIP path, gradients of the total formed
    during the forward passes (None where not needed)."""
    check_supported(spec)
    with device_guard(spec.x.device):
        return sigmoid_sum(spec, needs)
