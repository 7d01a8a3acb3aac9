"""Self-supervised family: docs/losses.md §4–§8 and §12 as ``nn.Module`` wrappers (no math here).

Call styles: lightly's ``forward(out0, out1)`` for NT-Xent, DCL/DCLW, DHEL and HCL;
pytorch-metric-learning's ``forward(embeddings, labels=None)`` for SupCon (which also takes
HobbitLong's (B, V, D) tensor); ``forward(views)`` for the multi-view losses. Every module
L2-normalises inside, computes the rank-local loss (``distributed=None``, like lightly's
``gather_distributed=False``) and accepts ``backend=`` and ``check_finite=`` (True: ``forward``
raises a ValueError naming an input that holds NaN/Inf; by default they propagate, as in torch).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import _validation as V
from ..functional import ssl as F
from ._base import LossModule

Tensor = torch.Tensor


_temperature = F._temperature


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

    ``gather_distributed=True`` (lightly's cross-GPU negatives) raises NotImplementedError until
    mmloss gathers across ranks; the loss is rank-local (``distributed=None``).
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size=0, gather_distributed: bool = False, *,
                 backend: str = "auto", distributed=None, group=None, check_finite: bool = False,
                 update_state_in_eval: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite)
        self.temperature = _temperature("temperature", temperature)
        if V.check_bool("gather_distributed", gather_distributed):
            raise NotImplementedError(
                "NTXentLoss(gather_distributed=True): mmloss cannot gather negatives across ranks yet. "
                "Use gather_distributed=False (the rank-local loss, which is what lightly computes "
                "in a single process)"
            )
        self.gather_distributed = False
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
        """``out0``, ``out1``: (N, D) views (L2-normalised inside). Returns the 0-d loss, fp32
        (fp64 for fp64 inputs). With a memory bank, updates it (see the class docstring)."""
        self._require_local()
        if not self.uses_memory_bank:
            return F.ntxent_loss(out0, out1, self.temperature, backend=self.backend,
                                 check_finite=self.check_finite)
        negatives = self.bank.clone()      # the pre-update bank; the loss keeps it for backward
        loss = F.ntxent_loss(out0, out1, self.temperature, memory_bank=negatives.to(out0.device),
                             backend=self.backend, check_finite=self.check_finite)
        update = isinstance(out0, Tensor) and out0.requires_grad and (self.training or self.update_state_in_eval)
        if update:
            self._enqueue(out1)
        return loss

    @torch.no_grad()
    def _enqueue(self, out1: Tensor) -> None:
        """lightly's ``_dequeue_and_enqueue`` on the normalised rows of ``out1``."""
        batch = torch.nn.functional.normalize(out1.detach(), dim=1).to(self.bank.dtype)
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


class SupConLoss(LossModule):
    """Supervised contrastive loss (docs/losses.md §5): ``SupConLoss(temperature=0.1,
    base_temperature=None)(embeddings, labels=None, indices_tuple=None, ref_emb=None,
    ref_labels=None)`` — pytorch-metric-learning's forward signature — with (n, D) + labels
    (PML) or (B, V, D) [+ (B,) labels] (HobbitLong). ``ref_emb``/``ref_labels``: anchors from
    ``embeddings``, positives and negatives from the reference set (``supcon_loss``);
    ``indices_tuple`` from a miner raises NotImplementedError."""

    def __init__(self, temperature: float = 0.1, base_temperature: Optional[float] = None, *,
                 backend: str = "auto", distributed=None, group=None,
                 check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite)
        self.temperature = _temperature("temperature", temperature)
        self.base_temperature = (None if base_temperature is None
                                 else F._positive_float("base_temperature", base_temperature))

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, indices_tuple=None,
                ref_emb: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None) -> Tensor:
        """Returns the 0-d loss, fp32 (fp64 for fp64 inputs); see ``mmloss.supcon_loss``."""
        self._require_local()
        return F.supcon_loss(embeddings, labels, self.temperature, self.base_temperature,
                             ref_emb=ref_emb, ref_labels=ref_labels, indices_tuple=indices_tuple,
                             backend=self.backend, check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
                f"{super().extra_repr()}")


