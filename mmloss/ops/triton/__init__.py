"""The ``triton`` backend: fused Triton kernels for ``similarity_lse``, ``pairwise_sigmoid`` and
``similarity_kl`` (docs/design.md "Backends", docs/kernels.md). ``mmloss.ops._primitives`` calls the first
five functions below with a ``PairSpec`` (they mirror ``mmloss.ops.torch_chunked``);
``mmloss.ops._kl`` calls ``similarity_kl_forward`` / ``similarity_kl_backward`` with a ``KLSpec``
(they mirror ``mmloss.ops.torch_kl``).

Files: ``lse_forward.py`` (row and column statistics in one pass + deterministic combine),
``owner.py`` (the row-/column-owner kernel behind every backward, the sigmoid forward and the
SigLIP path), ``lse_backward.py`` / ``sigmoid.py`` (which passes run), ``kl_forward.py`` /
``kl_backward.py`` (the similarity_kl statistics, combine and owner kernels), ``_common.py`` (jit
helpers), ``_launch.py`` (host helpers, grid plans), ``_config.py`` (per-architecture tiles),
``_autotune.py`` (``MMLOSS_TRITON_AUTOTUNE=1``).

Two paths (``_path.choose_path``, env ``MMLOSS_TRITON_PATH=auto|fused|gemm``, read per call, so
forward and backward agree): "fused", the kernels above; "gemm" (``gemm_path.py``,
``gemm_path_kl.py``, kernels in ``epilogue.py``), blocks of the logit matrix by a GEMM with fp32
output (cuBLAS through ``torch.mm(..., out_dtype=torch.float32)`` on CUDA, a Triton GEMM where
that is missing, fp32 torch on CPU), one fused epilogue per block, gradients by two more GEMMs
with fp32 accumulation: 4 GEMM-equivalents for CLIP forward + backward, 3 for the SigLIP sum, a
workspace of ``MMLOSS_GEMM_PATH_BYTES`` (default 64 MiB) plus fp32 gradient accumulators for half
inputs. Both produce the same saved statistics. ``auto`` runs the fused kernels except for exact
("ieee") fp32 on a GPU, where the fused owner kernels spill registers.

Contract: x (N, D), y (M, D) of one dtype among fp32/fp16/bf16 (fp64 raises TypeError: use the
torch or reference backend; so does bf16 under TRITON_INTERPRET=1, whose tl.dot multiplies
bf16 bit patterns as integers), any strides, any D ≥ 1; outputs fp32, gradients in the dtypes of
the inputs they belong to. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``. No launch
reads a device value (no host synchronisation). GEMM-equivalents of the fused path (2·N·M·D
FLOPs each), with s the D slices of an owner pass (1 while D fits one program's accumulators:
512 columns for fp16/bf16 on sm_90, 256 for fp32 and on sm_80; see benchmarks/gpu/README.md):

- similarity_lse forward, rows and columns together: 1;
- similarity_lse backward: 2·(s + 1) deterministic (two owner passes, no atomics); with
  deterministic=False s + 2 (one pass, dy by fp32 atomics) when that is fewer;
- pairwise_sigmoid forward 1, backward as similarity_lse's;
- pairwise_sigmoid_sum (the SigLIP loss) with gradients: 2·(s + 1) deterministic (dx formed in
  the forward pass), s + 2 with deterministic=False; without gradients 1;
- similarity_kl (student D_s, teacher D_t, r = D_t/D_s; each pass recomputes both tiles):
  forward, rows and columns together, 1 + r (2 at D_t = D_s); backward (student only)
  2·(s·(1 + r) + 1) deterministic (6), s·(1 + r) + 2 with deterministic=False (4).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._spec import KLSpec, PairSpec
from ..._device import device_guard
from . import gemm_path, gemm_path_kl
from ._launch import check_supported
from ._path import choose_path
from .kl_backward import kl_gradients
from .kl_forward import kl_statistics
from .lse_backward import lse_gradients
from .lse_forward import lse_statistics
from .sigmoid import sigmoid_gradients, sigmoid_rows, sigmoid_sum

__all__ = [
    "pairwise_sigmoid_backward",
    "pairwise_sigmoid_forward",
    "pairwise_sigmoid_sum",
    "similarity_kl_backward",
    "similarity_kl_forward",
    "similarity_lse_backward",
    "similarity_lse_forward",
]


def similarity_lse_forward(spec: PairSpec, rows: bool, cols: bool):
    """(row LSE (N,) | (0,), column LSE (M,) | (0,), row stats (2, N) | (2, 0), column stats
    (2, M) | (2, 0), kept logits (0,)), fp32. LSEs over allowed pairs with the bias, −inf for a
    row/column with none. Stats, for this backend's backward only: ``[0]`` the max m2 of
    t2 = log2(e)·s·⟨x_i, y_j⟩ over allowed pairs (log2 units, no bias), ``[1]``
    lg2 = log2 Σ 2^(t2 − m2); (−inf, −inf) with no allowed pair; NaN propagates (lse_forward.py).
    One pass for both; O(P·(N + M)) fp32 workspace. This backend never keeps the logits
    (``spec.logit_budget`` is ignored): the kept-logits output is always empty."""
    check_supported(spec)
    with device_guard(spec.x.device):
        if choose_path(spec) == "gemm":
            stats = gemm_path.similarity_lse_forward(spec, rows, cols)
        else:
            stats = lse_statistics(spec, rows, cols)
        return (*stats, spec.x.new_empty(0, dtype=torch.float32))


def similarity_lse_backward(spec: PairSpec, grad_row: Optional[torch.Tensor], grad_col: Optional[torch.Tensor],
                            row_stats: torch.Tensor, col_stats: torch.Tensor, logits: Optional[torch.Tensor],
                            needs):
    """(dx, dy, dscale, dbias) of ⟨grad_row, row LSE⟩ + ⟨grad_col, col LSE⟩ from the forward's
    stats (recomputing every tile bit for bit as the forward formed it); None where not needed.
    ``logits`` (the kept-logits output, always empty from this backend's forward) is ignored."""
    check_supported(spec)
    with device_guard(spec.x.device):
        if choose_path(spec) == "gemm":
            return gemm_path.similarity_lse_backward(spec, grad_row, grad_col, row_stats, col_stats, needs)
        return lse_gradients(spec, grad_row, grad_col, row_stats, col_stats, needs)


def merge_lse_stats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The (2, K) statistics ``[m2, lg2]`` of the union of two column sets with statistics ``a``
    and ``b`` (the same rows): the larger log2-unit maximum, and each log2-sum re-based to it.
    (−inf, −inf) where neither set has an allowed pair; NaN propagates. Used to merge the blocks
    of a ring (mmloss.ring) before the backward recomputes each tile against the final record."""
    top = torch.maximum(a[0], b[0])
    empty = top == float("-inf")
    base = torch.where(empty, torch.zeros_like(top), top)
    total = torch.exp2(a[1] + a[0] - base) + torch.exp2(b[1] + b[0] - base)
    lg2 = torch.where(empty, top, torch.log2(total))
    return torch.stack((top, lg2))


def lse_from_stats(stats: torch.Tensor) -> torch.Tensor:
    """The natural-log LSE (without bias) a (2, K) ``[m2, lg2]`` record stands for: (m2 + lg2)·ln 2;
    −inf where no pair was allowed."""
    return (stats[0] + stats[1]) * math.log(2.0)


def pairwise_sigmoid_forward(spec: PairSpec) -> torch.Tensor:
    """(N,) fp32 per-row Σ_j softplus(−z_ij·L_ij)."""
    check_supported(spec)
    with device_guard(spec.x.device):
        if choose_path(spec) == "gemm":
            return gemm_path.pairwise_sigmoid_forward(spec)
        return sigmoid_rows(spec)


def pairwise_sigmoid_backward(spec: PairSpec, grad: torch.Tensor, needs):
    """(dx, dy, dscale, dbias) of ⟨grad, per-row sums⟩; None where not needed."""
    check_supported(spec)
    with device_guard(spec.x.device):
        if choose_path(spec) == "gemm":
            return gemm_path.pairwise_sigmoid_backward(spec, grad, needs)
        return sigmoid_gradients(spec, grad, needs)


def pairwise_sigmoid_sum(spec: PairSpec, needs):
    """(total 0-d fp32, dx, dy, dscale, dbias): the SigLIP path, gradients of the total formed
    during the forward passes (None where not needed)."""
    check_supported(spec)
    with device_guard(spec.x.device):
        if choose_path(spec) == "gemm":
            return gemm_path.pairwise_sigmoid_sum(spec, needs)
        return sigmoid_sum(spec, needs)


def _check_kl_supported(spec: KLSpec) -> None:
    """TypeError unless both feature pairs are fp32/fp16/bf16 (each pair one dtype; the student
    and the teacher may differ)."""
    check_supported(spec.student(), ("x_s", "y_s"))
    check_supported(spec.teacher(), ("x_t", "y_t"))


def similarity_kl_forward(spec: KLSpec, rows: bool, cols: bool, cross_entropy: bool):
    """(row (N,) | (0,), col (M,) | (0,), row_stats (4, N) | (4, 0), col_stats (4, M) | (4, 0)),
    fp32: per-row / per-column KL(p_t‖p_s) (H(p_t, p_s) with ``cross_entropy``) and the saved
    statistics ``[m_s, lg_s, m_t, lg_t]``: the student's and the teacher's max of
    log2(e)·s·⟨a, b⟩ and log2 Σ 2^(· − max), log2 units (kl_forward.py). One pass for both
    directions; O(P·(N + M)) fp32 workspace."""
    _check_kl_supported(spec)
    with device_guard(spec.x_s.device):
        if choose_path(spec) == "gemm":
            return gemm_path_kl.similarity_kl_forward(spec, rows, cols, cross_entropy)
        return kl_statistics(spec, rows, cols, cross_entropy)


def similarity_kl_backward(spec: KLSpec, grad_row: Optional[torch.Tensor], grad_col: Optional[torch.Tensor],
                           row_stats: torch.Tensor, col_stats: torch.Tensor, needs):
    """(dx_s, dy_s, dscale_s) of ⟨grad_row, row⟩ + ⟨grad_col, col⟩ from the forward's (4, ·)
    stats; None where not needed; the teacher gets no gradient."""
    _check_kl_supported(spec)
    with device_guard(spec.x_s.device):
        if choose_path(spec) == "gemm":
            return gemm_path_kl.similarity_kl_backward(spec, grad_row, grad_col, row_stats, col_stats, needs)
        return kl_gradients(spec, grad_row, grad_col, row_stats, col_stats, needs)
