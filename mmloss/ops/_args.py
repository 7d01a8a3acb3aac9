"""Argument rules shared by the public primitive wrappers (``similarity_lse``,
``pairwise_sigmoid``, ``similarity_kl``, ``similarity_topk``): how a Python or tensor scalar
reaches an op, which pairs are marked, chunk sizes and the determinism default."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from ._backends import deterministic_default
from ._spec import MARKS

Tensor = torch.Tensor


class _HostScalar(torch.autograd.Function):
    """A CPU 0-d tensor as a 0-d tensor of its dtype on ``device`` without a host→device copy:
    the host reads the value (a CPU tensor, so no device synchronisation) and the device tensor
    is filled with it as a kernel argument (``torch.full``), which a CUDA graph can capture — a
    ``.to(device)`` copy from pageable host memory cannot be captured. The gradient returns to
    the CPU tensor, on its device and in its dtype (a device→host copy in the backward: the
    gradient of a CPU parameter has to reach the CPU)."""

    @staticmethod
    def forward(ctx, value: Tensor, device: torch.device) -> Tensor:
        ctx.source = value.device
        return torch.full((), value.item(), dtype=value.dtype, device=device)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.to(ctx.source), None


def host_scalar_on(value: Tensor, device: torch.device) -> Tensor:
    """``value`` (a 0-d CPU tensor) as a 0-d tensor on ``device`` that routes its gradient back
    (``_HostScalar``); under ``torch.compile`` the plain copy, which the compiled graph owns."""
    if torch.compiler.is_compiling():
        return value.to(device)
    return _HostScalar.apply(value, device)


def split_scalar(value, x: Tensor) -> tuple[Optional[Tensor], float]:
    """A validated scale or bias as the op's (tensor | None, float) pair: a tensor travels as a
    tensor, a number as the float. A 0-d CPU tensor (validated) with features elsewhere, e.g. a
    ``logit_scale`` parameter kept on the CPU, follows the features without a host→device copy
    (``host_scalar_on``: CUDA-graph safe) and still receives its gradient on the CPU."""
    if isinstance(value, Tensor):
        if value.device != x.device:
            value = host_scalar_on(value, x.device)
        return value, 0.0
    return None, float(value)


def scale_and_bias(x: Tensor, scale, bias) -> tuple[Optional[Tensor], float, Optional[Tensor], float]:
    """``(scale, scale_value, bias, bias_value)`` as the ops take them (no bias → 0.0)."""
    return (*split_scalar(scale, x), *split_scalar(0.0 if bias is None else bias, x))


def check_marks(kind: str, marks: str, offset, x_labels, y_labels, n: int, m: int, device):
    """Validated (x_labels, y_labels) for ``exclude=`` / ``positives=`` (``kind``), as int64 when
    given; labels are required with "same_label" and refused otherwise."""
    V.check_choice(kind, marks, MARKS)
    V.check_int("offset", offset)
    if marks == "same_label":
        if x_labels is None or y_labels is None:
            raise ValueError(f"{kind}='same_label' needs both x_labels and y_labels")
        return V.check_labels("x_labels", x_labels, n, device), V.check_labels("y_labels", y_labels, m, device)
    if x_labels is not None or y_labels is not None:
        raise ValueError(f"x_labels / y_labels are only used with {kind}='same_label', got {kind}={marks!r}")
    return None, None


def check_chunk_size(chunk_size, name: str = "chunk_size") -> int:
    """Rows per chunk: None → 0 (the backend picks from the workspace budget), else an int ≥ 1."""
    if chunk_size is None:
        return 0
    chunk_size = V.check_int(name, chunk_size)
    if chunk_size < 1:
        raise ValueError(f"{name} must be ≥ 1, got {chunk_size}")
    return chunk_size


def resolve_deterministic(deterministic) -> bool:
    """Deterministic kernels by default (``MMLOSS_DETERMINISTIC=0`` changes the default) and
    always under ``torch.use_deterministic_algorithms(True)``."""
    if torch.are_deterministic_algorithms_enabled():
        return True
    if deterministic is None:
        return _deterministic_default()
    return V.check_bool("deterministic", deterministic)


@torch.compiler.assume_constant_result
def _deterministic_default() -> bool:
    return deterministic_default()


def requires_grad(t) -> bool:
    """True when autograd will ask for a gradient of ``t`` in this call."""
    return isinstance(t, Tensor) and t.requires_grad and torch.is_grad_enabled()
