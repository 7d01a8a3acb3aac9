"""§3 SigLIP module, open_clip's ``SigLipLoss`` call style."""
from __future__ import annotations

import torch

from ..functional import siglip_loss
from ._base import LossModule

_DIST_IMPLS = (None, "bidir", "shift", "reduce", "gather")


class SigLipLoss(LossModule):
    """Drop-in for ``open_clip.loss.SigLipLoss`` (LOSSES.md §3) without the N×M logit matrix.

    ``dist_impl`` "bidir"/"shift" will map to the ring and "gather"/"reduce" to gathering once
    distributed support lands; ``cache_labels`` is accepted for compatibility (labels are never
    materialised). ``forward(image_features, text_features, logit_scale, logit_bias=None,
    output_dict=False, labels=None)``; ``labels`` as in ``siglip_loss``. ``distributed`` defaults
    to "auto" as in ``ClipLoss`` (open_clip's losses gather): under a process group of world
    size > 1 it raises until gathering lands; None computes the rank-local loss.
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl=None,
        *,
        distributed="auto",
        group=None,
        backend: str = "auto",
        check_finite: bool = False,
    ):
        super().__init__(backend=backend, distributed=distributed, group=group, world_size=world_size,
                         check_finite=check_finite)
        if dist_impl not in _DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {list(_DIST_IMPLS)}, got {dist_impl!r}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.dist_impl = dist_impl

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False, labels=None):
        self._require_local()
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, labels=labels,
                           backend=self.backend, check_finite=self.check_finite)
        return {"contrastive_loss": loss} if output_dict else loss
