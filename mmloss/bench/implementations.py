"""What the sweep measures: an ``Implementation`` is one row source — an mmloss backend or a peer —
that knows which losses it implements, how to build the callable the clock times, and how much
memory it would need (so the sweep can skip what would not fit)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

import mmloss

from . import peers
from .cases import Inputs, LossCase


@dataclass
class Implementation:
    """One row source: an mmloss backend or a peer."""

    label: str
    kind: str  # "mmloss" | "peer"
    key: str  # backend name or peer name
    supports: Callable[[LossCase], Optional[str]]  # None when it implements the loss, else why not
    factory: Callable[[LossCase, Inputs], Callable[[Inputs], torch.Tensor]]
    estimate: Callable[[LossCase, int, torch.dtype], Optional[int]]


def budget_label(nbytes: int) -> str:
    """80MiB, 1.5GiB, 4096B: a logit budget as the tables print it."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):g}{unit}"
    return f"{nbytes}B"


def mmloss_implementation(backend: str, logit_budget: Optional[int] = None) -> Implementation:
    """An mmloss backend; with ``logit_budget`` (bytes) every call runs under
    ``mmloss.logit_budget(logit_budget)`` (None: whatever ``MMLOSS_LOGIT_BUDGET`` says), and a
    non-zero budget is part of the label, e.g. ``mmloss[torch,keep≤80MiB]``."""
    def supports(case: LossCase):
        return None if case.mmloss_function() is not None else f"mmloss.{case.mmloss_name} is not in this build"

    def factory(case: LossCase, inputs: Inputs):
        fn = case.mmloss_function()
        if logit_budget is None:
            return lambda inp: case.call(fn, inp, backend)

        def call(inp: Inputs):
            with mmloss.logit_budget(logit_budget):
                return case.call(fn, inp, backend)

        return call

    def estimate(case: LossCase, batch: int, dtype):
        rows, cols = case.similarity_shape(batch)
        if backend == "reference":
            return 6 * rows * cols * max(torch.empty((), dtype=dtype).element_size(), 4)
        if logit_budget and rows * cols * 4 <= logit_budget:
            return rows * cols * 8  # the kept logits (fp32; fp64 inputs keep 8 bytes each) plus a workspace
        return None  # O((N+M)·D) plus a bounded workspace

    label = f"mmloss[{backend}]" if not logit_budget else f"mmloss[{backend},keep≤{budget_label(logit_budget)}]"
    return Implementation(label, "mmloss", backend, supports, factory, estimate)


def peer_implementation(name: str) -> Implementation:
    peer = peers.PEERS[name]

    def supports(case: LossCase):
        return None if case.name in peer.losses else f"{name} has no {case.name} loss"

    return Implementation(
        peer.label, "peer", name, supports,
        lambda case, inputs: peers.make_call(name, case, inputs),
        lambda case, batch, dtype: peers.estimate_bytes(name, case, batch, dtype),
    )
