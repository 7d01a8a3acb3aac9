"""Multi-view modules (docs/losses.md §8): ``forward(views)`` with a (V, M, D) tensor or a list of
V (M, D) tensors (no math here; ``mmloss.functional.multiview``).

L2-normalised inside, rank-local by default, ``backend=``, ``check_finite=`` and the distributed
options (``distributed=``, ``group=``, ``uniform_shards=``): as ``mmloss.losses.ntxent``.
"""
from __future__ import annotations

import torch

from .. import _validation as V
from ..functional.multiview import mv_dhel_loss, mv_infonce_loss
from ..functional.ssl_common import check_temperature
from ._base import LossModule

Tensor = torch.Tensor


class MultiViewInfoNCELoss(LossModule):
    """MV-InfoNCE (docs/losses.md §8): ``MultiViewInfoNCELoss(temperature=0.1,
    same_view_negatives=True)(views)`` with views (V, M, D) or a list of V (M, D)."""

    def __init__(self, temperature: float = 0.1, same_view_negatives: bool = True, *, backend: str = "auto",
                 distributed=None, group=None, uniform_shards: bool = False,
                 check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite,
                         uniform_shards=uniform_shards)
        self.temperature = check_temperature("temperature", temperature)
        self.same_view_negatives = V.check_bool("same_view_negatives", same_view_negatives)

    def forward(self, views) -> Tensor:
        """Multi-view InfoNCE (docs/losses.md §8).

        Args:
            views: (V, M, D) tensor or a list of V (M, D) tensors, V ≥ 2, M ≥ 1, fp16/bf16/fp32/fp64;
                L2-normalised inside.

        Returns:
            The 0-d loss, fp32 (fp64 for fp64 inputs). Rank-local by default; with
                ``distributed="auto"``/``"gather"`` (a collective call) the global batch's loss on every rank.
        """
        return mv_infonce_loss(views, self.temperature, self.same_view_negatives, backend=self.backend,
                               check_finite=self.check_finite, distributed=self._resolve_distributed(),
                               group=self.group, uniform_shards=self.uniform_shards)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, same_view_negatives={self.same_view_negatives}, "
                f"{super().extra_repr()}")


class MultiViewDHELLoss(LossModule):
    """MV-DHEL (docs/losses.md §8): ``MultiViewDHELLoss(temperature=0.1)(views)``."""

    def __init__(self, temperature: float = 0.1, *, backend: str = "auto", distributed=None, group=None,
                 uniform_shards: bool = False, check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite,
                         uniform_shards=uniform_shards)
        self.temperature = check_temperature("temperature", temperature)

    def forward(self, views) -> Tensor:
        """Multi-view DHEL, uniformity within each view only (docs/losses.md §8).

        Args:
            views: (V, M, D) or a list of V (M, D), V ≥ 2, M ≥ 2 (negatives), fp16/bf16/fp32/fp64;
                L2-normalised inside.

        Returns:
            The 0-d loss, fp32 (fp64 for fp64 inputs). Rank-local by default; gathering (a
                collective call) the global batch's loss on every rank (M ≥ 2 of the global batch).
        """
        return mv_dhel_loss(views, self.temperature, backend=self.backend, check_finite=self.check_finite,
                            distributed=self._resolve_distributed(), group=self.group,
                            uniform_shards=self.uniform_shards)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, {super().extra_repr()}"


__all__ = ["MultiViewDHELLoss", "MultiViewInfoNCELoss"]
