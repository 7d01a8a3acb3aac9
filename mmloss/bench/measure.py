"""Timing and peak memory of one forward + backward, as docs/design.md "Benchmarks and measurement" defines.

- Time: forward = the loss call, backward = ``loss.backward()``, total = both. CUDA events on the
  GPU; ``time.perf_counter`` on the CPU (every op there is synchronous). The caller clears the
  inputs' ``.grad`` before each call, outside the timed region, so every call allocates its
  gradients afresh.
- Peak memory above the inputs: the most memory held at any moment during one call, beyond what
  was held just before it — gradients and every temporary count. GPU:
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` before. CPU: the growth of the process's resident high-water mark
  (``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``) over ``VmRSS`` just before the call.
  That is exact only when freed blocks leave the resident set: glibc must serve large blocks with
  mmap (``MALLOC_MMAP_THRESHOLD_=65536``; ``python -m mmloss.bench`` re-executes itself with it,
  and ``ensure_mmap_threshold`` sets the same threshold through ``mallopt`` in-process).
- Floor: ``k`` products ``torch.mm(A (N×D), Bᵀ (D×M), out=C)`` into a preallocated output (row blocks
  of C when one N×M output would not fit), timed like a loss call.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

MMAP_THRESHOLD = 65536
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter number


@dataclass
class Stat:
    """Median, min and max of repeated measurements (seconds)."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values) -> "Stat":
        values = list(values)
        return cls(statistics.median(values), min(values), max(values))

    def contains(self, value: float) -> bool:
        return self.min <= value <= self.max


# ----------------------------------------------------------------------------- clocks


class CpuClock:
    def mark(self):
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        return end - start

    def synchronize(self) -> None:
        """CPU work is synchronous: there is nothing to wait for."""


class CudaClock:
    def __init__(self, device: torch.device):
        self.device = device

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        end.synchronize()
        return start.elapsed_time(end) / 1000.0

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


def clock_for(device: torch.device):
    return CudaClock(device) if device.type == "cuda" else CpuClock()


# ----------------------------------------------------------------------------- memory probes


def _proc_status() -> dict:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024  # kB
    return values


def ensure_mmap_threshold() -> str:
    """Make glibc return freed large blocks to the OS; returns how (for the report header)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}"
    if not sys.platform.startswith("linux"):
        return "not set (not Linux)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1:
            return f"mallopt(M_MMAP_THRESHOLD, {MMAP_THRESHOLD}) in-process"
    except (OSError, AttributeError):
        pass
    return "not set (CPU peaks may be underestimated)"


def available_cpu_bytes() -> int:
    """The machine's available memory (``MemAvailable`` of /proc/meminfo); 0 when unknown."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class CpuMemoryProbe:
    """Growth of the resident high-water mark during a call (Linux)."""

    def __init__(self):
        self.unavailable = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _proc_status()["VmHWM"]
        except (OSError, KeyError) as exc:
            self.unavailable = f"no /proc resident-set accounting here ({exc})"
        self._base = 0

    def begin(self) -> None:
        gc.collect(0)  # objects made while the timing loop disables gc are all in generation 0
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        self._base = _proc_status()["VmRSS"]

    def end(self) -> int:
        return max(0, _proc_status()["VmHWM"] - self._base)

    def available_bytes(self) -> int:
        return available_cpu_bytes()


class CudaMemoryProbe:
    def __init__(self, device: torch.device):
        self.device = device
        self.unavailable = None
        self._base = 0

    def begin(self) -> None:
        gc.collect(0)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._base = torch.cuda.memory_allocated(self.device)

    def end(self) -> int:
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.max_memory_allocated(self.device) - self._base)

    def available_bytes(self) -> int:
        free, _ = torch.cuda.mem_get_info(self.device)
        return free


def memory_probe_for(device: torch.device):
    if device.type == "cuda":
        return CudaMemoryProbe(device)
    if not sys.platform.startswith("linux"):
        probe = CpuMemoryProbe.__new__(CpuMemoryProbe)
        probe.unavailable = "CPU peak memory needs Linux /proc"
        return probe
    return CpuMemoryProbe()


def free_cached(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- one call


@dataclass
class CallResult:
    forward: float
    backward: float
    loss: torch.Tensor
    peak_bytes: Optional[int] = None

    @property
    def total(self) -> float:
        return self.forward + self.backward


def timed_call(fn: Callable, inputs, clock, probe=None) -> CallResult:
    """One forward + backward of ``fn(inputs)`` with fresh gradients; times in seconds.

    With ``probe``, also the peak memory above what was held just before the call (gradients
    included); the probe's reset happens before the clock starts."""
    inputs.clear_grads()
    if probe is not None:
        probe.begin()
    clock.synchronize()
    t0 = clock.mark()
    loss = fn(inputs)
    t1 = clock.mark()
    loss.backward()
    t2 = clock.mark()
    clock.synchronize()
    peak = probe.end() if probe is not None else None
    return CallResult(clock.seconds(t0, t1), clock.seconds(t1, t2), loss.detach(), peak)


# ----------------------------------------------------------------------------- the floor


class Floor:
    """``gemms`` products (N×D)·(D×M) into a preallocated output: the GEMMs an O((N+M)·D)-memory
    algorithm cannot avoid (docs/design.md). Row blocks keep C within ``max_output_bytes``."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, gemms: int, max_output_bytes: int):
        self.a, self.bt, self.gemms = a.contiguous(), b.t(), gemms
        n, m = a.shape[0], b.shape[0]
        row_bytes = m * a.element_size()
        self.block = max(1, min(n, max_output_bytes // max(row_bytes, 1)))
        self.out = torch.empty(self.block, m, dtype=a.dtype, device=a.device)

    @property
    def blocked(self) -> bool:
        return self.block < self.a.shape[0]

    def run(self) -> None:
        n = self.a.shape[0]
        for _ in range(self.gemms):
            for i0 in range(0, n, self.block):
                i1 = min(n, i0 + self.block)
                torch.mm(self.a[i0:i1], self.bt, out=self.out[: i1 - i0])

    def timed(self, clock) -> float:
        clock.synchronize()
        t0 = clock.mark()
        self.run()
        t1 = clock.mark()
        clock.synchronize()
        return clock.seconds(t0, t1)
