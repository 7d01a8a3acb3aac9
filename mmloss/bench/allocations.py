"""Peak memory of one call from the CPU allocator's own events (the ``--nproc`` bench's CPU probe).

The torch profiler with ``profile_memory=True`` records every allocation and free of torch's CPU
allocator as an event with its signed size; replaying them in time order gives the exact,
repeatable peak of memory held above what existed before the call — unlike the resident-set
probe of ``measure.py``, it is not disturbed by other processes on the machine or by the
allocator's caching, so several ranks can measure at once. What it does not see: memory that
does not go through torch's allocator (gloo's internal buffers, Python objects).

The test suite's memory checks (``tests/memtrack.py``) and ``examples/grad_cache_memory.py`` use
this same function.
"""
from __future__ import annotations

from typing import Callable

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def peak_bytes_above_start(fn: Callable[[], object]) -> tuple[int, int]:
    """(peak, end) bytes held above what existed before ``fn()``, from the allocation events.

    ``fn`` runs once under the profiler (slower than without: time it separately)."""
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
