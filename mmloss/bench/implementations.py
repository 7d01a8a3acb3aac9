"""What the sweep measures: an ``Implementation`` is one row source — an mmloss backend or a peer —
that knows which losses it implements, how to build the callable the clock times, and how much
memory it would need (so the sweep can skip what would not fit)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

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


def mmloss_implementation(backend: str) -> Implementation:
    def supports(case: LossCase):
        return None if case.mmloss_function() is not None else f"mmloss.{case.mmloss_name} is not in this build"

    def factory(case: LossCase, inputs: Inputs):
        fn = case.mmloss_function()
        return lambda inp: case.call(fn, inp, backend)

    def estimate(case: LossCase, batch: int, dtype):
        if backend != "reference":
            return None  # O((N+M)·D) plus a bounded workspace
        rows, cols = case.similarity_shape(batch)
        return 6 * rows * cols * max(torch.empty((), dtype=dtype).element_size(), 4)

    return Implementation(f"mmloss[{backend}]", "mmloss", backend, supports, factory, estimate)


def peer_implementation(name: str) -> Implementation:
    peer = peers.PEERS[name]

    def supports(case: LossCase):
        return None if case.name in peer.losses else f"{name} has no {case.name} loss"

    return Implementation(
        peer.label, "peer", name, supports,
        lambda case, inputs: peers.make_call(name, case, inputs),
        lambda case, batch, dtype: peers.estimate_bytes(name, case, batch, dtype),
    )
