"""§3 SigLIP module, open_clip's ``SigLipLoss`` call style."""
from __future__ import annotations

import torch

from .. import distributed as D
from ..functional.siglip import siglip_loss_core
from ._base import LossModule

_DIST_IMPLS = (None, "bidir", "shift", "reduce", "gather")


class SigLipLoss(LossModule):
    """Drop-in for ``open_clip.loss.SigLipLoss`` (docs/losses.md §3) without the N×M logit matrix.

    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False,
    labels=None)``; ``labels`` as in ``siglip_loss``. ``cache_labels`` is accepted for
    compatibility (labels are never materialised).

    Distributed (``mmloss.distributed``): ``distributed`` defaults to "auto" as in ``ClipLoss``
    (open_clip's losses gather): under an initialised process group of world size > 1, forward
    gathers the texts across the group (a collective call) and computes this rank's images against
    all texts, exactly, with uneven shards allowed. The value is the global loss on every rank
    (open_clip returns this rank's rows divided by its local batch instead); the gradient is W ×
    this rank's share, scale and bias get the global gradient on every rank, so DDP's averaging
    gives the single-process gradient. ``dist_impl`` "gather"/"reduce"/None → gathering;
    "bidir"/"shift" (open_clip's neighbour exchange) → ``distributed="ring"`` (same value and
    gradient, O(N_local·D) memory per rank) when the loss is distributed under "auto". ``rank``/``world_size`` as in ``ClipLoss``:
    the group's actual values win; a differing ``world_size`` other than 1 raises. None computes
    the rank-local loss.
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
        uniform_shards: bool = False,
        backend: str = "auto",
        check_finite: bool = False,
    ):
        super().__init__(backend=backend, distributed=distributed, group=group, world_size=world_size,
                         check_finite=check_finite, uniform_shards=uniform_shards)
        if dist_impl not in _DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {list(_DIST_IMPLS)}, got {dist_impl!r}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.dist_impl = dist_impl

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False, labels=None):
        """Sigmoid loss of N images against M texts, without the N×M logit matrix (docs/losses.md §3).

        Args:
            image_features: (N, D); text_features: (M, D), M = N unless ``labels`` is a pair; as given.
            logit_scale: positive float or 0-d tensor; logit_bias: optional float or 0-d tensor.
            output_dict: True returns open_clip's ``{"contrastive_loss": loss}``.
            labels: None (diagonal positives), (N,) integer ids, or ``(image_labels, text_labels)``.

        Returns:
            The 0-d loss, fp32 (fp64 for fp64 inputs). Under a process group (default "auto") a
                collective call: the global loss on every rank (open_clip returns this rank's rows).
        """
        mode = self.distributed
        if self.dist_impl in ("bidir", "shift") and mode == "auto" and D.world_size(self.group) > 1:
            mode = "ring"  # open_clip's neighbour exchange: the texts travel around the ranks
        loss = siglip_loss_core(image_features, text_features, logit_scale, logit_bias, labels=labels,
                                backend=self.backend, check_finite=self.check_finite,
                                distributed=mode, group=self.group,
                                uniform_shards=self.uniform_shards, configured_world_size=self.world_size,
                                loss_name="SigLipLoss")
        return {"contrastive_loss": loss} if output_dict else loss
