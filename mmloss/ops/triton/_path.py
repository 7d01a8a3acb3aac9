"""Which implementation of the ``triton`` backend runs a call: ``"fused"`` (the owner / statistics
kernels, ``lse_forward.py`` … ``kl_backward.py``: O((N + M)·D) memory, no N×M workspace) or
``"gemm"`` (``gemm_path.py``: blocks of the logit matrix by a GEMM with fp32 output, one fused
epilogue per block, gradients by two more GEMMs; a bounded workspace, ``MMLOSS_GEMM_PATH_BYTES``).

The knob is the environment variable ``MMLOSS_TRITON_PATH`` = ``auto`` (default) | ``fused`` |
``gemm``, read at every call (forward and backward decide from the same spec and environment, so
they agree; the two paths' saved statistics share one format either way). ``auto`` keeps the
fused kernels except for fp32 inputs whose ``tl.dot`` precision is exact ("ieee", torch's
default "highest" fp32 matmul precision) on a GPU target: the fused owner kernels spill
registers there (an FMA product per tile), so those calls take the gemm path. CPU tensors (the
Triton interpreter, where nothing is compiled and nothing spills) keep the fused kernels under
``auto``; ``meta`` tensors (compile-only capture of GPU launches) count as a GPU target.
"""
from __future__ import annotations

import os
from typing import Union

import torch

from .._spec import KLSpec, PairSpec
from ._launch import dot_precision

PATH_ENV = "MMLOSS_TRITON_PATH"
PATHS = ("auto", "fused", "gemm")


def requested_path() -> str:
    """The validated value of ``MMLOSS_TRITON_PATH`` ("auto" when unset or empty)."""
    value = os.environ.get(PATH_ENV, "").strip().lower() or "auto"
    if value not in PATHS:
        raise ValueError(f"{PATH_ENV} must be one of {', '.join(PATHS)}, got {os.environ.get(PATH_ENV)!r}")
    return value


def _operands(spec: Union[PairSpec, KLSpec]) -> tuple[torch.device, tuple[torch.dtype, ...]]:
    if isinstance(spec, KLSpec):
        return spec.x_s.device, (spec.x_s.dtype, spec.x_t.dtype)
    return spec.x.device, (spec.x.dtype,)


def choose_path(spec: Union[PairSpec, KLSpec]) -> str:
    """"fused" or "gemm" for this call (module docstring)."""
    value = requested_path()
    if value != "auto":
        return value
    device, dtypes = _operands(spec)
    exact_fp32 = torch.float32 in dtypes and dot_precision(torch.float32) == "ieee"
    if exact_fp32 and device.type != "cpu":
        return "gemm"
    return "fused"
