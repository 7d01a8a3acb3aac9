"""§13–§15 modules: similarity-matrix distillation (incl. open_clip's ``DistillClipLoss``),
ModX, CyCLIP and score distillation. Options live here; the math is in
``mmloss.functional.distill``.
"""
from __future__ import annotations

import torch

from .. import _validation as V
from ..functional import contrastive_distill_loss, cyclip_loss, modx_loss, score_distill_loss
from ..functional.clip import clip_loss_core
from ..functional.distill import check_weight, contrastive_distill_core
from ._base import LossModule
from .clip import ClipLoss

Tensor = torch.Tensor


def _distributed_options(module: LossModule) -> dict:
    """The module's distributed keywords, as the functions take them."""
    return dict(distributed=module.distributed, group=module.group, uniform_shards=module.uniform_shards)


class ContrastiveDistillLoss(LossModule):
    """Similarity-matrix distillation (docs/losses.md §13): the distillation term of open_clip's
    ``DistillClipLoss``, ½·[mean_i H(p^t_i, p^s_i) + the same down columns].

    ``ContrastiveDistillLoss(*, cross_entropy=True, distributed=None, group=None,
    uniform_shards=False, backend="auto")``; ``cross_entropy=False`` gives KL(p_t‖p_s) (same
    gradient). ``forward(image_features (N, D), text_features (M, D), logit_scale,
    teacher_image_features (N, D_t), teacher_text_features (M, D_t), teacher_logit_scale)`` →
    scalar; the teacher gets no gradient. See ``mmloss.functional.contrastive_distill_loss``.
    Rank-local by default (``distributed=None``); "auto" / "gather" give the global batch's loss
    across the process group.
    """

    def __init__(self, *, cross_entropy: bool = True, distributed=None, group=None, uniform_shards: bool = False,
                 backend: str = "auto", check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite,
                         uniform_shards=uniform_shards)
        self.cross_entropy = V.check_bool("cross_entropy", cross_entropy)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, teacher_image_features: Tensor,
                teacher_text_features: Tensor, teacher_logit_scale) -> Tensor:
        """Similarity-matrix distillation of a student against a teacher (docs/losses.md §13).

        Args:
            image_features: (N, D); text_features: (M, D): the student, used as given; N ≠ M allowed.
            logit_scale, teacher_logit_scale: positive floats or 0-d tensors (s, s_t).
            teacher_image_features: (N, D_t); teacher_text_features: (M, D_t); no gradient.

        Returns:
            The 0-d loss, fp32 (fp64 for fp64 inputs). Rank-local by default; "auto"/"gather" (a
                collective call) the global batch's loss on every rank (teacher gathered, no gradient).
        """
        return contrastive_distill_loss(
            image_features, text_features, logit_scale, teacher_image_features, teacher_text_features,
            teacher_logit_scale, cross_entropy=self.cross_entropy, backend=self.backend,
            check_finite=self.check_finite, **_distributed_options(self),
        )

    def extra_repr(self) -> str:
        return f"cross_entropy={self.cross_entropy}, backend={self.backend!r}"


class DistillClipLoss(ClipLoss):
    """Drop-in for ``open_clip.loss.DistillClipLoss`` (docs/losses.md §13) without N×N matrices.

    Constructor: ``ClipLoss``'s (open_clip's arguments plus ``label_smoothing``,
    ``distributed``, ``group``, ``uniform_shards``, ``backend``). ``forward(image_features,
    text_features, logit_scale, dist_image_features, dist_text_features, dist_logit_scale,
    output_dict=False)`` returns ``(contrastive_loss, distill_loss)``, or with
    ``output_dict=True`` ``{"contrastive_loss": …, "distill_loss": …}`` — the CLIP loss of the
    student (§1) and ``contrastive_distill_loss`` against the teacher (``dist_*``), which gets no
    gradient.

    Distributed as ``ClipLoss`` (default "auto", like open_clip, which gathers): under a process
    group of world size > 1 both terms gather the student and the teacher (the teacher without
    gradient; a collective call) and return the global losses, with open_clip's ``local_loss``,
    ``gather_with_grad``, ``rank`` and ``world_size`` handled as ``ClipLoss`` does —
    ``local_loss=True`` returns each term's mean over this rank's rows and columns with its own
    gradient, as open_clip does. The student features are gathered once per term.
    """

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, dist_image_features: Tensor,
                dist_text_features: Tensor, dist_logit_scale, output_dict: bool = False):
        """The student's CLIP loss and its distillation term (docs/losses.md §1, §13).

        Args:
            image_features, text_features: (N, D) student features; logit_scale: its scale.
            dist_image_features, dist_text_features: (N, D_t) teacher features (no gradient);
                dist_logit_scale: the teacher's scale.
            output_dict: True returns open_clip's ``{"contrastive_loss": …, "distill_loss": …}``.

        Returns:
            ``(contrastive_loss, distill_loss)``, 0-d, fp32 (fp64 for fp64 inputs), as open_clip.
                Distributed as ``ClipLoss`` (default "auto": the global losses on every rank).
        """
        shared = dict(backend=self.backend, check_finite=self.check_finite, distributed=self.distributed,
                      group=self.group, uniform_shards=self.uniform_shards, local_share=bool(self.local_loss),
                      configured_world_size=self.world_size, loss_name="DistillClipLoss")
        # Distillation first: its backward then runs after CLIP's, so the two workspaces and
        # the other term's partial gradients are never live together (see torch_kl's memory note).
        distill = contrastive_distill_core(image_features, text_features, logit_scale, dist_image_features,
                                           dist_text_features, dist_logit_scale, **shared)
        contrastive = clip_loss_core(image_features, text_features, logit_scale,
                                     label_smoothing=self.label_smoothing, **shared)
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill


