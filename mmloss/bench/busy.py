"""Competing CPU load for a measurement (``python -m mmloss.bench --busy N``).

A training step rarely has the CPU to itself: DataLoader workers, logging and other jobs hold
cores while the loss runs, and an implementation that splits its work into many small parallel
regions pays for every descheduled thread at every barrier. ``CompetingLoad(n)`` starts ``n``
processes that each keep one core busy — single-threaded float64 matrix products (numpy, one
BLAS thread) or, without numpy, a pure-Python arithmetic loop — for as long as the block runs,
and stops them afterwards (also on errors and Ctrl-C). Each process exits by itself when its
parent disappears, so none outlives a killed benchmark.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

# The child: report "ready" once the loop is about to start, then spin until stdin closes
# (the parent exited or stopped it) — checked between products, every few milliseconds.
_SPIN = r"""
import os, sys, threading
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
try:
    import numpy as np
    a = np.random.default_rng(0).standard_normal((192, 192))
    def step(a=a):
        a @ a
    kind = "numpy"
except ImportError:
    def step():
        v = 1.0
        for _ in range(20000):
            v = v * 1.0000001 + 1e-9
    kind = "python"
print("ready " + kind, flush=True)
while not done.is_set():
    step()
"""

_ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "VECLIB_MAXIMUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1"}


class CompetingLoad:
    """Context manager: ``processes`` single-threaded busy processes while the block runs."""

    def __init__(self, processes: int):
        if processes < 0:
            raise ValueError(f"the number of busy processes must be ≥ 0, got {processes}")
        self.processes = processes
        self.children: list = []
        self.kind: Optional[str] = None  # "numpy" or "python" once started

    def __enter__(self) -> "CompetingLoad":
        env = dict(os.environ, **_ONE_THREAD)
        try:
            for _ in range(self.processes):
                self.children.append(subprocess.Popen(
                    [sys.executable, "-c", _SPIN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL, env=env, text=True))
            for child in self.children:  # every one spinning before the clock starts
                line = child.stdout.readline().split()
                if not line or line[0] != "ready":
                    raise RuntimeError(f"a busy process failed to start (exit status {child.poll()})")
                self.kind = line[1]
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pids(self) -> list:
        return [child.pid for child in self.children]

    def running(self) -> int:
        """How many of the started processes are still alive."""
        return sum(child.poll() is None for child in self.children)

    def stop(self) -> None:
        """Close each child's stdin (it exits after its current product); terminate and then kill
        any that have not exited within a few seconds."""
        for child in self.children:
            try:
                child.stdin.close()
            except OSError:
                pass
        for child in self.children:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.terminate()
                try:
                    child.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
            if child.stdout is not None:
                child.stdout.close()
        self.children = []

    def describe(self) -> str:
        if not self.processes:
            return "none"
        what = ("numpy float64 192×192 products, one BLAS thread" if self.kind == "numpy"
                else "pure-Python arithmetic loop")
        return f"{self.processes} competing busy process{'es' if self.processes > 1 else ''} ({what}) " \
               "during the measurement"
