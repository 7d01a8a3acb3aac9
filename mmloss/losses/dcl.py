"""DCL and DCLW modules (docs/losses.md §6), lightly's ``forward(out0, out1)`` call style (no math
here; ``mmloss.functional.dcl``).

L2-normalised inside, rank-local by default, ``backend=``, ``check_finite=`` and the distributed
options (``distributed=``, ``group=``, ``uniform_shards=``): as ``mmloss.losses.ntxent``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..functional.dcl import check_weight_fn, dcl_loss, dclw_loss
from ..functional.ssl_common import check_positive_float, check_temperature
from ._base import LossModule
from .ntxent import distributed_from_lightly

Tensor = torch.Tensor


class DCLLoss(LossModule):
    """Decoupled contrastive loss (docs/losses.md §6): ``DCLLoss(temperature=0.1, weight_fn=None,
    gather_distributed=False)(out0, out1)``, lightly's signature; ``weight_fn(a, b)`` as in lightly
    (called with the normalised views). ``gather_distributed=True``: lightly's flag, as in
    ``NTXentLoss`` (``distributed="auto"``); gathering, ``weight_fn`` sees the global batch
    (``dcl_loss``)."""

    def __init__(self, temperature: float = 0.1,
                 weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None, gather_distributed: bool = False,
                 *, backend: str = "auto", distributed=None, group=None, uniform_shards: bool = False,
                 check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed_from_lightly(gather_distributed, distributed),
                         group=group, check_finite=check_finite, uniform_shards=uniform_shards)
        check_weight_fn(weight_fn)
        self.temperature = check_temperature("temperature", temperature)
        self.weight_fn = weight_fn
        self.gather_distributed = bool(gather_distributed)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        """Decoupled contrastive loss of two views, lightly's call (docs/losses.md §6).

        Args:
            out0, out1: (N, D) views, N ≥ 2, fp16/bf16/fp32/fp64, L2-normalised inside.

        Returns:
            The 0-d loss, fp32 (fp64 for fp64 inputs). Rank-local by default; with
                ``distributed="auto"``/``"gather"`` (a collective call) the global batch's loss on every
                rank, ``weight_fn`` called on the global batch (lightly calls it on each rank's rows).
        """
        return dcl_loss(out0, out1, self.temperature, self.weight_fn, backend=self.backend,
                        check_finite=self.check_finite, distributed=self._resolve_distributed(), group=self.group,
                        uniform_shards=self.uniform_shards)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, weight_fn={self.weight_fn}, {super().extra_repr()}"


class DCLWLoss(LossModule):
    """Weighted DCL (docs/losses.md §6): ``DCLWLoss(temperature=0.1, sigma=0.5,
    gather_distributed=False)(out0, out1)``, lightly's signature; ``gather_distributed`` as in
    ``DCLLoss`` (gathering, the weights' softmax runs over the global batch: ``dclw_loss``)."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5, gather_distributed: bool = False, *,
                 backend: str = "auto", distributed=None, group=None, uniform_shards: bool = False,
                 check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed_from_lightly(gather_distributed, distributed),
                         group=group, check_finite=check_finite, uniform_shards=uniform_shards)
        self.temperature = check_temperature("temperature", temperature)
        self.sigma = check_positive_float("sigma", sigma)
        self.gather_distributed = bool(gather_distributed)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        """Weighted DCL of two views, lightly's call (docs/losses.md §6).

        Args:
            out0, out1: (N, D) views, N ≥ 2, fp16/bf16/fp32/fp64, L2-normalised inside.

        Returns:
            The 0-d loss, fp32 (fp64 for fp64 inputs). Rank-local by default; with
                ``distributed="auto"``/``"gather"`` (a collective call) the global batch's loss on every
                rank, the weights' softmax over the global batch (lightly: each rank's own).
        """
        return dclw_loss(out0, out1, self.temperature, self.sigma, backend=self.backend,
                         check_finite=self.check_finite, distributed=self._resolve_distributed(), group=self.group,
                         uniform_shards=self.uniform_shards)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, sigma={self.sigma}, {super().extra_repr()}"


__all__ = ["DCLLoss", "DCLWLoss"]
