"""Dense references of the self-supervised family: docs/losses.md §4–§8 and §12.

Each function is a literal transcription of its docs/losses.md section: it L2-normalises the inputs
(``F.normalize``, eps 1e-12, as lightly and the authors' code do, with long rows scaled down
first so that ‖x‖² cannot overflow), materialises the whole
similarity matrix and masks it, and lets autograd do the rest. Memory O((V·N)²): small inputs
only. Computation runs in float64 when an input is float64, else float32. Names and arguments
match ``mmloss.functional`` minus ``backend``; the fast paths never call into this module.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .core import _compute_dtype, _pair_marks, masked_logsumexp, reduce_terms, softplus

Tensor = torch.Tensor


def _unit(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``F.normalize(t, eps=1e-12)`` along the last dimension without squaring long rows.

    A row whose largest |entry| m exceeds 1 is divided by m first (a constant: t/‖t‖ does not
    depend on it), so ‖t‖² cannot overflow (it does in fp32 from ‖t‖ ≈ 1.8e19 on); such a row is
    longer than eps and the clamp cannot act. Other rows go through ``F.normalize`` unchanged
    (short rows become t/eps, zero rows stay zero). NaN/Inf entries give NaN rows.
    """
    t = t.to(dtype)
    peak = torch.linalg.vector_norm(t.detach(), ord=float("inf"), dim=-1, keepdim=True)
    down = torch.where(peak > 1, peak, torch.ones_like(peak))
    return F.normalize(t / down, p=2.0, dim=-1, eps=1e-12)


def _two_views(out0: Tensor, out1: Tensor, min_rows: int, name: str):
    if out0.shape != out1.shape or out0.dim() != 2:
        raise ValueError(f"{name}: out0 and out1 must be (N, D) of one shape")
    if out0.shape[0] < min_rows:
        raise ValueError(f"{name} needs N ≥ {min_rows} (negatives), got N = {out0.shape[0]}")
    dt = _compute_dtype(out0, out1)
    return _unit(out0, dt), _unit(out1, dt)


def _stacked_logits(z0: Tensor, z1: Tensor, temperature: float):
    """Z = [z0; z1] (2N rows), ℓ = Z·Zᵀ/τ, p(a) = the other view of a, and the mask of the
    2N−2 negatives of each anchor (everything but a itself and p(a))."""
    n = z0.shape[0]
    Z = torch.cat([z0, z1], dim=0)
    L = Z @ Z.T / temperature
    sample = torch.arange(n, device=Z.device).repeat(2)
    not_negative = _pair_marks("same_label", 2 * n, 2 * n, 0, sample, sample, Z.device)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(Z.device)
    positive = L[torch.arange(2 * n, device=Z.device), partner]
    return L, positive, not_negative


# ----------------------------------------------------------------------------- §4 NT-Xent


def ntxent_loss(out0: Tensor, out1: Tensor, temperature: float = 0.5, *, reduction: str = "mean") -> Tensor:
    """§4: (1/2N) Σ_a [LSE_{b≠a} ℓ_ab − ℓ_{a,p(a)}], each term as softplus(LSE_negatives − ℓ_{a,p(a)}).

    ``reduction="none"`` returns the (2N,) terms, view-0 anchors first. N = 1 has no negatives:
    every term is softplus(−∞) = 0 (LSE over the positive alone minus the positive).
    """
    z0, z1 = _two_views(out0, out1, 1, "ntxent_loss")
    L, positive, not_negative = _stacked_logits(z0, z1, temperature)
    terms = softplus(masked_logsumexp(L, not_negative, dim=1) - positive)
    return reduce_terms(terms, reduction)


# ----------------------------------------------------------------------------- §5 SupCon


def supcon_rows(embeddings: Tensor, labels: Optional[Tensor]):
    """The anchor rows of SupCon and their labels, in HobbitLong's order.

    (n, D) + labels (n,): as given. (B, V, D): ``cat(unbind(embeddings, dim=1))`` — all samples
    of view 0, then of view 1, … — with labels (B,) (default: the sample index) repeated V times.
    """
    if embeddings.dim() == 3:
        b, v, _ = embeddings.shape
        if v < 1:
            raise ValueError(f"supcon_loss needs at least one view, got embeddings of shape {tuple(embeddings.shape)}")
        rows = torch.cat(torch.unbind(embeddings, dim=1), dim=0)
        if labels is None:
            labels = torch.arange(b, device=embeddings.device)
        return rows, labels.repeat(v)
    if embeddings.dim() == 2:
        if labels is None:
            raise ValueError("supcon_loss with (n, D) embeddings needs labels (no positives otherwise)")
        return embeddings, labels
    raise ValueError("supcon_loss takes (n, D) embeddings with labels or a (B, V, D) tensor")


