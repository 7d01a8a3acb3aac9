"""§1 CLIP module, open_clip's ``ClipLoss`` call style (docs/losses.md "Public signatures")."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from ..functional.clip import clip_loss_core
from ._base import LossModule


class ClipLoss(LossModule):
    """Drop-in for ``open_clip.loss.ClipLoss`` computed without the N×N logit matrix.

    Constructor arguments are open_clip's; ``cache_labels`` is accepted for compatibility (labels
    are never materialised). ``use_horovod=True`` raises. Extra keywords: ``label_smoothing``
    (docs/losses.md §1), ``distributed`` ("auto" | None | "gather" | "ring"), ``group``,
    ``uniform_shards``, ``backend``, ``check_finite``.

    Distributed (``mmloss.distributed``): default "auto", like open_clip's loss, which gathers:
    under an initialised process group of world size > 1, forward gathers both sides across the
    group (a collective call: every rank of the group must call forward) and computes this rank's
    rows and columns against the global batch, exactly, with uneven shards allowed. "ring" passes
    the texts around the ranks instead (same value and gradients, O(N_local·D) memory per rank);
    None computes the loss of the given, rank-local tensors.

    - ``local_loss=False`` (default): the value is the global loss on every rank; the features'
      gradient is W × this rank's share and logit_scale's gradient the global one on every rank,
      so DDP's averaging gives the single-process gradient (these are open_clip's per-rank values
      with ``gather_with_grad=True``).
    - ``local_loss=True``: each rank returns the mean of its own rows' and columns' terms with
      that value's own gradient, as open_clip does (with equal shards DDP's average is again the
      single-process gradient).
    - ``gather_with_grad``: accepted; mmloss always propagates the gradient through the gathered
      features (open_clip's ``False`` drops it, which scales or biases its gradient).
    - ``rank`` / ``world_size``: the process group's actual rank and size win; ``world_size``
      other than 1 that differs from the group's size raises a ValueError, and ``world_size > 1``
      without an initialised process group raises a RuntimeError (no silent local loss).

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
        uniform_shards: bool = False,
        backend: str = "auto",
        check_finite: bool = False,
    ):
        super().__init__(backend=backend, distributed=distributed, group=group, world_size=world_size,
                         check_finite=check_finite, uniform_shards=uniform_shards)
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
        """Symmetric CLIP loss of N pairs, without the N×N logit matrix (docs/losses.md §1).

        Args:
            image_features, text_features: (N, D) each, fp16/bf16/fp32/fp64, used as given.
            logit_scale: the exponentiated scale, a positive float or 0-d tensor.
            logit_bias: accepted for DDP, a no-op for softmax (its gradient is exactly 0).
            output_dict: True returns open_clip's ``{"contrastive_loss": loss}``.
            labels: optional (N,) integer ids (mmloss only): same-id pairs are positives.

        Returns:
            The 0-d loss, fp32 (fp64 for fp64 inputs). Under a process group (default "auto") a
                collective call: the global loss on every rank (``local_loss=True``: this rank's share).
        """
        loss = clip_loss_core(
            image_features, text_features, logit_scale, logit_bias, labels=labels,
            label_smoothing=self.label_smoothing, backend=self.backend, check_finite=self.check_finite,
            distributed=self.distributed, group=self.group, uniform_shards=self.uniform_shards,
            local_share=bool(self.local_loss), configured_world_size=self.world_size,
            loss_name="ClipLoss",
        )
        return {"contrastive_loss": loss} if output_dict else loss
