"""The problem descriptions every backend receives: ``PairSpec`` (one logit matrix; the
similarity_lse and pairwise_sigmoid primitives) and ``KLSpec`` (a student and a teacher matrix;
similarity_kl).

A backend computes statistics of the logits ``L_ij = s_i·⟨x_i, y_j⟩ + b`` over "marked" pairs:
for ``similarity_lse`` marked pairs are *excluded*, for ``pairwise_sigmoid`` they are the
*positives*. Marks are one of ``"none"``, ``"diagonal"`` (``j == i + offset``) or
``"same_label"`` (``x_labels[i] == y_labels[j]``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

Tensor = torch.Tensor

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
    logit_budget: int = 0              # bytes similarity_lse may keep its N×M logits in (0: never)

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

    @property
    def keeps_logits(self) -> bool:
        """Whether ``similarity_lse`` keeps its logits for the backward (``keeps_logits``)."""
        return keeps_logits(self.n, self.m, self.compute_dtype, self.logit_budget)


@dataclass(frozen=True)
class KLSpec:
    """The problem every ``similarity_kl`` backend receives.

    Student logits ``L^s = s_s·x_s·y_sᵀ`` (x_s (N, D_s), y_s (M, D_s)) and teacher logits
    ``L^t = s_t·x_t·y_tᵀ`` (x_t (N, D_t), y_t (M, D_t)); D_s and D_t may differ. Each pair has
    one dtype (fp16/bf16/fp32, or fp64 for all four); statistics are fp32 (fp64 for fp64).
    Scales are scalars: a 0-d tensor, or ``None`` with the value in ``*_value``. Only the
    student receives gradients (teacher tensors arrive detached).
    """

    x_s: Tensor
    y_s: Tensor
    x_t: Tensor
    y_t: Tensor
    scale_s: Optional[Tensor]
    scale_s_value: float
    scale_t: Optional[Tensor]
    scale_t_value: float
    chunk_size: int = 0                # rows per chunk for chunked backends; 0 = from the budget
    deterministic: bool = True         # False allows atomics where a backend has them

    @property
    def n(self) -> int:
        return self.x_s.shape[0]

    @property
    def m(self) -> int:
        return self.y_s.shape[0]

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.x_s.dtype == torch.float64 else torch.float32

    def student(self, chunk_size: Optional[int] = None) -> PairSpec:
        """The student's logits as a ``PairSpec`` (no bias, no marks)."""
        return PairSpec(self.x_s, self.y_s, self.scale_s, self.scale_s_value, None, 0.0, "none", 0,
                        None, None, self.chunk_size if chunk_size is None else chunk_size,
                        self.deterministic)

    def teacher(self, chunk_size: Optional[int] = None) -> PairSpec:
        """The teacher's logits as a ``PairSpec`` (no bias, no marks)."""
        return PairSpec(self.x_t, self.y_t, self.scale_t, self.scale_t_value, None, 0.0, "none", 0,
                        None, None, self.chunk_size if chunk_size is None else chunk_size,
                        self.deterministic)


def keeps_logits(n, m, compute_dtype: torch.dtype, budget: int) -> bool:
    """True when the (N, M) compute-dtype logits of one call fit ``budget`` bytes:
    ``0 < N·M·elem ≤ budget``. Then ``similarity_lse``'s forward returns them (its saved
    ``logits`` output) and the backward forms its gradient from them instead of recomputing the
    GEMM (3 GEMM-equivalents instead of 4). Every backend and the fake kernel decide with this
    one rule (n and m may be symbolic under torch.compile: the comparison becomes a guard)."""
    elem = 8 if compute_dtype == torch.float64 else 4
    size = n * m * elem
    return budget > 0 and 0 < size and size <= budget


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
