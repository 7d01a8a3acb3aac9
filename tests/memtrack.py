"""Deterministic peak-memory tracking for CPU tests (allocation events, not RSS or time).

The implementation is the package's own probe, ``mmloss.bench.allocations`` (the torch
profiler's allocation and free events replayed in time order: the exact, repeatable peak held
above what existed before the call); this module re-exports it for the tests and adds the byte
count of gradients.
"""
from __future__ import annotations

import torch

from mmloss.bench.allocations import peak_bytes_above_start

__all__ = ["grad_bytes", "peak_bytes_above_start"]


def grad_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad)
