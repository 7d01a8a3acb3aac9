"""The problem description every backend receives.

A backend computes statistics of the logits ``L_ij = s_i·⟨x_i, y_j⟩ + b`` over "marked" pairs:
for ``similarity_lse`` marked pairs are *excluded*, for ``pairwise_sigmoid`` they are the
*positives*. Marks are one of ``"none"``, ``"diagonal"`` (``j == i + offset``) or
``"same_label"`` (``x_labels[i] == y_labels[j]``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

MARKS = ("none", "diagonal", "same_label")


@dataclass(frozen=True)
class PairSpec:
    x: torch.Tensor                    # (N, D) features, any strides
    y: torch.Tensor                    # (M, D) features, same dtype as x
    scale: Optional[torch.Tensor]      # 0-d or (N,) floating tensor; None → scale_value
    scale_value: float
    bias: Optional[torch.Tensor]       # 0-d floating tensor; None → bias_value
    bias_value: float
    marks: str                         # one of MARKS
    offset: int
    x_labels: Optional[torch.Tensor]   # (N,) integers when marks == "same_label"
    y_labels: Optional[torch.Tensor]   # (M,) integers when marks == "same_label"
    chunk_size: int = 0                # rows per chunk for chunked backends; 0 = from the budget
    deterministic: bool = True         # False allows atomics in kernels where that is faster

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def m(self) -> int:
        return self.y.shape[0]

    @property
    def compute_dtype(self) -> torch.dtype:
        """fp32 for fp16/bf16/fp32 inputs; fp64 inputs (gradcheck) stay fp64."""
        return torch.float64 if self.x.dtype == torch.float64 else torch.float32

    @property
    def per_row_scale(self) -> bool:
        return self.scale is not None and self.scale.dim() == 1


def scale_vector(spec: PairSpec, rows: slice) -> Optional[torch.Tensor]:
    """The (rows,) per-row scale in the compute dtype, or None for a scalar scale."""
    if not spec.per_row_scale:
        return None
    return spec.scale[rows].to(spec.compute_dtype)


def scalar_value(t: Optional[torch.Tensor], value: float, dtype: torch.dtype, device):
    """A scalar scale or bias as a 0-d compute-dtype tensor (or a Python float when given so)."""
    if t is None:
        return value
    return t.to(device=device, dtype=dtype)
