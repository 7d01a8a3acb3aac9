"""DCL and DCLW modules (docs/losses.md §6), lightly's ``forward(out0, out1)`` call style (no math
here; ``mmloss.functional.dcl``).

L2-normalised inside, rank-local, ``backend=`` and ``check_finite=``: as ``mmloss.losses.ntxent``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..functional.dcl import check_weight_fn, dcl_loss, dclw_loss
from ..functional.ssl_common import check_positive_float, check_temperature
from ._base import LossModule

Tensor = torch.Tensor


class DCLLoss(LossModule):
    """Decoupled contrastive loss (docs/losses.md §6): ``DCLLoss(temperature=0.1, weight_fn=None)(out0,
    out1)``; ``weight_fn(a, b)`` as in lightly (called with the normalised views)."""

    def __init__(self, temperature: float = 0.1,
                 weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None, *,
                 backend: str = "auto", distributed=None, group=None,
                 check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite)
        check_weight_fn(weight_fn)
        self.temperature = check_temperature("temperature", temperature)
        self.weight_fn = weight_fn

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        self._require_local()
        return dcl_loss(out0, out1, self.temperature, self.weight_fn, backend=self.backend,
                          check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, weight_fn={self.weight_fn}, {super().extra_repr()}"


class DCLWLoss(LossModule):
    """Weighted DCL (docs/losses.md §6): ``DCLWLoss(temperature=0.1, sigma=0.5)(out0, out1)``."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5, *, backend: str = "auto",
                 distributed=None, group=None,
                 check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite)
        self.temperature = check_temperature("temperature", temperature)
        self.sigma = check_positive_float("sigma", sigma)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        self._require_local()
        return dclw_loss(out0, out1, self.temperature, self.sigma, backend=self.backend,
                           check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, sigma={self.sigma}, {super().extra_repr()}"


__all__ = ["DCLLoss", "DCLWLoss"]
