"""§1 CLIP module, open_clip's ``ClipLoss`` call style (LOSSES.md "Public signatures")."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from ..functional import clip_loss
from ._base import LossModule


class ClipLoss(LossModule):
    """Drop-in for ``open_clip.loss.ClipLoss`` computed without the N×N logit matrix.

    Constructor arguments are open_clip's; ``local_loss``, ``gather_with_grad`` and
    ``cache_labels`` are accepted for compatibility (labels are never materialised, and
    cross-rank gathering is governed by ``distributed``). ``use_horovod=True`` raises.
    Extra keywords: ``label_smoothing`` (LOSSES.md §1), ``distributed`` ("auto" | None |
    "gather" | "ring"), ``group``, ``backend``, ``check_finite``.

    Distributed default: "auto", like open_clip's loss, which gathers across ranks. Until
    mmloss gathers, a call under a process group of world size > 1 (or with ``world_size > 1``)
    raises instead of silently returning a rank-local loss; ``distributed=None`` computes the
    loss on the given (rank-local) tensors.

    ``forward(image_features (N, D), text_features (N, D), logit_scale, logit_bias=None,
    output_dict=False, labels=None)`` returns the scalar loss, or ``{"contrastive_loss": loss}``.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        label_smoothing: float = 0.0,
        distributed="auto",
        group=None,
        backend: str = "auto",
        check_finite: bool = False,
    ):
        super().__init__(backend=backend, distributed=distributed, group=group, world_size=world_size,
                         check_finite=check_finite)
        if use_horovod:
            raise ValueError("ClipLoss: Horovod is not supported by mmloss (use torch.distributed)")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.label_smoothing = V.check_fraction("label_smoothing", label_smoothing)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        logit_bias=None,
        output_dict: bool = False,
        labels: Optional[torch.Tensor] = None,
    ):
        self._require_local()
        loss = clip_loss(
            image_features, text_features, logit_scale, logit_bias, labels=labels,
            label_smoothing=self.label_smoothing, backend=self.backend, check_finite=self.check_finite,
        )
        return {"contrastive_loss": loss} if output_dict else loss
