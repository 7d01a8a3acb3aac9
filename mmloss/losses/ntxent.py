"""NT-Xent module (docs/losses.md §4), lightly's ``NTXentLoss`` call style ``forward(out0, out1)``,
with lightly's memory bank as module state (no math here; ``mmloss.functional.ntxent``).

Like every self-supervised module (supcon, dcl, dhel, multiview, hcl), it L2-normalises inside,
computes the rank-local loss by default (``distributed=None``, like lightly's
``gather_distributed=False``) and accepts ``backend=`` and ``check_finite=`` (True: ``forward``
raises a ValueError naming an input that holds NaN/Inf; by default they propagate, as in torch).
``distributed="auto"`` (gather under a process group of world size > 1; a collective call: every
rank of the group must call forward) or ``"gather"`` computes the exact loss of the global batch
(``mmloss.functional.ssl_common``, "Distributed"), with ``group=`` and ``uniform_shards=``;
"ring" raises a ValueError (the SSL losses have no ring form).
"""
from __future__ import annotations

import torch

from .. import _validation as V
from .. import distributed as D
from ..functional.ntxent import ntxent_loss
from ..functional.ssl_common import check_temperature
from ._base import LossModule

Tensor = torch.Tensor


def _memory_bank_shape(size) -> tuple[int, ...]:
    """lightly's ``memory_bank_size`` rules: 0 disables the bank; otherwise a (num_features, dim)
    pair of non-negative integers (a bare positive integer lacks the feature dimension)."""
    if isinstance(size, bool):
        raise TypeError(f"memory_bank_size must be 0 or a (num_features, dim) tuple, got {size!r}")
    shape = (size,) if isinstance(size, int) else tuple(size)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in shape):
        raise TypeError(f"memory_bank_size must hold integers, got {size!r}")
    if any(v < 0 for v in shape):
        raise ValueError(f"Illegal memory bank size {size}, all entries must be non-negative.")
    if isinstance(size, int) and size > 0:
        raise ValueError(
            f"Memory bank size 'memory_bank_size={size}' does not specify the feature dimension. "
            f"Set it with 'memory_bank_size=({size}, dim)', or pass 0 to disable the memory bank."
        )
    if shape != (0,) and len(shape) != 2:
        raise ValueError(
            f"Illegal memory bank size {size}, expected a (num_features, dim) tuple, or 0 to "
            "disable the memory bank."
        )
    return shape


def distributed_from_lightly(gather_distributed, distributed):
    """The ``distributed`` mode of a module with lightly's ``gather_distributed`` flag: True means
    lightly's ``gather_distributed and world_size() > 1``, i.e. "auto" (gather under a process
    group of world size > 1, the local loss in a single process), unless ``distributed`` is given."""
    if V.check_bool("gather_distributed", gather_distributed) and distributed is None:
        return "auto"
    return distributed


