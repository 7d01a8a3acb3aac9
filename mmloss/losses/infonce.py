"""§2 InfoNCE module."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from ..functional import infonce_loss
from ._base import LossModule


class InfoNCELoss(LossModule):
    """One-directional InfoNCE of queries against keys (docs/losses.md §2).

    ``forward(query (N, D), keys (M, D), logit_scale, targets=None, query_labels=None,
    key_labels=None, soft_targets=None, extra_keys=None, extra_key_labels=None)``; see
    ``mmloss.functional.infonce_loss``. Rank-local by default (``distributed=None``): it has no
    gathering peer, and its keys often hold a queue that every rank already shares. With
    ``distributed="gather"`` (or "auto", a collective call) the keys are gathered across the group
    and ``extra_keys`` (a shared queue) are appended, never gathered (``mmloss.distributed``).
    """

    def __init__(self, *, reduction: str = "mean", distributed=None, group=None, uniform_shards: bool = False,
                 backend: str = "auto", check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite,
                         uniform_shards=uniform_shards)
        self.reduction = V.check_reduction(reduction)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, logit_scale,
                targets: Optional[torch.Tensor] = None, query_labels: Optional[torch.Tensor] = None,
                key_labels: Optional[torch.Tensor] = None, soft_targets: Optional[torch.Tensor] = None,
                extra_keys: Optional[torch.Tensor] = None, extra_key_labels: Optional[torch.Tensor] = None):
        """One-directional InfoNCE of N queries against M keys (docs/losses.md §2).

        Args:
            query: (N, D); keys: (M, D), M ≥ N for the default targets ``arange(N)``; used as given.
            logit_scale: positive float or 0-d tensor. At most one of ``targets`` (N,), ``query_labels``
                (N,) with ``key_labels`` (M,), or ``soft_targets`` (N, M) names the positives.
            extra_keys: (Q, D) keys appended after ``keys`` (a queue), ``extra_key_labels`` (Q,).

        Returns:
            The loss, fp32 (fp64 for fp64 inputs): 0-d, or (N,) with ``reduction="none"``. Rank-local
                by default; "auto"/"gather" (a collective call) gather the keys, never ``extra_keys``.
        """
        return infonce_loss(query, keys, logit_scale, targets=targets, query_labels=query_labels,
                            key_labels=key_labels, soft_targets=soft_targets,
                            reduction=self.reduction, backend=self.backend,
                            check_finite=self.check_finite, extra_keys=extra_keys,
                            extra_key_labels=extra_key_labels, distributed=self.distributed,
                            group=self.group, uniform_shards=self.uniform_shards)
