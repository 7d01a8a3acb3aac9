"""Counts the torch operations of a code path as the GPU kernels they become, into the active
``mmloss.ops._traffic`` recorder, and the peak of the memory they allocate.

On a GPU every eager torch operation is one kernel that reads its tensor arguments and writes its
outputs (views are free; ``empty`` only allocates); ``mm``/``addmm``/``bmm`` are GEMMs. A
``TorchDispatchMode`` sees exactly those operations, after autograd and composite
decompositions, also on ``meta`` tensors — so the torch backend, and the torch glue of the Triton
paths (allocations, partial sums, dtype casts), are counted from the code that runs, not from a
formula typed beside it, and a change to that code changes the counts by itself.

Per operation: one launch; for a GEMM a ``_traffic.gemm`` (operand and output dtypes as given);
the bytes read (every tensor argument but an ``out=`` target and the target of a write-only op
such as ``fill_``) and written (every output) as ``_traffic.transfer`` records named
``"torch.<op>#<launch>: <detail>"`` (detail ``elementwise``; for a GEMM, ``logits`` for the
largest of its three matrices — the logit-sized block it writes or reads — and ``gemm operands``
for the others: features and accumulators). A tensor whose storage is at most ``l2_resident_bytes`` is counted at
the L2 level (vectors, the torch backend's cache-sized column-block scratch), larger ones at HBM.

Memory: ``peak_bytes`` is the most bytes that storages allocated inside the block held at once
(storages die with their last tensor or view); ``live_bytes`` what they hold now (so
``peak_bytes − live_bytes``, read while the results are still referenced, is the peak above
inputs and results — what a GPU run measures as "peak above inputs and gradients");
``transient_peak()`` the most bytes held at once by storages already freed (the workspace proper:
buffers that are not results). Inputs made before the block are not counted.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mmloss.ops import _traffic

# Allocations that launch no kernel.
_ALLOCATE_ONLY = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
# Operations that are not kernels (metadata, aliasing, host-side scalars).
_NO_KERNEL = {"detach", "lift_fresh", "alias", "_local_scalar_dense", "set_", "resize_", "is_same_size",
              "_unsafe_view", "_reshape_alias", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset"}
# Operations that overwrite their first argument without reading it.
_WRITE_ONLY_SELF = {"fill_", "zero_", "copy_", "uniform_", "normal_", "random_", "bernoulli_"}
_GEMMS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_"}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _storage_bytes(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return _nbytes(t)


class TorchOpCounter(TorchDispatchMode):
    """``with TorchOpCounter(l2_resident_bytes=...) as c:`` — see the module docstring. Reports go
    to ``_traffic.active()`` (nothing is recorded outside ``_traffic.counting()``); memory is
    tracked either way."""

    def __init__(self, l2_resident_bytes: int = 0):
        super().__init__()
        self.l2_resident_bytes = int(l2_resident_bytes)
        self.live_bytes = 0
        self.peak_bytes = 0
        self._events: list = []   # (token, ±bytes) in allocation / release order
        self._freed: set = set()

    # ------------------------------------------------------------------ memory

    def _free(self, token: int, nbytes: int) -> None:
        self.live_bytes -= nbytes
        self._freed.add(token)
        self._events.append((token, -nbytes))

    def _track(self, t: torch.Tensor) -> None:
        nbytes = _storage_bytes(t)
        token = len(self._events)
        self._events.append((token, nbytes))
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(t, self._free, token, nbytes)

    def transient_peak(self) -> int:
        """The most bytes held at once by allocations that have been freed by now."""
        live = peak = 0
        for token, delta in self._events:
            if token in self._freed:
                live += delta
                peak = max(peak, live)
        return peak

    # ------------------------------------------------------------------ dispatch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        name = schema.name.split("::")[-1]
        if func.is_view or name in _NO_KERNEL:
            return out
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        fresh = not any(r.alias_info is not None for r in schema.returns)
        if fresh:
            for t in outputs:
                self._track(t)
        if name in _ALLOCATE_ONLY:
            return out
        self._report(name, args, kwargs, outputs)
        return out

    def _level(self, t: torch.Tensor) -> str:
        return "l2" if _storage_bytes(t) <= self.l2_resident_bytes else "hbm"

    def _report(self, name: str, args, kwargs, outputs) -> None:
        rec = _traffic.active()
        if rec is None:
            return
        _traffic.launch()
        kid = f"torch.{name}#{rec.launches}"
        targets = {id(t) for t in tree_flatten(kwargs.get("out"))[0] if isinstance(t, torch.Tensor)}
        inputs = [t for t in tree_flatten((args, {k: v for k, v in kwargs.items() if k != "out"}))[0]
                  if isinstance(t, torch.Tensor) and id(t) not in targets]
        if name in _WRITE_ONLY_SELF and args and isinstance(args[0], torch.Tensor):
            inputs = [t for t in inputs if t is not args[0]]
        largest = None
        if name in _GEMMS:
            a, b = (args[1], args[2]) if name.startswith(("addmm", "baddbmm")) else (args[0], args[1])
            batch = a.shape[0] if a.dim() == 3 else 1
            m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
            out_dtype = outputs[0].dtype if outputs else a.dtype
            _traffic.gemm(f"{kid}: {name}", m, n, k, a.dtype, out_dtype, times=batch)
            largest = max(inputs + outputs, key=lambda t: t.numel(), default=None)
        moved: dict = {}
        for t, side in [(t, 0) for t in inputs] + [(t, 1) for t in outputs]:
            if largest is None:
                detail = "elementwise"
            else:
                detail = "logits" if t is largest else "gemm operands"
            slot = moved.setdefault((detail, self._level(t)), [0, 0])
            slot[side] += _nbytes(t)
        for (detail, level), (read, write) in moved.items():
            if read or write:
                _traffic.transfer(f"{kid}: {detail}", read=read, write=write, level=level)