def supcon_loss(embeddings: Tensor, labels: Optional[Tensor] = None, temperature: float = 0.1,
                base_temperature: Optional[float] = None) -> Tensor:
    """§5 "L_out": (τ/τ_base)·mean_{a: |P(a)|>0} [LSE_{b≠a} ℓ_ab − (1/|P(a)|) Σ_{p∈P(a)} ℓ_ap].

    With no anchor having a positive the result is 0 and still part of the graph (zero gradient).
    """
    rows, row_labels = supcon_rows(embeddings, labels)
    base = temperature if base_temperature is None else base_temperature
    z = _unit(rows, _compute_dtype(rows))
    n = z.shape[0]
    L = z @ z.T / temperature
    self_pair = _pair_marks("diagonal", n, n, 0, None, None, z.device)
    lse = masked_logsumexp(L, self_pair, dim=1)
    positive = _pair_marks("same_label", n, n, 0, row_labels, row_labels, z.device) & ~self_pair
    count = positive.sum(dim=1)
    has_positive = count > 0
    mean_positive = (L * positive).sum(dim=1) / count.clamp(min=1)
    terms = torch.where(has_positive, lse - mean_positive, torch.zeros((), dtype=L.dtype))
    total = terms.sum() + 0.0 * L.sum()  # stays in the graph when no anchor has a positive
    return (temperature / base) * total / has_positive.sum().clamp(min=1)


# ----------------------------------------------------------------------------- §6 DCL / DCLW


def _dcl(z0: Tensor, z1: Tensor, temperature: float, w0, w1) -> Tensor:
    n = z0.shape[0]
    L, _, not_negative = _stacked_logits(z0, z1, temperature)
    negatives = masked_logsumexp(L, not_negative, dim=1)          # one LSE over the 2N−2 negatives
    positive = (z0 * z1).sum(dim=1) / temperature
    loss0 = (negatives[:n] - w0 * positive).mean()
    loss1 = (negatives[n:] - w1 * positive).mean()
    return 0.5 * (loss0 + loss1)


def dcl_loss(out0: Tensor, out1: Tensor, temperature: float = 0.1,
             weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None) -> Tensor:
    """§6 DCL: ½(mean_i ℓ_i^0 + mean_i ℓ_i^1), ℓ_i^k = −w·⟨z_i^0, z_i^1⟩/τ + LSE over the negatives.

    ``weight_fn(a, b)`` (lightly's convention) receives the normalised anchors' view first:
    w^0 = weight_fn(z0, z1), w^1 = weight_fn(z1, z0); None means w = 1.
    """
    z0, z1 = _two_views(out0, out1, 2, "dcl_loss")
    if weight_fn is None:
        return _dcl(z0, z1, temperature, 1.0, 1.0)
    return _dcl(z0, z1, temperature, weight_fn(z0, z1), weight_fn(z1, z0))


def dclw_loss(out0: Tensor, out1: Tensor, temperature: float = 0.1, sigma: float = 0.5) -> Tensor:
    """§6 DCLW: DCL with w_i = 2 − N·softmax_i(⟨z_i^0, z_i^1⟩/σ), detached."""
    z0, z1 = _two_views(out0, out1, 2, "dclw_loss")
    n = z0.shape[0]
    w = (2.0 - n * torch.softmax((z0 * z1).sum(dim=1) / sigma, dim=0)).detach()
    return _dcl(z0, z1, temperature, w, w)


# ----------------------------------------------------------------------------- §7 DHEL


def _within_view_lse(z: Tensor, temperature: float) -> Tensor:
    n = z.shape[0]
    L = z @ z.T / temperature
    return masked_logsumexp(L, _pair_marks("diagonal", n, n, 0, None, None, z.device), dim=1)


def dhel_loss(out0: Tensor, out1: Tensor, temperature: float = 0.3, include_augs: bool = True) -> Tensor:
    """§7: mean_i [LSE_{j≠i} ⟨u_i,u_j⟩/τ − ⟨u_i,v_i⟩/τ] (+ mean_i LSE_{j≠i} ⟨v_i,v_j⟩/τ)."""
    u, v = _two_views(out0, out1, 2, "dhel_loss")
    terms = _within_view_lse(u, temperature) - (u * v).sum(dim=1) / temperature
    if include_augs:
        terms = terms + _within_view_lse(v, temperature)
    return terms.mean()


