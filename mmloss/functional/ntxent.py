"""NT-Xent / SimCLR (docs/losses.md §4): each of the 2N anchors of two views against its other
view, the 2N−2 other rows as negatives; optionally lightly's memory-bank (MoCo) form.

Composed of ``ssl_common.Views`` blocks (two within-view, one cross-view). ``ntxent_terms`` is
the NT-Xent block layout that DCL reuses with its own positive weighting.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from .._device import no_autocast
from ..ops import similarity_lse
from ._common import as_compute, reduce, softplus
from .ssl_common import Views, check_temperature, prepare_two_views
from .ssl_gather import open_exchange, resolve_distributed, views_of

Tensor = torch.Tensor


def ntxent_terms(views, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(negatives view 0, negatives view 1, positive logits), each (N,), of ``Views`` or (this
    rank's anchors against the global batch) ``GatheredViews``."""
    positive = views.positive(0, 1)
    (neg0, neg1), = views.normalisers(within=True, across="diagonal", backend=backend)
    return neg0, neg1, positive


def ntxent_loss(out0: Tensor, out1: Tensor, temperature: float = 0.5, *, reduction: str = "mean",
                memory_bank: Optional[Tensor] = None, backend: str = "auto",
                check_finite: bool = False, distributed=None, group=None,
                uniform_shards: bool = False) -> Tensor:
    """NT-Xent / SimCLR (docs/losses.md §4), lightly's ``NTXentLoss`` without a memory bank.

    ``L = (1/2N) Σ_a [LSE_{b≠a} ℓ_ab − ℓ_{a,p(a)}]`` over Z = [u0; u1] (2N anchors), ℓ = ⟨u_a, u_b⟩/τ,
    p(a) the other view of a; each term is computed as ``softplus(LSE_negatives − ℓ_{a,p(a)})``
    over the 2N−2 negatives (docs/design.md numerics).

    Args:
        out0, out1: (N, D) fp16/bf16/fp32/fp64 views, L2-normalised inside; N ≥ 1. With N = 1
            there are no negatives and every term is softplus(−∞) = 0 (the closed form log(2N−1)
            of identical rows at N = 1); the result stays in the graph with a zero gradient.
        temperature: τ > 0 (Python float), default 0.5 (lightly).
        reduction: "mean" | "sum" (2N × mean) | "none" ((2N,) terms, view-0 anchors first).
        memory_bank: None, or (K, D) negatives (no gradient; rows used as given — lightly stores
            unit rows): lightly's memory-bank (MoCo) form. Only view-0 rows are anchors;
            ``ℓ_i = LSE(p_i, ⟨u0_i, b_k⟩/τ for all k) − p_i`` with p_i = ⟨u0_i, u1_i⟩/τ, i.e.
            ``softplus(LSE_k ⟨u0_i, b_k⟩/τ − p_i)``; "sum"/"none" then refer to N anchors.
            One N×K ``similarity_lse`` call (rows only): no N×K tensor is kept.
        check_finite: True raises a ValueError naming the input tensor that holds NaN/Inf
            (default False: they propagate to a NaN loss, as in torch; a host sync on GPUs).
        distributed: None (default: the loss of the given rows) | "auto" (gather when a process
            group of world size > 1 is initialised; a collective call, every rank of the group
            must make it) | "gather" | "ring" (ValueError: NT-Xent has no ring form). Gathered,
            the rows of every rank form the global batch (rank order; ranks may hold different
            N ≥ 1): this rank's 2·N_local anchors run against the unit rows of both views of
            every rank, gathered once (``ssl_common.GatheredViews``), so the value is the
            single-process loss of the global batch on every rank and the gradient is W × this
            rank's share (``mmloss.distributed``: DDP's average gives the single-process
            gradient). "sum": the global sum; "none": this rank's (2·N_local,) terms (view-0
            anchors first), gradient × W. With ``memory_bank`` only the reduction is global:
            the bank (identical on every rank) is never gathered.
        group: the process group (default: the world). uniform_shards: every rank holds the
            same N (skips the exchange of sizes, D and dtype).

    Returns fp32 (fp64 for fp64 inputs). Primitives: two within-view blocks and one cross-view
    block (``exclude="diagonal"``), each N×N. Memory O(N·D) plus one block's workspace; gathered,
    four N_local×N_global row-only blocks and the gathered 2·N_global·D unit rows (compute dtype).
    """
    mode = resolve_distributed("ntxent_loss", distributed, group, uniform_shards)
    x0, x1 = prepare_two_views(out0, out1, 1, "ntxent_loss", check_finite)
    tau = check_temperature("temperature", temperature, V.compute_dtype(x0))
    V.check_reduction(reduction)
    bank = None
    if memory_bank is not None:
        bank = V.check_features("memory_bank", memory_bank, min_rows=1)
        V.check_same_device(("out0", x0), ("memory_bank", bank))
        V.check_same_dim("out0", x0, "memory_bank", bank)
        if V.check_bool("check_finite", check_finite):
            V.check_all_finite(("memory_bank", bank))
    comm = open_exchange("ntxent_loss", mode, group, uniform_shards, 1, out0=x0)
    with no_autocast(x0.device):
        if bank is not None:  # the bank is shared by every rank: never gathered
            views = Views([x0, x1], tau)
            positive = views.positive(0, 1)
            negatives, _ = similarity_lse(views.raw[0], as_compute(bank.detach(), views.dtype), views.scale[0],
                                          cols=False, backend=backend)
            terms = softplus(negatives - positive)
            return reduce(terms, reduction) if comm is None else comm.finish(terms, reduction, anchors="out0")
        views = views_of([x0, x1], tau, comm, "out0")
        if views.rows == 1:
            positive = views.positive(0, 1)
            neg = torch.full_like(positive, float("-inf"))
            terms = softplus(torch.cat([neg, neg]) - torch.cat([positive, positive]))
            return views.reduce(terms, reduction)
        neg0, neg1, positive = ntxent_terms(views, backend)
        terms = torch.cat([softplus(neg0 - positive), softplus(neg1 - positive)])
        return views.reduce(terms, reduction)


__all__ = ["ntxent_loss"]
