"""CoCa: contrastive + captioning loss (Yu et al. 2022, "CoCa: Contrastive Captioners are
Image-Text Foundation Models"), open_clip's ``CoCaLoss`` math on top of ``clip_loss``
(docs/losses.md §1 for the contrastive term; docs/migration.md for the call style).

The contrastive part is ``clip_loss`` (no N×N matrix); the captioning part is token-level
cross-entropy of the decoder's vocabulary logits, which the model already holds as a (B, T, V)
tensor, so it is computed with ``torch.nn.functional.cross_entropy`` (no extra B×T×V copy).
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from .. import _validation as V
from .clip import clip_loss

Tensor = torch.Tensor


def check_loss_weight(name: str, value) -> float:
    """A finite Python number weighting one of CoCa's two terms."""
    return float(V.check_scalar(name, V.check_real(name, value, "a Python number")))


def caption_loss(logits: Tensor, labels: Tensor, pad_id: Optional[int] = 0, *, check_finite: bool = False) -> Tensor:
    """Token cross-entropy ``mean over non-pad tokens of −log softmax(logits[b, t])[labels[b, t]]``.

    Args:
        logits: (B, T, V) floating vocabulary logits of the text decoder.
        labels: (B, T) integer token ids; tokens equal to ``pad_id`` are ignored (open_clip's
            ``CrossEntropyLoss(ignore_index=pad_id)``; ``pad_id=None`` ignores none).
        check_finite: raise a ValueError naming ``logits`` when it holds NaN/Inf.

    Returns a 0-d loss in the logits' dtype (as torch's cross-entropy). A batch whose every
    token is padding gives NaN (0/0, as in torch and open_clip). Memory: torch's
    ``log_softmax`` workspace over (B·T, V).
    """
    V.check_tensor("logits", logits)
    V.check_tensor("labels", labels)
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating tensor, got dtype {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V) vocabulary logits, got shape {tuple(logits.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer token ids, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"labels must be (B, T) = {tuple(logits.shape[:2])} to match logits {tuple(logits.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    V.check_same_device(("logits", logits), ("labels", labels))
    if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, numbers.Integral)):
        raise TypeError(f"pad_id must be an int or None, got {type(pad_id).__name__}")
    if V.check_bool("check_finite", check_finite):
        V.check_all_finite(("logits", logits))
    ignore = -100 if pad_id is None else int(pad_id)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=ignore
    )


def coca_loss(
    image_features: Tensor,
    text_features: Tensor,
    logits: Tensor,
    labels: Tensor,
    logit_scale,
    *,
    caption_loss_weight: float,
    clip_loss_weight: float,
    pad_id: Optional[int] = 0,
    backend: str = "auto",
    check_finite: bool = False,
) -> tuple[Tensor, Tensor]:
    """CoCa loss as open_clip computes it: ``(clip_loss_weight · CLIP, caption_loss_weight · CE)``.

    Args:
        image_features, text_features: (N, D) embeddings for ``clip_loss`` (used as given).
        logits: (N, T, V) caption logits; labels: (N, T) token ids (``caption_loss``).
        logit_scale: the CLIP multiplier (already exponentiated), float or 0-d tensor.
        caption_loss_weight, clip_loss_weight: Python numbers. ``clip_loss_weight`` 0 skips the
            contrastive term and returns ``torch.tensor(0)`` in its place (open_clip's value).
        pad_id: token ignored by the caption term (default 0, open_clip's tokenizer).

    Returns the pair ``(contrastive, caption)`` of 0-d tensors. Memory: ``clip_loss``'s O(N·D)
    plus the caption cross-entropy's workspace.
    """
    clip_w = check_loss_weight("clip_loss_weight", clip_loss_weight)
    caption_w = check_loss_weight("caption_loss_weight", caption_loss_weight)
    if clip_w:
        contrastive = clip_w * clip_loss(image_features, text_features, logit_scale, backend=backend,
                                         check_finite=check_finite)
    else:
        contrastive = torch.tensor(0, device=logits.device)
    caption = caption_loss(logits, labels, pad_id, check_finite=check_finite) * caption_w
    return contrastive, caption


__all__ = ["caption_loss", "coca_loss"]
