"""Deterministic peak-memory tracking for CPU tests (allocation events, not RSS or time).

The torch profiler with ``profile_memory=True`` records every allocation and free of the CPU
allocator as an event with its signed size; replaying them in time order gives the exact,
repeatable peak of memory held above what existed before the call.
"""
from __future__ import annotations

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def peak_bytes_above_start(fn) -> tuple[int, int]:
    """(peak, end) bytes held above what existed before ``fn()``, from the allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        pending.extend(node.children)
    current = peak = 0
    # alloc_size is negative for frees. Events with the same timestamp replay allocations first,
    # so a tie can only overstate the peak, never hide one.
    for _, size in sorted(events, key=lambda event: (event[0], -event[1])):
        current += size
        peak = max(peak, current)
    return peak, current


def grad_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad)
