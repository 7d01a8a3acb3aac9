"""SupCon module (docs/losses.md §5), pytorch-metric-learning's ``forward(embeddings, labels=None,
indices_tuple=None, ref_emb=None, ref_labels=None)``, which also takes HobbitLong's (B, V, D)
tensor (no math here; ``mmloss.functional.supcon``).

L2-normalised inside, rank-local by default, ``backend=``, ``check_finite=`` and the distributed
options (``distributed=``, ``group=``, ``uniform_shards=``): as ``mmloss.losses.ntxent``;
gathering, labels travel with their rows (pytorch-metric-learning's ``DistributedLossWrapper``
gathers too, but returns W × the loss).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..functional.supcon import supcon_loss
from ..functional.ssl_common import check_positive_float, check_temperature
from ._base import LossModule

Tensor = torch.Tensor


class SupConLoss(LossModule):
    """Supervised contrastive loss (docs/losses.md §5): ``SupConLoss(temperature=0.1,
    base_temperature=None)(embeddings, labels=None, indices_tuple=None, ref_emb=None,
    ref_labels=None)`` — pytorch-metric-learning's forward signature — with (n, D) + labels
    (PML) or (B, V, D) [+ (B,) labels] (HobbitLong). ``ref_emb``/``ref_labels``: anchors from
    ``embeddings``, positives and negatives from the reference set (``supcon_loss``);
    ``indices_tuple`` from a miner raises NotImplementedError."""

    def __init__(self, temperature: float = 0.1, base_temperature: Optional[float] = None, *,
                 backend: str = "auto", distributed=None, group=None, uniform_shards: bool = False,
                 check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite,
                         uniform_shards=uniform_shards)
        self.temperature = check_temperature("temperature", temperature)
        self.base_temperature = (None if base_temperature is None
                                 else check_positive_float("base_temperature", base_temperature))

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, indices_tuple=None,
                ref_emb: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None) -> Tensor:
        """Supervised contrastive loss, pytorch-metric-learning's call (docs/losses.md §5).

        Args:
            embeddings: (n, D) with labels (n,) (PML), or (B, V, D) with optional labels (B,);
                L2-normalised inside.
            ref_emb, ref_labels: optional (m, D), (m,) reference set: positives and negatives.
            indices_tuple: must be None (a miner's output raises NotImplementedError).

        Returns:
            The 0-d loss, fp32 (fp64 for fp64 inputs); see ``mmloss.supcon_loss``. Rank-local by
                default; gathering (a collective call), labels travel with their rows.
        """
        return supcon_loss(embeddings, labels, self.temperature, self.base_temperature,
                           ref_emb=ref_emb, ref_labels=ref_labels, indices_tuple=indices_tuple,
                           backend=self.backend, check_finite=self.check_finite,
                           distributed=self._resolve_distributed(), group=self.group,
                           uniform_shards=self.uniform_shards)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
                f"{super().extra_repr()}")


__all__ = ["SupConLoss"]
