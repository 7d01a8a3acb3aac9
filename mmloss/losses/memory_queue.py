"""MemoryQueue: the FIFO ring buffer of MoCo / ALBEF / TCL keys, and the refusal of non-finite
state writes shared by the stateful modules."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from .. import distributed as D

__all__ = ["MemoryQueue"]


def refuse_non_finite(name: str, t: torch.Tensor, refusal: str) -> Optional[torch.Tensor]:
    """Stateful losses never store NaN/Inf (README, "Guarantees"). Eager CPU tensors raise
    ValueError naming ``name`` here and return None; elsewhere (accelerators, compiling) a
    device-side assert is queued (no host synchronisation) and the 0-d "all finite" flag is
    returned for the caller to gate its write on."""
    finite = torch.isfinite(t).all()
    if V.value_checks_enabled(finite):
        if not bool(finite):
            bad = tuple(int(i) for i in (~torch.isfinite(t)).nonzero()[0])
            raise ValueError(f"{name} {tuple(t.shape)} has non-finite entries ({name}[{', '.join(map(str, bad))}] "
                             f"= {float(t[bad])}): {refusal}")
        return None
    torch._assert_async(finite, f"{name} has non-finite entries: {refusal}")
    return finite


class MemoryQueue(torch.nn.Module):
    """FIFO ring buffer of keys (MoCo / ALBEF / TCL negatives), saved in ``state_dict``.

    ``MemoryQueue(size, dim, *, init="random", dtype=torch.float32, device=None, generator=None,
    distributed=None, group=None, uniform_shards=False)``

    Buffers: ``queue`` (size, dim), ``ptr`` (next slot) and ``filled`` (keys written so far,
    capped at size). ``init="random"`` fills the queue with unit-norm Gaussian rows as MoCo and
    TCL do (every slot is a key from the start); ``init="empty"`` starts with no keys. The
    queue follows module casts and moves (``.double()``, ``.half()``, ``.to(...)``), keys held
    by ``enqueue(..., defer=True)`` included: they take the queue's dtype and device when written.

    - ``enqueue(keys, defer=False)``: writes (B, dim) keys (detached, cast to the queue's dtype
      and device) at ``ptr``, wrapping around; B > size keeps the last ``size`` rows. Runs on
      the device without a host synchronisation. ``defer=True`` holds the keys until the next
      read of ``keys``, ``flush()`` or ``state_dict()``: a loss may then score the queue
      without copying it even though its keys are replaced in the same step (the graph keeps a
      view of the buffer; writing into it before backward would be an in-place error).
      Keys with NaN/Inf (after the cast) are refused: ValueError naming ``keys`` for eager CPU
      tensors; elsewhere a device-side assert, and the write is skipped.
    - ``keys``: the current keys, a (detached) view — the whole buffer, or with ``init="empty"``
      the first ``filled`` rows until it is full (one host read of ``filled`` per access).
      Storage order, not age order (losses do not depend on key order).
    - ``keys_with(positives)``: ``cat([positives, keys])``, the key matrix of ``InfoNCELoss``
      (default targets pair query i with key i).
    - ``len(queue)``: the number of keys, deferred ones included (capped at size).

    Distributed (opt-in, as the losses' ``extra_keys`` expect: a queue identical on every rank,
    never gathered by the loss): ``distributed="auto"`` (gather when a process group of world
    size > 1 is initialised) or ``"gather"`` makes ``enqueue`` a collective call — every rank of
    ``group`` must make it, with its own keys (any row count, zero included; one small
    exchange of the counts unless ``uniform_shards=True``) — and every rank writes the
    concatenation of all ranks' keys in rank order, so the queues stay identical. The first
    such call also adopts the group's first rank's queue, pointer and fill count (one
    broadcast; new buffers, so a graph that scored the old queue is untouched): ranks seeded
    differently start identical too. ``None`` (default): no collective, the queue holds what
    this rank enqueues (TripleContrastiveLoss's queues, which are rank-local like its loss).
    "ring" has no meaning for a queue: ValueError.
    """

    def __init__(self, size: int, dim: int, *, init: str = "random", dtype: torch.dtype = torch.float32,
                 device=None, generator: Optional[torch.Generator] = None, distributed=None, group=None,
                 uniform_shards: bool = False):
        super().__init__()
        D.check_mode(distributed)
        if distributed == "ring":
            raise ValueError("MemoryQueue: distributed='ring' has no meaning for a queue; use 'gather' or 'auto' "
                             "(every rank enqueues the keys of every rank) or None (rank-local)")
        self.distributed, self.group = distributed, group
        self.uniform_shards = V.check_bool("uniform_shards", uniform_shards)
        self._synchronised = False  # has a gathered enqueue adopted the first rank's state yet?
        size, dim = V.check_int("size", size), V.check_int("dim", dim)
        if size < 1 or dim < 1:
            raise ValueError(f"MemoryQueue needs size ≥ 1 and dim ≥ 1, got size={size}, dim={dim}")
        self.init = V.check_choice("init", init, ("random", "empty"))
        if not isinstance(dtype, torch.dtype) or dtype not in V.FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if init == "random":
            keys = torch.randn(size, dim, generator=generator, dtype=torch.float32)
            keys = torch.nn.functional.normalize(keys, dim=1)
            filled = size
        else:
            keys = torch.zeros(size, dim)
            filled = 0
        self.register_buffer("queue", keys.to(device=device, dtype=dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("filled", torch.full((), filled, dtype=torch.long, device=device))
        # (keys, "all finite" flag or None) held by enqueue(..., defer=True)
        self._pending: list[tuple[torch.Tensor, Optional[torch.Tensor]]] = []
        self.register_state_dict_pre_hook(_flush_before_saving)
        self.register_load_state_dict_post_hook(_drop_pending_after_loading)

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    @property
    def dim(self) -> int:
        return self.queue.shape[1]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, defer: bool = False) -> None:
        """Write (B, dim) keys at ``ptr``, wrapping around; B > size keeps the last ``size`` rows.
        With ``distributed`` "auto"/"gather", a collective call: every rank writes all ranks' keys.

        Args:
            keys: (B, dim), B ≥ 0; detached and cast to the queue's dtype and device.
            defer: True holds them until the next read of ``keys``, ``flush()`` or ``state_dict()``.

        Raises:
            ValueError: keys holding NaN/Inf, on eager CPU tensors (elsewhere a device-side assert
                and the write is skipped).
        """
        V.check_features("keys", keys, min_rows=0)
        if keys.shape[1] != self.dim:
            raise ValueError(f"keys must have {self.dim} columns like the queue, got shape {tuple(keys.shape)}")
        V.check_bool("defer", defer)
        keys = keys.detach().to(device=self.queue.device, dtype=self.queue.dtype)
        keys = self._gathered(keys)
        # Gathered keys are checked after the gather: every rank then refuses the same keys.
        finite = refuse_non_finite("keys", keys, "MemoryQueue refuses to store them")
        if defer:
            self._pending.append((keys.clone(), finite))
            return
        self.flush()
        self._write(keys, finite)

    def _gathered(self, keys: torch.Tensor) -> torch.Tensor:
        """Every rank's keys in rank order (``distributed`` resolved to "gather"), else ``keys``."""
        if D.resolve_mode("MemoryQueue", self.distributed, self.group) != "gather":
            return keys
        comm = D.Exchange.open("MemoryQueue", self.group, self.uniform_shards, keys=keys)
        if not self._synchronised:
            self._adopt_first_rank_state(comm.group)
        if comm.shards["keys"].total == 0:
            return keys
        return comm.gather("keys", keys)

    def _adopt_first_rank_state(self, group) -> None:
        """Replace queue, ptr and filled by the group's first rank's (one broadcast each)."""
        dist = torch.distributed
        source = 0 if group is None else dist.get_global_rank(group, 0)
        self.flush()
        for name in ("queue", "ptr", "filled"):
            state = getattr(self, name).clone()
            dist.broadcast(state, src=source, group=group)
            setattr(self, name, state)
        self._synchronised = True

    @torch.no_grad()
    def flush(self) -> None:
        """Write the keys held by ``enqueue(..., defer=True)``."""
        pending, self._pending = self._pending, []
        for keys, finite in pending:
            self._write(keys, finite)

    def _write(self, keys: torch.Tensor, finite: Optional[torch.Tensor]) -> None:
        """Write ``keys`` at ``ptr``; with a ``finite`` flag (device path) only if it is True."""
        count = keys.shape[0]
        if count == 0:
            return
        if count > self.size:
            keys, count = keys[-self.size:], self.size
        keys = keys.to(device=self.queue.device, dtype=self.queue.dtype)  # the module may have been cast since
        slots = (self.ptr + torch.arange(count, device=self.queue.device)) % self.size
        advance = count
        if finite is not None:
            finite = finite.to(self.queue.device)
            keys = torch.where(finite, keys, self.queue.index_select(0, slots))
            advance = finite.to(torch.long) * count
        self.queue.index_copy_(0, slots, keys)
        self.ptr.add_(advance).remainder_(self.size)
        self.filled.add_(advance).clamp_(max=self.size)

    @property
    def keys(self) -> torch.Tensor:
        """The current keys: a detached view, (size, dim) or, with ``init="empty"``, (filled, dim)."""
        self.flush()
        if self.init == "random":
            return self.queue.detach()
        return self.queue.detach()[: int(self.filled)]

    def keys_with(self, positives: torch.Tensor) -> torch.Tensor:
        """``cat([positives, keys])`` in the positives' dtype (a copy of the queue)."""
        V.check_features("positives", positives)
        keys = self.keys
        V.check_same_dim("positives", positives, "queue", keys)
        return torch.cat([positives, keys.to(device=positives.device, dtype=positives.dtype)])

    def forward(self) -> torch.Tensor:
        """The current keys, as ``keys`` (the queues of docs/losses.md §2 and §10).

        Returns:
            A detached view of the queue in its dtype: (size, dim), or with ``init="empty"`` the first
                ``filled`` rows until it is full. Deferred keys are written first; never a collective.
        """
        return self.keys

    def __len__(self) -> int:
        if self.init == "random":
            return self.size
        return min(self.size, int(self.filled) + sum(keys.shape[0] for keys, _ in self._pending))

    def extra_repr(self) -> str:
        shown = "" if self.distributed is None else f", distributed={self.distributed!r}"
        return f"size={self.size}, dim={self.dim}, init={self.init!r}" + shown


def _flush_before_saving(queue: "MemoryQueue", prefix: str, keep_vars: bool) -> None:
    queue.flush()


def _drop_pending_after_loading(queue: "MemoryQueue", incompatible_keys) -> None:
    queue._pending = []  # deferred keys belonged to the replaced state
    queue._synchronised = False  # a loaded state is adopted from the first rank at the next gathered enqueue