class NTXentLoss(LossModule):
    """NT-Xent / SimCLR (docs/losses.md §4), lightly's ``NTXentLoss(temperature=0.5,
    memory_bank_size=0, gather_distributed=False)`` call style: ``loss(out0, out1)`` returns the
    0-d mean over the 2N anchors.

    ``memory_bank_size=(K, D)`` turns on lightly's memory bank (MoCo form): a (K, D) fp32 buffer
    ``bank`` of unit rows, initialised from the global RNG exactly as lightly does
    (``normalize(randn(K, D))``), and a ``bank_ptr`` buffer (both non-persistent, as lightly's).
    The loss then uses only view-0 anchors against their positive and the bank as it was before
    the call (``ntxent_loss(..., memory_bank=)``); afterwards the normalised ``out1`` rows are
    enqueued: written at ``bank_ptr``, and a batch that reaches the end of the bank fills it up
    to the end, drops its remaining rows and resets the pointer to 0 (lightly's ring rule).
    Update rule: lightly updates when ``out0.requires_grad``; mmloss additionally requires
    training mode (the project's convention for stateful losses) unless the module was built
    with ``update_state_in_eval=True``. ``memory_bank_size=0`` (default) is plain NT-Xent.

    Distributed: rank-local by default (``distributed=None``, lightly's
    ``gather_distributed=False``). ``gather_distributed=True`` is lightly's flag, which gathers
    when the world size is > 1: it sets ``distributed="auto"`` (unless ``distributed`` is given);
    ``distributed="gather"`` insists on a process group. Gathering, forward is a collective call
    (every rank of ``group`` must make it) and returns the exact NT-Xent of the global batch
    (``ntxent_loss(distributed=...)``: value global, gradient W × this rank's share, so DDP's
    average is the single-process gradient; lightly returns each rank's own mean). With the
    memory bank, the loss is each rank's anchors against the bank, reduced globally, and the
    gathered ``out1`` rows of every rank are enqueued (lightly's rule), so banks that start equal
    on every rank (same seed) stay equal.
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size=0, gather_distributed: bool = False, *,
                 backend: str = "auto", distributed=None, group=None, uniform_shards: bool = False,
                 check_finite: bool = False, update_state_in_eval: bool = False):
        super().__init__(backend=backend, distributed=distributed_from_lightly(gather_distributed, distributed),
                         group=group, check_finite=check_finite, uniform_shards=uniform_shards)
        self.temperature = check_temperature("temperature", temperature)
        self.gather_distributed = bool(gather_distributed)
        self.update_state_in_eval = V.check_bool("update_state_in_eval", update_state_in_eval)
        shape = _memory_bank_shape(memory_bank_size)
        self.memory_bank_size = shape if len(shape) == 2 else 0
        self.register_buffer("bank", torch.empty(shape, dtype=torch.float), persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        if len(shape) == 2:
            with torch.no_grad():
                self.bank = torch.nn.functional.normalize(torch.randn(shape).type_as(self.bank), dim=-1)

    @property
    def uses_memory_bank(self) -> bool:
        return self.memory_bank_size != 0 and self.memory_bank_size[0] > 0

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        """NT-Xent of two views, lightly's call (docs/losses.md §4).

        Args:
            out0, out1: (N, D) views (L2-normalised inside).

        Returns:
            The 0-d loss, fp32 (fp64 for fp64 inputs); with a memory bank, updates it (class
                docstring). Rank-local by default; gathering (a collective call) the global batch's
                loss on every rank (lightly returns each rank's own mean).
        """
        mode = self._resolve_distributed()
        options = dict(backend=self.backend, check_finite=self.check_finite, distributed=mode, group=self.group,
                       uniform_shards=self.uniform_shards)
        if not self.uses_memory_bank:
            return ntxent_loss(out0, out1, self.temperature, **options)
        negatives = self.bank.clone()      # the pre-update bank; the loss keeps it for backward
        loss = ntxent_loss(out0, out1, self.temperature, memory_bank=negatives.to(out0.device), **options)
        update = isinstance(out0, Tensor) and out0.requires_grad and (self.training or self.update_state_in_eval)
        if update:
            self._enqueue(out1, mode)
        return loss

    @torch.no_grad()
    def _enqueue(self, out1: Tensor, mode) -> None:
        """lightly's ``_dequeue_and_enqueue`` on the normalised rows of ``out1`` (gathered from
        every rank of the group, in rank order, when ``mode`` is "gather")."""
        batch = torch.nn.functional.normalize(out1.detach(), dim=1).to(self.bank.dtype)
        if mode == "gather":
            comm = D.Exchange.open(type(self).__name__, self.group, self.uniform_shards, out1=batch)
            batch = comm.gather("out1", batch)
        size = self.bank.shape[0]
        ptr = int(self.bank_ptr)
        rows = batch.shape[0]
        if ptr + rows >= size:
            self.bank[ptr:] = batch[: size - ptr]
            self.bank_ptr.zero_()
        else:
            self.bank[ptr:ptr + rows] = batch
            self.bank_ptr[0] = ptr + rows

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, memory_bank_size={self.memory_bank_size}, "
                f"{super().extra_repr()}")


__all__ = ["NTXentLoss"]