class ModXLoss(LossModule):
    """ModX off-diagonal alignment for continual CLIP training (docs/losses.md §13).

    ``ModXLoss(alpha=20.0, *, distributed=None, group=None, uniform_shards=False, backend="auto")``;
    ``forward(image_features (N, D), text_features (N, D), logit_scale, old_image_features
    (N, D_old), old_text_features (N, D_old))`` → CLIP on the new model + α·½(Σ kept-row KL +
    Σ kept-column KL) on unscaled cosines; see ``mmloss.functional.modx_loss``. Rank-local by
    default; "auto" / "gather" give the global batch's loss across the process group.
    """

    def __init__(self, alpha: float = 20.0, *, distributed=None, group=None, uniform_shards: bool = False,
                 backend: str = "auto", check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite,
                         uniform_shards=uniform_shards)
        self.alpha = check_weight("alpha", alpha)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, old_image_features: Tensor,
                old_text_features: Tensor) -> Tensor:
        """ModX: CLIP plus α × the old model's kept-row/column KL (docs/losses.md §13).

        Args:
            image_features, text_features: (N, D) each, the model being trained, used as given.
            logit_scale: positive float or 0-d tensor (the CLIP term only).
            old_image_features, old_text_features: (N, D_old) each, the previous model (no gradient).

        Returns:
            The 0-d loss, fp32 (fp64 for fp64 inputs). Rank-local by default; "auto"/"gather" (a
                collective call) the global batch's loss on every rank.
        """
        return modx_loss(image_features, text_features, logit_scale, old_image_features, old_text_features,
                         self.alpha, backend=self.backend, check_finite=self.check_finite,
                         **_distributed_options(self))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, backend={self.backend!r}"


class CyCLIPLoss(LossModule):
    """CyCLIP (docs/losses.md §14): CLIP + λ_in·L_in + λ_cross·L_cross on raw cosines, exact O(N·D²).

    ``CyCLIPLoss(lambda_in=0.25, lambda_cross=0.25, *, distributed=None, group=None,
    uniform_shards=False, backend="auto")``; ``forward(image_features (N, D), text_features
    (N, D), logit_scale)``; see ``mmloss.functional.cyclip_loss``. Rank-local by default;
    "auto" / "gather" give the global batch's loss across the process group.
    """

    def __init__(self, lambda_in: float = 0.25, lambda_cross: float = 0.25, *, distributed=None, group=None,
                 uniform_shards: bool = False, backend: str = "auto", check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite,
                         uniform_shards=uniform_shards)
        self.lambda_in = check_weight("lambda_in", lambda_in)
        self.lambda_cross = check_weight("lambda_cross", lambda_cross)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale) -> Tensor:
        """CyCLIP: CLIP + λ_in·L_in + λ_cross·L_cross on raw cosines (docs/losses.md §14).

        Args:
            image_features, text_features: (N, D) each, used as given (N ≠ M is a ValueError).
            logit_scale: positive float or 0-d tensor (the CLIP term only).

        Returns:
            The 0-d loss, fp32 (fp64 for fp64 inputs). Rank-local by default; "auto"/"gather" (a
                collective call) the global batch's loss on every rank.
        """
        return cyclip_loss(image_features, text_features, logit_scale, self.lambda_in, self.lambda_cross,
                           backend=self.backend, check_finite=self.check_finite, **_distributed_options(self))

    def extra_repr(self) -> str:
        return f"lambda_in={self.lambda_in}, lambda_cross={self.lambda_cross}, backend={self.backend!r}"


class ScoreDistillLoss(LossModule):
    """Score distillation (DCD, docs/losses.md §15) over B×C candidate scores.

    ``ScoreDistillLoss(alpha=0.2, *, distributed=None, group=None, uniform_shards=False,
    backend="auto")``; ``forward(student_scores (B, C), teacher_scores (B, C), positive_index=0)``;
    see ``mmloss.functional.score_distill_loss``. Rank-local by default; "auto" / "gather" give
    the global batch's loss across the process group (its normalisers are global).
    """

    def __init__(self, alpha: float = 0.2, *, distributed=None, group=None, uniform_shards: bool = False,
                 backend: str = "auto", check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite,
                         uniform_shards=uniform_shards)
        self.alpha = V.check_fraction("alpha", alpha, upper_open=False)

    def forward(self, student_scores: Tensor, teacher_scores: Tensor, positive_index=0) -> Tensor:
        """Score distillation (DCD) of B queries' C candidate scores (docs/losses.md §15).

        Args:
            student_scores, teacher_scores: (B, C) logits over the same candidates in the same order,
                fp16/bf16/fp32/fp64; the teacher gets no gradient.
            positive_index: int in [0, C) or a (B,) integer tensor (default 0).

        Returns:
            The 0-d loss, fp32 (fp64 for fp64 inputs). Rank-local by default; "auto"/"gather" (a
                collective call) use the global batch's normalisers (nothing is gathered).
        """
        return score_distill_loss(student_scores, teacher_scores, positive_index, self.alpha, backend=self.backend,
                                  check_finite=self.check_finite, **_distributed_options(self))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, backend={self.backend!r}"


__all__ = ["ContrastiveDistillLoss", "CyCLIPLoss", "DistillClipLoss", "ModXLoss", "ScoreDistillLoss"]
