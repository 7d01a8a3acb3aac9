"""Shared setup of the pytest-benchmark suites (``pytest benchmarks/``).

Sizes: CPU-sized by default (B = 1024, 4096, D = 512, fp32); GPU-sized when CUDA is present
(B = 16384, 65536, D = 768, bf16); ``MMLOSS_BENCH_SMOKE=1`` shrinks everything to tiny shapes so
CI can run every benchmark once in a few seconds:

    MMLOSS_BENCH_SMOKE=1 python -m pytest -q benchmarks --benchmark-disable-gc \\
        --benchmark-min-rounds=1 --benchmark-warmup=off

Each benchmarked call is one forward + backward with the inputs' gradients cleared first (so
gradients are allocated as in training) and, on the GPU, a synchronisation at the end.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from bench_support import DEVICE, DTYPE, SMOKE, sync  # noqa: E402


@pytest.fixture
def fwd_bwd(benchmark):
    """``fwd_bwd(fn, inputs, group)`` benchmarks one forward + backward of ``fn(inputs)`` and
    returns the last loss value (a float)."""

    def run(fn, inputs, group: str) -> float:
        benchmark.group = group
        benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE).replace("torch.", ""))
        last = {}

        def once():
            inputs.clear_grads()
            loss = fn(inputs)
            loss.backward()
            sync()
            last["loss"] = loss

        if SMOKE:
            # One call: smoke mode checks that every benchmark still runs, not how fast.
            benchmark.pedantic(once, rounds=1, iterations=1, warmup_rounds=0)
        else:
            benchmark(once)
        value = float(last["loss"].detach().float())
        inputs.clear_grads()
        return value

    return run
