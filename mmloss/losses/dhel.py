"""DHEL module (docs/losses.md §7), lightly's ``forward(out0, out1)`` call style (no math here;
``mmloss.functional.dhel``).

L2-normalised inside, rank-local by default, ``backend=``, ``check_finite=`` and the distributed
options (``distributed=``, ``group=``, ``uniform_shards=``): as ``mmloss.losses.ntxent``.
"""
from __future__ import annotations

import torch

from .. import _validation as V
from ..functional.dhel import dhel_loss
from ..functional.ssl_common import check_temperature
from ._base import LossModule

Tensor = torch.Tensor


class DHELLoss(LossModule):
    """Decoupled hyperspherical energy loss (docs/losses.md §7): ``DHELLoss(temperature=0.3,
    include_augs=True)(out0, out1)``."""

    def __init__(self, temperature: float = 0.3, include_augs: bool = True, *, backend: str = "auto",
                 distributed=None, group=None, uniform_shards: bool = False,
                 check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite,
                         uniform_shards=uniform_shards)
        self.temperature = check_temperature("temperature", temperature)
        self.include_augs = V.check_bool("include_augs", include_augs)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        """Decoupled hyperspherical energy loss of two views (docs/losses.md §7).

        Args:
            out0, out1: (N, D) anchors u and positives v, N ≥ 2, fp16/bf16/fp32/fp64, L2-normalised
                inside.

        Returns:
            The 0-d loss, fp32 (fp64 for fp64 inputs). Rank-local by default; with
                ``distributed="auto"``/``"gather"`` (a collective call) the global batch's loss on every rank.
        """
        return dhel_loss(out0, out1, self.temperature, self.include_augs, backend=self.backend,
                         check_finite=self.check_finite, distributed=self._resolve_distributed(), group=self.group,
                         uniform_shards=self.uniform_shards)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, include_augs={self.include_augs}, {super().extra_repr()}"


__all__ = ["DHELLoss"]
