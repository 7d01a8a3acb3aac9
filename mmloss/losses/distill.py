"""§13–§15 modules: similarity-matrix distillation (incl. open_clip's ``DistillClipLoss``),
ModX, CyCLIP and score distillation. Options live here; the math is in
``mmloss.functional.distill``.
"""
from __future__ import annotations

import torch

from .. import _validation as V
from ..functional import clip_loss, contrastive_distill_loss, cyclip_loss, modx_loss, score_distill_loss
from ..functional.distill import check_weight
from ._base import LossModule
from .clip import ClipLoss

Tensor = torch.Tensor


class ContrastiveDistillLoss(LossModule):
    """Similarity-matrix distillation (docs/losses.md §13): the distillation term of open_clip's
    ``DistillClipLoss``, ½·[mean_i H(p^t_i, p^s_i) + the same down columns].

    ``ContrastiveDistillLoss(*, cross_entropy=True, distributed=None, group=None,
    backend="auto")``; ``cross_entropy=False`` gives KL(p_t‖p_s) (same gradient).
    ``forward(image_features (N, D), text_features (M, D), logit_scale, teacher_image_features
    (N, D_t), teacher_text_features (M, D_t), teacher_logit_scale)`` → scalar; the teacher gets
    no gradient. See ``mmloss.functional.contrastive_distill_loss``. Rank-local (``distributed``
    defaults to None: the loss never gathers).
    """

    def __init__(self, *, cross_entropy: bool = True, distributed=None, group=None, backend: str = "auto",
                 check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite)
        self.cross_entropy = V.check_bool("cross_entropy", cross_entropy)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, teacher_image_features: Tensor,
                teacher_text_features: Tensor, teacher_logit_scale) -> Tensor:
        self._require_local()
        return contrastive_distill_loss(
            image_features, text_features, logit_scale, teacher_image_features, teacher_text_features,
            teacher_logit_scale, cross_entropy=self.cross_entropy, backend=self.backend,
            check_finite=self.check_finite,
        )

    def extra_repr(self) -> str:
        return f"cross_entropy={self.cross_entropy}, backend={self.backend!r}"


class DistillClipLoss(ClipLoss):
    """Drop-in for ``open_clip.loss.DistillClipLoss`` (docs/losses.md §13) without N×N matrices.

    Constructor: ``ClipLoss``'s (open_clip's arguments plus ``label_smoothing``,
    ``distributed``, ``group``, ``backend``). ``forward(image_features, text_features,
    logit_scale, dist_image_features, dist_text_features, dist_logit_scale, output_dict=False)``
    returns ``(contrastive_loss, distill_loss)``, or with ``output_dict=True``
    ``{"contrastive_loss": …, "distill_loss": …}`` — the CLIP loss of the student (§1) and
    ``contrastive_distill_loss`` against the teacher (``dist_*``), which gets no gradient.
    """

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, dist_image_features: Tensor,
                dist_text_features: Tensor, dist_logit_scale, output_dict: bool = False):
        self._require_local()
        # Distillation first: its backward then runs after CLIP's, so the two workspaces and
        # the other term's partial gradients are never live together (see torch_kl's memory note).
        distill = contrastive_distill_loss(
            image_features, text_features, logit_scale, dist_image_features, dist_text_features,
            dist_logit_scale, backend=self.backend, check_finite=self.check_finite,
        )
        contrastive = clip_loss(image_features, text_features, logit_scale,
                                label_smoothing=self.label_smoothing, backend=self.backend,
                                check_finite=self.check_finite)
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill


class ModXLoss(LossModule):
    """ModX off-diagonal alignment for continual CLIP training (docs/losses.md §13).

    ``ModXLoss(alpha=20.0, *, distributed=None, group=None, backend="auto")``;
    ``forward(image_features (N, D), text_features (N, D), logit_scale, old_image_features
    (N, D_old), old_text_features (N, D_old))`` → CLIP on the new model + α·½(Σ kept-row KL +
    Σ kept-column KL) on unscaled cosines; see ``mmloss.functional.modx_loss``. Rank-local.
    """

    def __init__(self, alpha: float = 20.0, *, distributed=None, group=None, backend: str = "auto",
                 check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite)
        self.alpha = check_weight("alpha", alpha)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, old_image_features: Tensor,
                old_text_features: Tensor) -> Tensor:
        self._require_local()
        return modx_loss(image_features, text_features, logit_scale, old_image_features, old_text_features,
                         self.alpha, backend=self.backend, check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, backend={self.backend!r}"


class CyCLIPLoss(LossModule):
    """CyCLIP (docs/losses.md §14): CLIP + λ_in·L_in + λ_cross·L_cross on raw cosines, exact O(N·D²).

    ``CyCLIPLoss(lambda_in=0.25, lambda_cross=0.25, *, distributed=None, group=None,
    backend="auto")``; ``forward(image_features (N, D), text_features (N, D), logit_scale)``;
    see ``mmloss.functional.cyclip_loss``. Rank-local.
    """

    def __init__(self, lambda_in: float = 0.25, lambda_cross: float = 0.25, *, distributed=None, group=None,
                 backend: str = "auto", check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite)
        self.lambda_in = check_weight("lambda_in", lambda_in)
        self.lambda_cross = check_weight("lambda_cross", lambda_cross)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale) -> Tensor:
        self._require_local()
        return cyclip_loss(image_features, text_features, logit_scale, self.lambda_in, self.lambda_cross,
                           backend=self.backend, check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return f"lambda_in={self.lambda_in}, lambda_cross={self.lambda_cross}, backend={self.backend!r}"


class ScoreDistillLoss(LossModule):
    """Score distillation (DCD, docs/losses.md §15) over B×C candidate scores.

    ``ScoreDistillLoss(alpha=0.2, *, distributed=None, group=None, backend="auto")``;
    ``forward(student_scores (B, C), teacher_scores (B, C), positive_index=0)``; see
    ``mmloss.functional.score_distill_loss``. Rank-local.
    """

    def __init__(self, alpha: float = 0.2, *, distributed=None, group=None, backend: str = "auto",
                 check_finite: bool = False):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite)
        self.alpha = V.check_fraction("alpha", alpha, upper_open=False)

    def forward(self, student_scores: Tensor, teacher_scores: Tensor, positive_index=0) -> Tensor:
        self._require_local()
        return score_distill_loss(student_scores, teacher_scores, positive_index, self.alpha, backend=self.backend,
                                  check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, backend={self.backend!r}"


__all__ = ["ContrastiveDistillLoss", "CyCLIPLoss", "DistillClipLoss", "ModXLoss", "ScoreDistillLoss"]
