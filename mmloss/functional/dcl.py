"""Decoupled contrastive loss (docs/losses.md §6): NT-Xent with the positive removed from the
normaliser and a weight on the positive term — user weights (DCL, lightly's ``weight_fn``) or
the negative von Mises–Fisher weights (DCLW).

Both share the NT-Xent block layout (``ntxent.ntxent_terms``) and differ only in the weights.
"""
from __future__ import annotations

import numbers
from typing import Callable, Optional, Union

import torch

from .. import _validation as V
from .._device import no_autocast
from .ntxent import ntxent_terms
from .ssl_common import check_positive_float, check_temperature, prepare_two_views
from .ssl_gather import GatheredViews, min_local_rows, open_exchange, resolve_distributed, views_of

Tensor = torch.Tensor


def _weights(value, n: int, name: str, dt: torch.dtype, device) -> Union[Tensor, float]:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must return a tensor or a number, got {type(value).__name__}")
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != n):
        raise ValueError(f"{name} must return a scalar or a ({n},) tensor, got shape {tuple(value.shape)}")
    return value.to(device=device, dtype=dt)


def check_weight_fn(weight_fn) -> None:
    """DCL's ``weight_fn``: None or a callable (TypeError otherwise)."""
    if weight_fn is not None and not callable(weight_fn):
        raise TypeError(f"weight_fn must be callable or None, got {type(weight_fn).__name__}")


def _dcl(views, w0, w1, backend: str) -> Tensor:
    """DCL of ``Views``, or of this rank's anchors against the global batch (``GatheredViews``;
    the weights are the whole batch's, this rank's rows are taken)."""
    neg0, neg1, positive = ntxent_terms(views, backend)
    w0, w1 = views.local_part(w0), views.local_part(w1)
    if isinstance(views, GatheredViews):
        return views.reduce(torch.cat([neg0 - w0 * positive, neg1 - w1 * positive]), "mean")
    return 0.5 * ((neg0 - w0 * positive).mean() + (neg1 - w1 * positive).mean())


def dcl_loss(out0: Tensor, out1: Tensor, temperature: float = 0.1,
             weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None, *,
             backend: str = "auto", check_finite: bool = False, distributed=None, group=None,
             uniform_shards: bool = False) -> Tensor:
    """Decoupled contrastive loss (docs/losses.md §6; Yeh et al. 2022), lightly's ``DCLLoss``.

    ``ℓ_i^k = −w_i^k·⟨u_i^0, u_i^1⟩/τ + LSE over the 2N−2 negatives of anchor (k, i)`` (the positive
    is removed from the normaliser), ``L = ½(mean_i ℓ^0 + mean_i ℓ^1)``.

    Args:
        out0, out1: (N, D) views, N ≥ 2, L2-normalised inside. temperature: τ > 0, default 0.1.
        weight_fn: None (w = 1) or a callable ``weight_fn(a, b)`` returning a scalar or (N,)
            weights, called as lightly does with the normalised views: w^0 = weight_fn(u0, u1),
            w^1 = weight_fn(u1, u0). Its output is used as returned (detach inside it if needed).
        check_finite: True raises a ValueError naming the input tensor that holds NaN/Inf
            (default False: they propagate to a NaN loss, as in torch; a host sync on GPUs).
        distributed, group, uniform_shards: as ``ntxent_loss`` ("ring" raises: DCL has no ring
            form). Gathered, the global batch needs N ≥ 2 rows in all (a rank may hold one);
            ``weight_fn`` is called once per view order with the normalised views of the GLOBAL
            batch (gathered, with gradient) and this rank's rows of its output weight its
            anchors, so any weight_fn — also one that couples the rows, like DCLW's softmax —
            gives the single-process loss (lightly calls it on each rank's rows).

    Primitives: as ``ntxent_loss``. Memory O(N·D) plus one block's workspace.
    """
    mode = resolve_distributed("dcl_loss", distributed, group, uniform_shards)
    x0, x1 = prepare_two_views(out0, out1, min_local_rows(mode, 2), "dcl_loss", check_finite)
    tau = check_temperature("temperature", temperature, V.compute_dtype(x0))
    check_weight_fn(weight_fn)
    comm = open_exchange("dcl_loss", mode, group, uniform_shards, 2, out0=x0)
    with no_autocast(x0.device):
        views = views_of([x0, x1], tau, comm, "out0")
        w0 = w1 = 1.0
        if weight_fn is not None:
            u0, u1 = views.unit(0), views.unit(1)
            w0 = _weights(weight_fn(u0, u1), views.rows, "weight_fn", views.dtype, u0.device)
            w1 = _weights(weight_fn(u1, u0), views.rows, "weight_fn", views.dtype, u0.device)
        return _dcl(views, w0, w1, backend)


def dclw_loss(out0: Tensor, out1: Tensor, temperature: float = 0.1, sigma: float = 0.5, *,
              backend: str = "auto", check_finite: bool = False, distributed=None, group=None,
              uniform_shards: bool = False) -> Tensor:
    """Weighted DCL (docs/losses.md §6), lightly's ``DCLWLoss``: DCL with the negative von Mises–Fisher
    weights ``w_i = 2 − N·softmax_i(⟨u_i^0, u_i^1⟩/σ)``, detached; σ > 0 with 1/σ finite in the
    compute dtype, default 0.5; τ default 0.1. ``check_finite`` and ``distributed``, ``group``,
    ``uniform_shards`` as in ``dcl_loss``: gathered, N and the softmax run over the global batch
    (exact; lightly's gathering DCLW uses each rank's own softmax)."""
    mode = resolve_distributed("dclw_loss", distributed, group, uniform_shards)
    x0, x1 = prepare_two_views(out0, out1, min_local_rows(mode, 2), "dclw_loss", check_finite)
    dt = V.compute_dtype(x0)
    tau = check_temperature("temperature", temperature, dt)
    sig = check_positive_float("sigma", sigma, dt)
    comm = open_exchange("dclw_loss", mode, group, uniform_shards, 2, out0=x0)
    with no_autocast(x0.device):
        views = views_of([x0, x1], tau, comm, "out0")
        with torch.no_grad():
            w = 2.0 - views.rows * torch.softmax(views.cosine_value(0, 1) / sig, dim=0)
        return _dcl(views, w, w, backend)


__all__ = ["dcl_loss", "dclw_loss"]
