"""Deterministic peak-memory tracking for CPU tests (allocation events, not RSS or time).

The torch profiler with ``profile_memory=True`` records every allocation and free of the CPU
allocator; its memory timeline replays them in order, so the peak is exact and repeatable.
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action


def peak_bytes_above_start(fn) -> tuple[int, int]:
    """(peak, end) bytes held above what existed before ``fn()``, from the allocation timeline."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.PREEXISTING:
            continue
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak, current


def grad_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad)
