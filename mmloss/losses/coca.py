"""CoCa module, open_clip's ``CoCaLoss`` call style (math in ``mmloss.functional.coca``)."""
from __future__ import annotations

from typing import Optional

import torch

from ..functional import coca as F
from .clip import ClipLoss


class CoCaLoss(ClipLoss):
    """Drop-in for ``open_clip.loss.CoCaLoss``: the CLIP term without the N×N logit matrix plus
    the captioning cross-entropy.

    ``CoCaLoss(caption_loss_weight, clip_loss_weight, pad_id=0, local_loss=False,
    gather_with_grad=False, cache_labels=False, rank=0, world_size=1, use_horovod=False, *,
    distributed="auto", group=None, backend="auto", check_finite=False)`` — open_clip's
    arguments and defaults (the weights have no default there either), then ``ClipLoss``'s
    mmloss keywords. Distributed: the contrastive term is ``ClipLoss``'s (``distributed="auto"``
    gathers under a process group of world size > 1: the global CLIP loss on every rank); the
    caption term is this rank's token mean, as in open_clip.
    """

    def __init__(
        self,
        caption_loss_weight: float,
        clip_loss_weight: float,
        pad_id: Optional[int] = 0,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        distributed="auto",
        group=None,
        backend: str = "auto",
        check_finite: bool = False,
    ):
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels,
                         rank=rank, world_size=world_size, use_horovod=use_horovod, distributed=distributed,
                         group=group, backend=backend, check_finite=check_finite)
        self.caption_loss_weight = F.check_loss_weight("caption_loss_weight", caption_loss_weight)
        self.clip_loss_weight = F.check_loss_weight("clip_loss_weight", clip_loss_weight)
        self.pad_id = pad_id

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logits: torch.Tensor,
                labels: torch.Tensor, logit_scale, output_dict: bool = False):
        """CoCa's weighted CLIP and captioning losses (docs/losses.md §16).

        Args:
            image_features, text_features: (N, D); logits: (N, T, V) caption logits; labels:
                (N, T) token ids; logit_scale: exponentiated CLIP scale.

        Returns:
            ``(contrastive_loss, caption_loss)``, or ``{"contrastive_loss": ..., "caption_loss": ...}``
                with ``output_dict=True`` (open_clip's keys).
        """
        # The contrastive term is ClipLoss's (global under a process group, as open_clip's
        # CoCaLoss gathers); the caption term is this rank's token mean, as in open_clip.
        if self.clip_loss_weight:
            contrastive = self.clip_loss_weight * super().forward(image_features, text_features, logit_scale)
        else:
            contrastive = torch.tensor(0, device=logits.device)
        caption = F.caption_loss(logits, labels, self.pad_id, check_finite=self.check_finite) * self.caption_loss_weight
        if output_dict:
            return {"contrastive_loss": contrastive, "caption_loss": caption}
        return contrastive, caption

    def extra_repr(self) -> str:
        return (f"caption_loss_weight={self.caption_loss_weight}, clip_loss_weight={self.clip_loss_weight}, "
                f"pad_id={self.pad_id}, {super().extra_repr()}")


__all__ = ["CoCaLoss"]
