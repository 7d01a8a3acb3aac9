"""Dense references of docs/losses.md §13–§15 and of the ``similarity_kl`` / ``similarity_topk``
primitives.

Every function materialises its N×M matrices with plain torch and lets autograd do the rest
(memory O(N·M): small inputs only). Computation is in float64 when any input is float64, else
float32. Teachers are constants: their tensors are detached, as in the fast paths.
"""
from __future__ import annotations

import torch

from .core import _compute_dtype, _logits, clip_loss

Tensor = torch.Tensor


def _detach(value):
    return value.detach() if isinstance(value, Tensor) else value


def _to(t: Tensor, dtype) -> Tensor:
    return t.to(dtype)


# ----------------------------------------------------------------------------- primitives


def _divergence_rows(student: Tensor, teacher: Tensor, cross_entropy: bool) -> Tensor:
    """Per-row KL(softmax(teacher_i)‖softmax(student_i)), or the cross-entropy H(p_t, p_s)."""
    log_q = torch.log_softmax(student, dim=1)
    log_p = torch.log_softmax(teacher, dim=1)
    p = log_p.exp()
    if cross_entropy:
        return -(p * log_q).sum(dim=1)
    return (p * (log_p - log_q)).sum(dim=1)


def similarity_kl(x_s, y_s, x_t, y_t, scale_s, scale_t, *, rows=True, cols=True, cross_entropy=False):
    """Dense ``similarity_kl`` (same contract as ``mmloss.ops.similarity_kl``): per-row and
    per-column KL(p_t‖p_s) or H(p_t, p_s); the teacher gets no gradient."""
    dt = _compute_dtype(x_s, y_s, x_t, y_t)
    L_s = _logits(_to(x_s, dt), _to(y_s, dt), scale_s)
    L_t = _logits(_to(x_t.detach(), dt), _to(y_t.detach(), dt), _detach(scale_t))
    row = _divergence_rows(L_s, L_t, cross_entropy) if rows else None
    col = _divergence_rows(L_s.T, L_t.T, cross_entropy) if cols else None
    return row, col


def similarity_topk(x, y, k, *, scale=1.0, chunk_size=None, chunk=None):
    """Dense ``similarity_topk``: the k largest ``s·⟨x_i, y_j⟩`` per row, ties to the lower
    index (a stable descending sort); no gradient. ``chunk_size`` / ``chunk`` are accepted for
    signature parity and ignored (one dense matrix)."""
    with torch.no_grad():
        L = _logits(x.detach(), y.detach(), _detach(scale))
        values, indices = torch.sort(L, dim=1, descending=True, stable=True)
        return values[:, :k], indices[:, :k]


# ----------------------------------------------------------------------------- §13


def contrastive_distill_loss(image_features, text_features, logit_scale, teacher_image_features,
                             teacher_text_features, teacher_logit_scale, *, cross_entropy=True):
    """docs/losses.md §13: ½·[mean_i H(p^t_i, p^s_i) + mean_j H(p^t_{·j}, p^s_{·j})] (KL when
    ``cross_entropy=False``)."""
    row, col = similarity_kl(image_features, text_features, teacher_image_features, teacher_text_features,
                             logit_scale, teacher_logit_scale, cross_entropy=cross_entropy)
    return 0.5 * (row.mean() + col.mean())


def _diagonal_is_argmax(x, y) -> Tensor:
    """(N,) bool: row i of x·yᵀ has its (first) maximum at column i."""
    with torch.no_grad():
        L = _logits(x.detach(), y.detach(), 1.0)
        return L.argmax(dim=1) == torch.arange(L.shape[0], device=L.device)


def modx_loss(image_features, text_features, logit_scale, old_image_features, old_text_features, alpha=20.0):
    """docs/losses.md §13 ModX, literally as the authors' script: CLIP on the student (scale
    ``logit_scale``) + α·½(Σ_{kept rows} KL + Σ_{kept columns} KL) on unscaled cosines, a row
    (column) kept where the old model's argmax over that row (column) is the diagonal."""
    clip = clip_loss(image_features, text_features, logit_scale)
    dt = _compute_dtype(image_features, text_features, old_image_features, old_text_features)
    L_s = _logits(_to(image_features, dt), _to(text_features, dt), 1.0)
    L_t = _logits(_to(old_image_features.detach(), dt), _to(old_text_features.detach(), dt), 1.0)
    keep_rows = _diagonal_is_argmax(old_image_features, old_text_features)
    keep_cols = _diagonal_is_argmax(old_text_features, old_image_features)
    rows = torch.where(keep_rows, _divergence_rows(L_s, L_t, False), 0.0).sum()
    cols = torch.where(keep_cols, _divergence_rows(L_s.T, L_t.T, False), 0.0).sum()
    return clip + alpha * 0.5 * (rows + cols)


# ----------------------------------------------------------------------------- §14


def cyclip_loss(image_features, text_features, logit_scale, lambda_in=0.25, lambda_cross=0.25):
    """docs/losses.md §14: CLIP + λ_in·(1/N)Σ_ij(x_i·x_j − y_i·y_j)² + λ_cross·(1/N)Σ_ij(x_i·y_j − x_j·y_i)²
    on the raw cosines (dense N×N matrices)."""
    clip = clip_loss(image_features, text_features, logit_scale)
    dt = _compute_dtype(image_features, text_features)
    x, y = _to(image_features, dt), _to(text_features, dt)
    n = x.shape[0]
    xy = x @ y.T
    inmodal = ((x @ x.T - y @ y.T) ** 2).sum() / n
    crossmodal = ((xy - xy.T) ** 2).sum() / n
    return clip + lambda_in * inmodal + lambda_cross * crossmodal


# ----------------------------------------------------------------------------- §15


def score_distill_loss(student_scores, teacher_scores, positive_index=0, alpha=0.2):
    """docs/losses.md §15: α·mean_ic (t_ic − u_ic)² + (1−α)·Σ_i w_i·mean_c BCEWithLogits(u_ic, y_ic),
    y one-hot at ``positive_index``, w_i = H(softmax(t_i)) / Σ_i' H(softmax(t_i')) (uniform 1/B
    when every teacher row has zero entropy)."""
    dt = _compute_dtype(student_scores, teacher_scores)
    u = _to(student_scores, dt)
    t = _to(teacher_scores.detach(), dt)
    b, c = u.shape
    if isinstance(positive_index, Tensor):
        pos = positive_index.to(u.device)
    else:
        pos = torch.full((b,), int(positive_index), dtype=torch.long, device=u.device)
    target = torch.zeros(b, c, dtype=dt, device=u.device)
    target[torch.arange(b, device=u.device), pos] = 1.0
    mse = ((t - u) ** 2).mean()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(u, target, reduction="none").mean(dim=1)
    log_p = torch.log_softmax(t, dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1)
    total = entropy.sum()
    weights = entropy / total if float(total) > 0 else torch.full_like(entropy, 1.0 / b)
    return alpha * mse + (1.0 - alpha) * (weights * bce).sum()


__all__ = [
    "contrastive_distill_loss",
    "cyclip_loss",
    "modx_loss",
    "score_distill_loss",
    "similarity_kl",
    "similarity_topk",
]
