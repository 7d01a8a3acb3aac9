"""Self-supervised family: LOSSES.md §4–§8 and §12 as ``nn.Module`` wrappers (no math here).

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


class NTXentLoss(LossModule):
    """NT-Xent / SimCLR (LOSSES.md §4): ``NTXentLoss(temperature=0.5)(out0, out1)``, lightly's
    call style (no memory bank). Returns the mean over the 2N anchors."""

    def __init__(self, temperature: float = 0.5, *, backend: str = "auto", distributed=None, group=None,
                 check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite)
        self.temperature = _temperature("temperature", temperature)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        self._require_local()
        return F.ntxent_loss(out0, out1, self.temperature, backend=self.backend,
                             check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, {super().extra_repr()}"


class SupConLoss(LossModule):
    """Supervised contrastive loss (LOSSES.md §5): ``SupConLoss(temperature=0.1,
    base_temperature=None)(embeddings, labels=None)`` with (n, D) + labels (pytorch-metric-learning)
    or (B, V, D) [+ (B,) labels] (HobbitLong)."""

    def __init__(self, temperature: float = 0.1, base_temperature: Optional[float] = None, *,
                 backend: str = "auto", distributed=None, group=None,
                 check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite)
        self.temperature = _temperature("temperature", temperature)
        self.base_temperature = (None if base_temperature is None
                                 else F._positive_float("base_temperature", base_temperature))

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        self._require_local()
        return F.supcon_loss(embeddings, labels, self.temperature, self.base_temperature,
                             backend=self.backend, check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
                f"{super().extra_repr()}")


class DCLLoss(LossModule):
    """Decoupled contrastive loss (LOSSES.md §6): ``DCLLoss(temperature=0.1, weight_fn=None)(out0,
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
    """Weighted DCL (LOSSES.md §6): ``DCLWLoss(temperature=0.1, sigma=0.5)(out0, out1)``."""

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
    """Decoupled hyperspherical energy loss (LOSSES.md §7): ``DHELLoss(temperature=0.3,
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
    """MV-InfoNCE (LOSSES.md §8): ``MultiViewInfoNCELoss(temperature=0.1,
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
    """MV-DHEL (LOSSES.md §8): ``MultiViewDHELLoss(temperature=0.1)(views)``."""

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
    """HCL (LOSSES.md §12): ``HardNegativeLoss(temperature=0.5, tau_plus=0.1, beta=1.0)(out0, out1)``."""

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