class DCLLoss(LossModule):
    """Decoupled contrastive loss (docs/losses.md §6): ``DCLLoss(temperature=0.1, weight_fn=None)(out0,
    out1)``; ``weight_fn(a, b)`` as in lightly (called with the normalised views)."""

    def __init__(self, temperature: float = 0.1,
                 weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None, *,
                 backend: str = "auto", distributed=None, group=None,
                 check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite)
        if weight_fn is not None and not callable(weight_fn):
            raise TypeError(f"weight_fn must be callable or None, got {type(weight_fn).__name__}")
        self.temperature = _temperature("temperature", temperature)
        self.weight_fn = weight_fn

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        self._require_local()
        return F.dcl_loss(out0, out1, self.temperature, self.weight_fn, backend=self.backend,
                          check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, weight_fn={self.weight_fn}, {super().extra_repr()}"


class DCLWLoss(LossModule):
    """Weighted DCL (docs/losses.md §6): ``DCLWLoss(temperature=0.1, sigma=0.5)(out0, out1)``."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5, *, backend: str = "auto",
                 distributed=None, group=None,
                 check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite)
        self.temperature = _temperature("temperature", temperature)
        self.sigma = F._positive_float("sigma", sigma)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        self._require_local()
        return F.dclw_loss(out0, out1, self.temperature, self.sigma, backend=self.backend,
                           check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, sigma={self.sigma}, {super().extra_repr()}"


class DHELLoss(LossModule):
    """Decoupled hyperspherical energy loss (docs/losses.md §7): ``DHELLoss(temperature=0.3,
    include_augs=True)(out0, out1)``."""

    def __init__(self, temperature: float = 0.3, include_augs: bool = True, *, backend: str = "auto",
                 distributed=None, group=None,
                 check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite)
        self.temperature = _temperature("temperature", temperature)
        self.include_augs = V.check_bool("include_augs", include_augs)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        self._require_local()
        return F.dhel_loss(out0, out1, self.temperature, self.include_augs, backend=self.backend,
                           check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, include_augs={self.include_augs}, {super().extra_repr()}"


class MultiViewInfoNCELoss(LossModule):
    """MV-InfoNCE (docs/losses.md §8): ``MultiViewInfoNCELoss(temperature=0.1,
    same_view_negatives=True)(views)`` with views (V, M, D) or a list of V (M, D)."""

    def __init__(self, temperature: float = 0.1, same_view_negatives: bool = True, *, backend: str = "auto",
                 distributed=None, group=None,
                 check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite)
        self.temperature = _temperature("temperature", temperature)
        self.same_view_negatives = V.check_bool("same_view_negatives", same_view_negatives)

    def forward(self, views) -> Tensor:
        self._require_local()
        return F.mv_infonce_loss(views, self.temperature, self.same_view_negatives, backend=self.backend,
                                 check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, same_view_negatives={self.same_view_negatives}, "
                f"{super().extra_repr()}")


class MultiViewDHELLoss(LossModule):
    """MV-DHEL (docs/losses.md §8): ``MultiViewDHELLoss(temperature=0.1)(views)``."""

    def __init__(self, temperature: float = 0.1, *, backend: str = "auto", distributed=None, group=None,
                 check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite)
        self.temperature = _temperature("temperature", temperature)

    def forward(self, views) -> Tensor:
        self._require_local()
        return F.mv_dhel_loss(views, self.temperature, backend=self.backend, check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, {super().extra_repr()}"


class HardNegativeLoss(LossModule):
    """HCL (docs/losses.md §12): ``HardNegativeLoss(temperature=0.5, tau_plus=0.1, beta=1.0)(out0, out1)``."""

    def __init__(self, temperature: float = 0.5, tau_plus: float = 0.1, beta: float = 1.0, *,
                 backend: str = "auto", distributed=None, group=None,
                 check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite)
        self.temperature = _temperature("temperature", temperature)
        self.tau_plus = V.check_fraction("tau_plus", tau_plus)
        self.beta = F._concentration(beta)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        self._require_local()
        return F.hcl_loss(out0, out1, self.temperature, self.tau_plus, self.beta, backend=self.backend,
                          check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, tau_plus={self.tau_plus}, beta={self.beta}, "
                f"{super().extra_repr()}")


__all__ = [
    "DCLLoss",
    "DCLWLoss",
    "DHELLoss",
    "HardNegativeLoss",
    "MultiViewDHELLoss",
    "MultiViewInfoNCELoss",
    "NTXentLoss",
    "SupConLoss",
]
