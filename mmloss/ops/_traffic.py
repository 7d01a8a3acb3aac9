"""Counting what a code path does, for the performance model (``python -m mmloss.bench --model``).

A backend reports its work here while it runs: every GEMM (shape, operand and output dtypes),
every pass of an epilogue or elementwise kernel over memory (bytes read and written, at which
level of the memory hierarchy), and the workspace it allocates. Outside ``counting()`` the
calls are no-ops costing one list check, so the hot path pays nothing measurable.

Under ``counting(execute=False)`` a backend may be driven with ``meta`` tensors: GEMMs and
allocations keep their shapes, and kernel launches that cannot run on meta tensors are skipped
(``launches_enabled()`` says whether to launch). The counts then come from the code path itself
at sizes no CPU could run (N = M = 32768), not from a formula typed in beside it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

LEVELS = ("hbm", "l2")


@dataclass(frozen=True)
class Gemm:
    """One matrix product ``out (m×n) = a (m×k) · b (k×n)``: 2·m·n·k FLOPs on tensor cores when
    the operands are half precision (or fp32 under TF32)."""

    what: str
    m: int
    n: int
    k: int
    operand_dtype: torch.dtype
    out_dtype: torch.dtype
    times: float = 1.0

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k * self.times


@dataclass(frozen=True)
class Transfer:
    """Bytes an epilogue / elementwise pass reads and writes at one memory level."""

    what: str
    read: int
    write: int
    level: str = "hbm"
    atomic: bool = False


@dataclass
class Recorder:
    """What one counted call did. ``execute`` False: shapes only (kernels skipped)."""

    execute: bool = True
    gemms: list = field(default_factory=list)
    transfers: list = field(default_factory=list)
    workspace: dict = field(default_factory=dict)   # what → bytes (largest allocation seen)
    launches: int = 0

    def gemm_flops(self) -> float:
        return sum(g.flops for g in self.gemms)

    def bytes_at(self, level: str, atomic: Optional[bool] = None) -> int:
        return sum(t.read + t.write for t in self.transfers
                   if t.level == level and (atomic is None or t.atomic == atomic))

    def workspace_bytes(self) -> int:
        return sum(self.workspace.values())


_ACTIVE: list[Recorder] = []


@contextlib.contextmanager
def counting(execute: bool = True) -> Iterator[Recorder]:
    """Record every report made inside the block (nested blocks each see their own)."""
    rec = Recorder(execute=execute)
    _ACTIVE.append(rec)
    try:
        yield rec
    finally:
        _ACTIVE.remove(rec)


def active() -> Optional[Recorder]:
    return _ACTIVE[-1] if _ACTIVE else None


def launches_enabled() -> bool:
    """False inside ``counting(execute=False)``: the caller skips kernel launches."""
    return not _ACTIVE or _ACTIVE[-1].execute


def gemm(what: str, m: int, n: int, k: int, operand_dtype: torch.dtype, out_dtype: torch.dtype,
         times: float = 1.0) -> None:
    if _ACTIVE:
        _ACTIVE[-1].gemms.append(Gemm(what, int(m), int(n), int(k), operand_dtype, out_dtype, float(times)))


def transfer(what: str, read: int = 0, write: int = 0, level: str = "hbm", atomic: bool = False) -> None:
    if _ACTIVE:
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        _ACTIVE[-1].transfers.append(Transfer(what, int(read), int(write), level, atomic))


def tensor_bytes(*tensors: Optional[torch.Tensor]) -> int:
    """Bytes of the given tensors (None counts 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def workspace(what: str, nbytes: int) -> None:
    if _ACTIVE:
        rec = _ACTIVE[-1]
        rec.workspace[what] = max(rec.workspace.get(what, 0), int(nbytes))


def launch() -> None:
    """Count one kernel launch (launch gaps are part of the model's time)."""
    if _ACTIVE:
        _ACTIVE[-1].launches += 1
