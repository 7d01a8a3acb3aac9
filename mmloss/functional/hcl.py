"""Hard-negative, debiased contrastive loss, HCL (docs/losses.md §12): NT-Xent whose negatives are
reweighted by their hardness (concentration β) and debiased for false negatives (class prior τ⁺),
all in log space.

Composed of the NT-Xent blocks of ``ssl_common.Views`` at the scales (1+β)/τ and β/τ.
"""
from __future__ import annotations

import math

import torch

from .. import _validation as V
from .._device import no_autocast
from ._common import softplus
from .ssl_common import check_temperature, prepare_two_views
from .ssl_gather import min_local_rows, open_exchange, resolve_distributed, views_of

Tensor = torch.Tensor


def check_concentration(beta) -> float:
    """HCL's β: a finite Python float ≥ 0."""
    V.check_real("beta", beta, "a Python float")
    # Value checks on Python numbers only outside torch.compile (a module attribute may be a
    # symbolic float there, as in V.check_scalar).
    if V.value_checks_enabled() and not (math.isfinite(beta) and beta >= 0.0):
        raise ValueError(f"beta must be finite and ≥ 0, got {beta}")
    return float(beta)


def _log1mexp(t: Tensor) -> Tensor:
    """log(1 − e^t) for t < 0 (accurate on both sides of −log 2)."""
    return torch.where(t > -math.log(2.0), torch.log(-torch.expm1(t)), torch.log1p(-torch.exp(t)))


def hcl_loss(out0: Tensor, out1: Tensor, temperature: float = 0.5, tau_plus: float = 0.1,
             beta: float = 1.0, *, backend: str = "auto", check_finite: bool = False, distributed=None,
             group=None, uniform_shards: bool = False) -> Tensor:
    """Hard-negative, debiased contrastive loss (docs/losses.md §12; Robinson et al. 2021).

    In the NT-Xent layout (2N anchors, positive logit p_a, negatives n_aj = ℓ over the 2N−2 others):
    ``E_a = exp(LSE((1+β)·n_a) − LSE(β·n_a))``,
    ``Ng_a = max((Ñ·E_a − τ⁺·Ñ·e^{p_a})/(1−τ⁺), Ñ·e^{−1/τ})``, Ñ = 2N−2,
    ``L = mean_a [log(e^{p_a} + Ng_a) − p_a]``, all in log space:
    ``log Ng = max(log Ñ + log E + log(1 − τ⁺·e^{p−log E}) − log(1−τ⁺), log Ñ − 1/τ)`` (the first
    branch is −∞ when τ⁺·e^p ≥ E) and the term is ``softplus(log Ng − p)``.

    Args: out0, out1 (N, D), N ≥ 2, normalised inside; temperature τ > 0 (default 0.5);
    tau_plus τ⁺ ∈ [0, 1) (default 0.1); beta β ≥ 0 (default 1.0), with (1+β)/τ·1e12 finite in
    the compute dtype (the largest per-row logit scale). β = 0, τ⁺ = 0 is NT-Xent.
    ``check_finite=True`` raises a ValueError naming an input holding NaN/Inf (default: they
    propagate).
    Primitives: the NT-Xent blocks at scale (1+β)/τ and, when β ≠ 0, again at β/τ (β = 0 gives
    LSE(0·n) = log Ñ without a call). Memory O(N·D) plus one block's workspace.

    ``distributed`` (None | "auto" | "gather"; "ring" raises: HCL has no ring form), ``group``,
    ``uniform_shards``: as ``ntxent_loss``. Gathered, N (in Ñ = 2N−2) is the global batch's
    (≥ 2; a rank may hold one row) and this rank's anchors' log-sum-exps run over the 2N−2
    negatives of the global batch (per anchor, so exact); the value is the global loss on every
    rank, the gradient W × this rank's share (``mmloss.distributed``). Memory: the gathered
    2·N_global·D unit rows plus one N_local×N_global block's workspace.
    """
    mode = resolve_distributed("hcl_loss", distributed, group, uniform_shards)
    x0, x1 = prepare_two_views(out0, out1, min_local_rows(mode, 2), "hcl_loss", check_finite)
    beta = check_concentration(beta)
    tau = check_temperature("temperature", temperature, V.compute_dtype(x0), beta=beta)
    tp = V.check_fraction("tau_plus", tau_plus)
    comm = open_exchange("hcl_loss", mode, group, uniform_shards, 2, out0=x0)
    with no_autocast(x0.device):
        views = views_of([x0, x1], tau, comm, "out0")
        # log Ñ as a tensor: math.log of the (symbolic) row count would make torch.compile
        # specialise on the batch size.
        log_count = torch.log(torch.full((), 2 * views.rows - 2, dtype=views.dtype, device=x0.device))
        positive = views.positive(0, 1)
        positive = torch.cat([positive, positive])
        factors = (1.0 + beta,) if beta == 0.0 else (1.0 + beta, beta)
        lses = [torch.cat(per_view) for per_view in
                views.normalisers(within=True, across="diagonal", factors=factors, backend=backend)]
        # log E = LSE((1+β)·n) − LSE(β·n); with β = 0 the second LSE is log Ñ.
        log_e = lses[0] - (log_count if beta == 0.0 else lses[1])
        log_ng = log_count + log_e
        if tp > 0.0:
            # log(Ñ·E − τ⁺·Ñ·e^p) − log(1−τ⁺) = log Ñ + log E + log(1 − e^t) − log(1−τ⁺)
            # with t = log τ⁺ + p − log E; for t ≥ 0 the first branch is −∞ (the floor wins).
            t = math.log(tp) + positive - log_e
            below = t < 0
            safe_t = torch.where(below, t, torch.full_like(t, -1.0))
            log_ng = torch.where(below, log_ng + _log1mexp(safe_t) - math.log1p(-tp), float("-inf"))
        log_ng = torch.clamp(log_ng, min=log_count - 1.0 / tau)
        return views.reduce(softplus(log_ng - positive), "mean")


__all__ = ["hcl_loss"]
