"""Dense references of the primitives and of docs/losses.md §1–§3, with shared oracle helpers.

Every function materialises the full logit matrix with plain torch and lets autograd do the
rest, so memory is O(N·M): small inputs only, never on a fast path. Inputs are computed in
float64 when any input is float64, else float32 (half inputs are upcast first). Function names
and arguments match ``mmloss.functional`` (minus ``backend``) and ``mmloss.ops``.
Single-positive rows use the softplus form of docs/design.md ("Numerics rules"), like the fast paths.
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor
_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- helpers


def _compute_dtype(*tensors) -> torch.dtype:
    for t in tensors:
        if isinstance(t, Tensor) and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _scalar(value, dtype, device, rows: bool = False):
    if isinstance(value, Tensor):
        value = value.to(device=device, dtype=dtype)
        return value[:, None] if rows and value.dim() == 1 else value
    return float(value)


def _logits(x: Tensor, y: Tensor, scale, bias=None) -> Tensor:
    """L = s·x·yᵀ + b in the compute dtype (per-row scale broadcasts over columns)."""
    dt = _compute_dtype(x, y)
    L = (x.to(dt) @ y.to(dt).T) * _scalar(scale, dt, x.device, rows=True)
    if bias is not None:
        L = L + _scalar(bias, dt, x.device)
    return L


def _pair_marks(kind: str, n: int, m: int, offset: int, x_labels, y_labels, device) -> Tensor:
    """Boolean (N, M): True on the marked pairs (diagonal ``j == i + offset`` or same label)."""
    if kind == "none":
        return torch.zeros(n, m, dtype=torch.bool, device=device)
    if kind == "diagonal":
        i = torch.arange(n, device=device)[:, None]
        j = torch.arange(m, device=device)[None, :]
        return j == i + offset
    if kind == "same_label":
        return x_labels[:, None] == y_labels[None, :]
    raise ValueError(f"unknown mark kind {kind!r}")


def masked_logsumexp(L: Tensor, excluded: Tensor, dim: int) -> Tensor:
    """LSE over the non-excluded entries; −inf (with zero gradient) where all are excluded."""
    any_allowed = (~excluded).any(dim=dim, keepdim=True)
    safe = L.masked_fill(excluded, _NEG_INF).masked_fill(~any_allowed, 0.0)
    lse = torch.logsumexp(safe, dim=dim, keepdim=True)
    return lse.masked_fill(~any_allowed, _NEG_INF).squeeze(dim)


def softplus(t: Tensor) -> Tensor:
    """log(1 + e^t), exact at every magnitude."""
    return torch.logaddexp(t, torch.zeros((), dtype=t.dtype, device=t.device))


def reduce_terms(terms: Tensor, reduction: str, count: Optional[int] = None) -> Tensor:
    """"mean" = the loss; "sum" = mean × number of anchors; "none" = per-anchor terms."""
    if reduction == "none":
        return terms
    mean = terms.mean()
    if reduction == "mean":
        return mean
    if reduction == "sum":
        return mean * (terms.shape[0] if count is None else count)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _uniform_over(marks: Tensor) -> Tensor:
    """Row-normalised 0/1 matrix: a target uniform over the marked entries of each row."""
    m = marks.to(torch.float64)
    return m / m.sum(dim=1, keepdim=True)


# ----------------------------------------------------------------------------- primitives


def similarity_lse(x, y, scale, bias=None, *, exclude="none", offset=0, x_labels=None,
                   y_labels=None, rows=True, cols=True):
    """Dense ``similarity_lse`` (same contract as ``mmloss.ops.similarity_lse``)."""
    L = _logits(x, y, scale, bias)
    excluded = _pair_marks(exclude, L.shape[0], L.shape[1], offset, x_labels, y_labels, L.device)
    row = masked_logsumexp(L, excluded, dim=1) if rows else None
    col = masked_logsumexp(L, excluded, dim=0) if cols else None
    return row, col


def pairwise_sigmoid(x, y, scale, bias=None, *, positives="diagonal", offset=0, x_labels=None,
                     y_labels=None):
    """Dense ``pairwise_sigmoid``: per-row Σ_j softplus(−z_ij·L_ij)."""
    L = _logits(x, y, scale, bias)
    pos = _pair_marks(positives, L.shape[0], L.shape[1], offset, x_labels, y_labels, L.device)
    z = torch.where(pos, 1.0, -1.0).to(L.dtype)
    return softplus(-z * L).sum(dim=1)


# ----------------------------------------------------------------------------- §1 CLIP


def _softmax_ce_rows(L: Tensor, targets: Optional[Tensor], smoothing: float) -> Tensor:
    """Per-row cross-entropy of softmax(L_i) against (1−ε)·q_i + ε/M.

    ``targets`` None means q = one-hot on the diagonal, written in the softplus form.
    """
    n, m = L.shape
    lse_all = torch.logsumexp(L, dim=1)
    mean_all = L.mean(dim=1)
    if targets is None:
        diag = torch.diagonal(L)
        eye = _pair_marks("diagonal", n, m, 0, None, None, L.device)
        hard = softplus(masked_logsumexp(L, eye, dim=1) - diag)
    else:
        hard = lse_all - (targets.to(L.dtype) * L).sum(dim=1)
    if smoothing == 0.0:
        return hard
    return (1.0 - smoothing) * hard + smoothing * (lse_all - mean_all)


def clip_loss(image_features, text_features, logit_scale, logit_bias=None, *, labels=None,
              label_smoothing=0.0, reduction="mean"):
    """docs/losses.md §1. ``reduction="none"`` gives the (N,) terms ½(image_i + text_i)."""
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError("clip_loss needs as many texts as images")
    L = _logits(image_features, text_features, logit_scale, logit_bias)
    q = None if labels is None else _uniform_over(labels[:, None] == labels[None, :])
    rows = _softmax_ce_rows(L, q, label_smoothing)
    cols = _softmax_ce_rows(L.T, q, label_smoothing)
    terms = 0.5 * (rows + cols)
    return reduce_terms(terms, reduction)


# ----------------------------------------------------------------------------- §2 InfoNCE


def infonce_loss(query, keys, logit_scale, *, targets=None, query_labels=None, key_labels=None,
                 soft_targets=None, reduction="mean"):
    """docs/losses.md §2: queries (N, D) against keys (M, D)."""
    L = _logits(query, keys, logit_scale)
    n, m = L.shape
    if soft_targets is not None:
        terms = torch.logsumexp(L, dim=1) - (soft_targets.to(L.dtype) * L).sum(dim=1)
    elif query_labels is not None:
        q = _uniform_over(query_labels[:, None] == key_labels[None, :])
        terms = torch.logsumexp(L, dim=1) - (q.to(L.dtype) * L).sum(dim=1)
    else:
        t = torch.arange(n, device=L.device) if targets is None else targets
        positive = torch.arange(m, device=L.device)[None, :] == t[:, None]
        terms = softplus(masked_logsumexp(L, positive, dim=1) - L[torch.arange(n), t])
    return reduce_terms(terms, reduction)


# ----------------------------------------------------------------------------- §3 SigLIP


def siglip_positives(n: int, m: int, labels, device) -> Tensor:
    if labels is None:
        return _pair_marks("diagonal", n, m, 0, None, None, device)
    if isinstance(labels, (tuple, list)):
        return labels[0][:, None] == labels[1][None, :]
    return labels[:, None] == labels[None, :]


def siglip_loss(image_features, text_features, logit_scale, logit_bias=None, *, labels=None,
                reduction="mean"):
    """docs/losses.md §3: −(1/N) Σ_ij log sigmoid(z_ij·L_ij); "none" gives the (N,) row sums."""
    L = _logits(image_features, text_features, logit_scale, logit_bias)
    pos = siglip_positives(L.shape[0], L.shape[1], labels, L.device)
    z = torch.where(pos, 1.0, -1.0).to(L.dtype)
    terms = softplus(-z * L).sum(dim=1)
    return reduce_terms(terms, reduction)


__all__ = [
    "clip_loss",
    "infonce_loss",
    "masked_logsumexp",
    "pairwise_sigmoid",
    "siglip_loss",
    "similarity_lse",
    "softplus",
]
