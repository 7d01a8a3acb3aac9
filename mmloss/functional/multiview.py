"""Multi-view losses (docs/losses.md §8): V ≥ 2 views of M instances, the other views of an
instance as its positives — MV-InfoNCE (one normaliser over all views) and MV-DHEL (uniformity
within each view).

Both take a (V, M, D) tensor or a list of V (M, D) tensors (``_view_list``) and the
``ssl_common.Views`` blocks; the positive term is an LSE over view pairs (``_pair_lse``).
"""
from __future__ import annotations

import math

import torch

from .. import _validation as V
from .._device import no_autocast
from .ssl_common import check_temperature
from .ssl_gather import min_local_rows, open_exchange, resolve_distributed, views_of

Tensor = torch.Tensor


def _view_list(views, min_instances: int, loss: str, check_finite: bool) -> list[Tensor]:
    """V ≥ 2 views of M instances from a (V, M, D) tensor or a list/tuple of (M, D) tensors,
    promoted to one dtype (autocast honoured, as the primitives do)."""
    if isinstance(views, Tensor):
        V.check_features("views", views, ndim=3)
        parts = list(views.unbind(0))
    elif isinstance(views, (list, tuple)):
        parts = [V.check_features(f"views[{k}]", t) for k, t in enumerate(views)]
    else:
        raise TypeError(
            f"views must be a (V, M, D) tensor or a list of (M, D) tensors, got {type(views).__name__}"
        )
    if len(parts) < 2:
        raise ValueError(f"{loss} needs at least 2 views (positives are other views), got {len(parts)}")
    for k, t in enumerate(parts[1:], start=1):
        V.check_same_device(("views[0]", parts[0]), (f"views[{k}]", t))
        V.check_same_shape("views[0]", parts[0], f"views[{k}]", t)
    if parts[0].shape[0] < min_instances:
        raise ValueError(
            f"{loss} needs at least {min_instances} instances per view, got views of shape "
            f"{tuple(parts[0].shape)}"
        )
    dtype = V.common_dtype(*parts)
    parts = [t.to(dtype) for t in parts]
    if V.check_bool("check_finite", check_finite):
        if isinstance(views, Tensor):
            V.check_all_finite(("views", views))
        V.check_all_finite(*((f"views[{k}]", t) for k, t in enumerate(parts)))
    return parts


def _pair_lse(views, ordered: bool) -> Tensor:
    """(M,) LSE of u_il·u_il'/τ over view pairs l < l' (``ordered``: over l ≠ l', i.e. + log 2)."""
    pairs = [views.positive(l, m) for l in range(views.count) for m in range(l + 1, views.count)]
    lse = pairs[0] if len(pairs) == 1 else torch.logsumexp(torch.stack(pairs), dim=0)
    return lse + math.log(2.0) if ordered else lse


def mv_infonce_loss(views, temperature: float = 0.1, same_view_negatives: bool = True, *,
                    backend: str = "auto", check_finite: bool = False, distributed=None, group=None,
                    uniform_shards: bool = False) -> Tensor:
    """Multi-view InfoNCE (docs/losses.md §8; Koromilas et al. 2025).

    ``L = (1/M) Σ_i [LSE_l LSE_{(j,m)≠(i,l)} u_il·u_jm/τ − LSE_{l≠l'} u_il·u_il'/τ]``: the V row LSEs
    of instance i are combined by one more LSE; the positive LSE runs over ordered view pairs.

    Args:
        views: (V, M, D) tensor or a list of V (M, D) tensors; V ≥ 2, M ≥ 1; normalised inside.
        temperature: τ > 0, default 0.1.
        same_view_negatives: True (the authors' code) keeps the pairs (j≠i, m=l) in the
            normaliser; False drops them (the paper's printed form).
        check_finite: True raises a ValueError naming the input tensor that holds NaN/Inf
            (default False: they propagate to a NaN loss, as in torch; a host sync on GPUs).
        distributed: None (default: the loss of the given rows) | "auto" (gather when a process
            group of world size > 1 is initialised; a collective call) | "gather" | "ring"
            (ValueError: no ring form). Gathered, the instances of every rank form the global
            batch (rank order, any M_local ≥ 1 per rank); the unit rows of all V views are
            gathered in one collective and this rank's instances run against them (V(V−1)
            cross-view and V within-view N_local×N_global row-only blocks). The value is the
            global loss on every rank, the gradient W × this rank's share
            (``mmloss.distributed``). group, uniform_shards: as ``ntxent_loss``.

    Primitives: V(V−1)/2 cross-view blocks (nothing excluded: the other views of the instance
    are in the normaliser) and, with ``same_view_negatives``, V within-view blocks. Positives:
    V(V−1)/2 row-wise dots, O(M·V²·D). Memory O(V·M·D) plus one block's workspace (gathered:
    the V·M_global·D gathered unit rows).
    """
    mode = resolve_distributed("mv_infonce_loss", distributed, group, uniform_shards)
    parts = _view_list(views, 1, "mv_infonce_loss", check_finite)
    tau = check_temperature("temperature", temperature, V.compute_dtype(parts[0]))
    V.check_bool("same_view_negatives", same_view_negatives)
    comm = open_exchange("mv_infonce_loss", mode, group, uniform_shards, 1, views=parts[0])
    with no_autocast(parts[0].device):
        vs = views_of(parts, tau, comm, "views")
        positive = _pair_lse(vs, ordered=True)
        normalisers, = vs.normalisers(within=same_view_negatives, across="none", backend=backend)
        grouped = torch.logsumexp(torch.stack(normalisers), dim=0)
        return vs.reduce(grouped - positive, "mean")


def mv_dhel_loss(views, temperature: float = 0.1, *, backend: str = "auto", check_finite: bool = False,
                 distributed=None, group=None, uniform_shards: bool = False) -> Tensor:
    """Multi-view DHEL (docs/losses.md §8; Koromilas et al. 2025).

    ``L = (1/M) Σ_i [Σ_l LSE_{j≠i} u_il·u_jl/τ − LSE_{l<l'} u_il·u_il'/τ]``: uniformity within each
    view only. views: (V, M, D) or a list of V (M, D); V ≥ 2, M ≥ 2 (negatives); normalised
    inside; τ default 0.1; ``check_finite`` as in ``mv_infonce_loss``. Primitives: V within-view
    blocks. Memory O(V·M·D) plus one block's workspace. ``distributed``, ``group``,
    ``uniform_shards``: as ``mv_infonce_loss`` (V within-view N_local×N_global blocks; "ring"
    raises); gathered, M ≥ 2 is needed of the global batch only (a rank may hold one instance).
    """
    mode = resolve_distributed("mv_dhel_loss", distributed, group, uniform_shards)
    parts = _view_list(views, min_local_rows(mode, 2), "mv_dhel_loss", check_finite)
    tau = check_temperature("temperature", temperature, V.compute_dtype(parts[0]))
    comm = open_exchange("mv_dhel_loss", mode, group, uniform_shards, 2, views=parts[0])
    with no_autocast(parts[0].device):
        vs = views_of(parts, tau, comm, "views")
        positive = _pair_lse(vs, ordered=False)
        uniformity, = vs.normalisers(within=True, across=None, backend=backend)
        return vs.reduce(sum(uniformity) - positive, "mean")


__all__ = ["mv_dhel_loss", "mv_infonce_loss"]