# ----------------------------------------------------------------------------- §8 multi-view


def _stack_views(views: Union[Tensor, Sequence[Tensor]], min_instances: int, name: str) -> Tensor:
    """(V, M, D) unit rows from a (V, M, D) tensor or a list of V (M, D) tensors."""
    if isinstance(views, Tensor):
        stacked = views
    else:
        stacked = torch.stack(list(views))
    if stacked.dim() != 3 or stacked.shape[0] < 2 or stacked.shape[1] < min_instances:
        raise ValueError(
            f"{name} needs V ≥ 2 views of M ≥ {min_instances} instances, got {tuple(stacked.shape)}"
        )
    return _unit(stacked, _compute_dtype(stacked))


def mv_infonce_loss(views, temperature: float = 0.1, same_view_negatives: bool = True) -> Tensor:
    """§8 MV-InfoNCE: (1/M) Σ_i [LSE_l LSE_{(j,m)≠(i,l)} u_il·u_jm/τ − LSE_{l≠l'} u_il·u_il'/τ].

    ``same_view_negatives=False`` drops the pairs (j≠i, m=l) from the normaliser.
    """
    u = _stack_views(views, 1, "mv_infonce_loss")
    v, m, _ = u.shape
    flat = u.reshape(v * m, -1)                          # row l·M + i = view l of instance i
    L = flat @ flat.T / temperature
    view = torch.arange(v, device=u.device).repeat_interleave(m)
    excluded = _pair_marks("diagonal", v * m, v * m, 0, None, None, u.device)
    if not same_view_negatives:
        excluded = excluded | _pair_marks("same_label", v * m, v * m, 0, view, view, u.device)
    anchor_lse = masked_logsumexp(L, excluded, dim=1).reshape(v, m)
    normaliser = torch.logsumexp(anchor_lse, dim=0)      # grouped: one log per instance
    gram = torch.einsum("lid,kid->ilk", u, u) / temperature   # (M, V, V) per-instance view Gram
    off_diagonal = ~torch.eye(v, dtype=torch.bool, device=u.device)
    positive = torch.logsumexp(gram[:, off_diagonal], dim=1)  # ordered pairs l ≠ l'
    return (normaliser - positive).mean()


def mv_dhel_loss(views, temperature: float = 0.1) -> Tensor:
    """§8 MV-DHEL: (1/M) Σ_i [Σ_l LSE_{j≠i} u_il·u_jl/τ − LSE_{l<l'} u_il·u_il'/τ]."""
    u = _stack_views(views, 2, "mv_dhel_loss")
    v = u.shape[0]
    uniformity = sum(_within_view_lse(u[l], temperature) for l in range(v))
    gram = torch.einsum("lid,kid->ilk", u, u) / temperature
    upper = torch.triu(torch.ones(v, v, dtype=torch.bool, device=u.device), diagonal=1)
    positive = torch.logsumexp(gram[:, upper], dim=1)    # unordered pairs l < l'
    return (uniformity - positive).mean()


# ----------------------------------------------------------------------------- §12 HCL


def hcl_loss(out0: Tensor, out1: Tensor, temperature: float = 0.5, tau_plus: float = 0.1,
             beta: float = 1.0) -> Tensor:
    """§12, in the linear form of the authors' code: E_a = exp(LSE((1+β)n_a) − LSE(β n_a)),
    Ng_a = max((Ñ·E_a − τ⁺·Ñ·e^{p_a})/(1−τ⁺), Ñ·e^{−1/τ}), L = mean_a [log(e^{p_a} + Ng_a) − p_a]."""
    z0, z1 = _two_views(out0, out1, 2, "hcl_loss")
    n = z0.shape[0]
    L, positive, not_negative = _stacked_logits(z0, z1, temperature)
    count = 2 * n - 2
    log_e = (masked_logsumexp((1.0 + beta) * L, not_negative, dim=1)
             - masked_logsumexp(beta * L, not_negative, dim=1))
    ng = (count * torch.exp(log_e) - tau_plus * count * torch.exp(positive)) / (1.0 - tau_plus)
    ng = torch.clamp(ng, min=count * math.exp(-1.0 / temperature))
    terms = torch.log(torch.exp(positive) + ng) - positive
    return terms.mean()


__all__ = [
    "dcl_loss",
    "dclw_loss",
    "dhel_loss",
    "hcl_loss",
    "mv_dhel_loss",
    "mv_infonce_loss",
    "ntxent_loss",
    "supcon_loss",
]
