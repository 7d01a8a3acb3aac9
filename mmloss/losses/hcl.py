"""HCL module (docs/losses.md §12), lightly's ``forward(out0, out1)`` call style (no math here;
``mmloss.functional.hcl``).

L2-normalised inside, rank-local by default, ``backend=``, ``check_finite=`` and the distributed
options (``distributed=``, ``group=``, ``uniform_shards=``): as ``mmloss.losses.ntxent``.
"""
from __future__ import annotations

import torch

from .. import _validation as V
from ..functional.hcl import check_concentration, hcl_loss
from ..functional.ssl_common import check_temperature
from ._base import LossModule

Tensor = torch.Tensor


class HardNegativeLoss(LossModule):
    """HCL (docs/losses.md §12): ``HardNegativeLoss(temperature=0.5, tau_plus=0.1, beta=1.0)(out0, out1)``."""

    def __init__(self, temperature: float = 0.5, tau_plus: float = 0.1, beta: float = 1.0, *,
                 backend: str = "auto", distributed=None, group=None, uniform_shards: bool = False,
                 check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite,
                         uniform_shards=uniform_shards)
        self.temperature = check_temperature("temperature", temperature)
        self.tau_plus = V.check_fraction("tau_plus", tau_plus)
        self.beta = check_concentration(beta)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        """Hard-negative, debiased contrastive loss of two views (docs/losses.md §12).

        Args:
            out0, out1: (N, D) views, N ≥ 2, fp16/bf16/fp32/fp64, L2-normalised inside.

        Returns:
            The 0-d loss, fp32 (fp64 for fp64 inputs). Rank-local by default; with
                ``distributed="auto"``/``"gather"`` (a collective call) the global batch's loss on every rank.
        """
        return hcl_loss(out0, out1, self.temperature, self.tau_plus, self.beta, backend=self.backend,
                        check_finite=self.check_finite, distributed=self._resolve_distributed(), group=self.group,
                        uniform_shards=self.uniform_shards)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, tau_plus={self.tau_plus}, beta={self.beta}, "
                f"{super().extra_repr()}")


__all__ = ["HardNegativeLoss"]
