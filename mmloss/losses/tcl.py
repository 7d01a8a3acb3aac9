"""§10 TripleContrastiveLoss module (docs/losses.md): TCL's temperature and key queues; the math
is ``mmloss.functional.tcl_loss``."""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from .. import _validation as V
from ..functional.tcl import tcl_loss, tcl_weights
from ._base import LossModule
from .memory_queue import MemoryQueue, refuse_non_finite

__all__ = ["TripleContrastiveLoss"]


class TripleContrastiveLoss(LossModule):
    """TCL's contrastive objective (CMA + IMC + LMI, docs/losses.md §10) with its temperature and queues.

    ``TripleContrastiveLoss(embed_dim=None, queue_size=0, *, alpha=0.4, temperature=0.07,
    temperature_bounds=(0.001, 0.5), learn_temperature=True, weights=None,
    update_state_in_eval=False, check_finite=False, distributed=None, backend="auto")``

    - ``temperature`` is a parameter (shared by every term), clamped in place to
      ``temperature_bounds`` at the start of each training forward, as TCL does.
    - ``queue_size > 0`` (needs ``embed_dim``) creates ``image_queue`` / ``text_queue``
      (MemoryQueue, random unit-norm init like TCL). Each forward scores the current queues and
      then, in training mode, enqueues this batch's momentum features; the write is deferred to
      the next read, so the queue is never copied (TCL clones it). Under ``torch.compile`` the
      queues are copied and written at once instead. TCL's queue size is 65536.
      Momentum features with NaN/Inf are never enqueued (ValueError naming them on eager CPU
      tensors; a device-side assert and a skipped write elsewhere).
    - State changes only in training mode (torch's convention): under ``.eval()`` forward
      neither clamps the parameter in place (it scores with the clamped value) nor enqueues,
      unless the module was built with ``update_state_in_eval=True`` (TCL's code has no modes).
    - ``weights``: term name → weight (default 1/6 each), see ``mmloss.functional.tcl_loss``.
    - ``check_finite=True``: forward raises ValueError naming the input that holds NaN/Inf (a
      host synchronisation on GPUs; skipped while compiling).
    - Distributed: no distributed form in mmloss yet. ``distributed="gather"`` / ``"ring"``, or
      ``"auto"`` under a process group of world size > 1, make forward raise a RuntimeError
      before any state changes (never a silent rank-local loss); ``distributed=None`` (the
      default) computes the rank-local loss, with rank-local queues.

    ``forward(image_features, text_features, image_features_m, text_features_m,
    image_locals_m=None, text_locals_m=None, image_local_mask=None, text_local_mask=None,
    alpha=None, return_terms=False)``: global features (B, D); momentum locals (B, P, D);
    ``alpha`` overrides the constructor's (TCL ramps it up during the first epoch).
    """

    def __init__(self, embed_dim: Optional[int] = None, queue_size: int = 0, *, alpha: float = 0.4,
                 temperature: float = 0.07, temperature_bounds=(0.001, 0.5), learn_temperature: bool = True,
                 weights: Optional[Mapping] = None, update_state_in_eval: bool = False, check_finite: bool = False,
                 distributed=None, group=None, backend: str = "auto"):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite)
        self.alpha = V.check_fraction("alpha", alpha, upper_open=False)
        pair = tuple(temperature_bounds) if isinstance(temperature_bounds, (tuple, list)) else ()
        try:
            bounds = tuple(V.check_real("temperature_bounds", b) for b in pair)
        except TypeError:  # reported below with the whole argument
            bounds = ()
        if len(bounds) != 2:
            raise TypeError(f"temperature_bounds must be a pair of floats, got {temperature_bounds!r}")
        if not 0.0 < bounds[0] <= bounds[1] or not all(map(math.isfinite, bounds)):
            raise ValueError(f"temperature_bounds must satisfy 0 < low ≤ high < inf, got {bounds}")
        # The clamped temperature divides fp32 logits: both bounds and their reciprocals must be
        # finite and nonzero in fp32.
        for b in bounds:
            V.check_scalar("temperature_bounds", float(b), positive=True, dtype=torch.float32, reciprocal=True)
        self.temperature_bounds = (float(bounds[0]), float(bounds[1]))
        V.check_scalar("temperature", temperature, positive=True)
        self.temperature = torch.nn.Parameter(torch.tensor(float(temperature)),
                                              requires_grad=V.check_bool("learn_temperature", learn_temperature))
        self.weights = tcl_weights(weights)
        self.update_state_in_eval = V.check_bool("update_state_in_eval", update_state_in_eval)
        queue_size = V.check_int("queue_size", queue_size)
        if queue_size < 0:
            raise ValueError(f"queue_size must be ≥ 0, got {queue_size}")
        if queue_size > 0:
            if embed_dim is None:
                raise ValueError("TripleContrastiveLoss with queue_size > 0 needs embed_dim")
            self.image_queue = MemoryQueue(queue_size, embed_dim)
            self.text_queue = MemoryQueue(queue_size, embed_dim)
        else:
            self.image_queue = self.text_queue = None

    def forward(self, image_features, text_features, image_features_m, text_features_m, image_locals_m=None,
                text_locals_m=None, image_local_mask=None, text_local_mask=None, alpha: Optional[float] = None,
                return_terms: bool = False):
        """TCL's loss of one step (docs/losses.md §10); in training it also clamps and enqueues.

        Args:
            image_features, text_features: (B, D) online global features (receive gradients).
            image_features_m, text_features_m: (B, D) momentum features (no gradient; enqueued).
            image_locals_m, text_locals_m: optional (B, P, D) momentum locals (their LMI terms), with
                optional (B, P) masks image_local_mask, text_local_mask (nonzero = a real local).
            alpha: overrides the constructor's α. return_terms: also return the unweighted terms.

        Returns:
            The 0-d loss, fp32 (fp64 for fp64 inputs), or ``(loss, terms)``. No distributed form:
                a mode other than None under a process group raises a RuntimeError, state untouched.
        """
        self._require_local()
        update = self.training or self.update_state_in_eval
        if update:
            with torch.no_grad():
                self.temperature.clamp_(*self.temperature_bounds)
            temperature = self.temperature
        else:
            temperature = self.temperature.clamp(*self.temperature_bounds)
        queued = self.image_queue is not None
        # Compiled: score copies of the queues and write this batch's keys at once. Deferred keys
        # live in a Python list whose length dynamo guards on (empty on the first call, one
        # entry afterwards: a recompile), and a copy keeps the saved keys apart from the write.
        compiling = torch.compiler.is_compiling()
        image_queue = text_queue = None
        if queued:
            image_queue, text_queue = self.image_queue.keys, self.text_queue.keys
            if compiling:
                image_queue, text_queue = image_queue.clone(), text_queue.clone()
        out = tcl_loss(
            image_features, text_features, image_features_m, text_features_m, temperature,
            image_queue=image_queue, text_queue=text_queue,
            image_locals_m=image_locals_m, text_locals_m=text_locals_m, image_local_mask=image_local_mask,
            text_local_mask=text_local_mask, alpha=self.alpha if alpha is None else alpha,
            weights=self.weights, return_terms=return_terms, check_finite=self.check_finite, backend=self.backend,
        )
        if queued and update:
            pairs = (("image_features_m", image_features_m, self.image_queue),
                     ("text_features_m", text_features_m, self.text_queue))
            # Both checked before either queue is touched; naming the momentum features (eager
            # CPU) before a queue would refuse its "keys". Off that path each queue gates its own write.
            flags = [refuse_non_finite(name, feats.detach().to(queue.queue.dtype), "TCL does not enqueue them")
                     for name, feats, queue in pairs]
            for _, feats, queue in pairs:
                if None not in flags:  # device path: one bad side poisons both, so neither queue moves
                    feats = torch.where(flags[0] & flags[1].to(flags[0].device), feats.detach(), float("nan"))
                queue.enqueue(feats, defer=not compiling)
        return out

    def extra_repr(self) -> str:
        size = self.image_queue.size if self.image_queue is not None else 0
        return f"queue_size={size}, alpha={self.alpha}, " + super().extra_repr()
