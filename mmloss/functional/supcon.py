"""Supervised contrastive loss, "L_out" (docs/losses.md §5): anchors against every row of their
class as positives, in pytorch-metric-learning's (n, D) + labels and HobbitLong's (B, V, D) call
styles, or against PML's reference set (``ref_emb``/``ref_labels``).

Positives are summed per class (class sums of unit rows, O(n·D)); the normalisers are the
``ssl_common.Views`` blocks with nothing excluded across views.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from .._device import no_autocast
from ..ops import similarity_lse
from ._common import LabelClasses, class_slots
from .ssl_common import Views, check_positive_float, check_temperature
from .ssl_gather import GatheredViews, open_exchange, resolve_distributed

Tensor = torch.Tensor


class _SquaredNorms(torch.autograd.Function):
    """(K,) ‖s_k‖² of (K, D) rows; backward forms one K×D temporary (2·g·s)."""

    @staticmethod
    def forward(ctx, rows):
        ctx.save_for_backward(rows)
        return torch.linalg.vecdot(rows, rows)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return rows * (2.0 * grad)[:, None]


def _supcon_views(embeddings, labels, check_finite: bool) -> tuple[list[Tensor], Tensor]:
    """The views (each (B, D)) and the (B,) labels shared by every view."""
    if not isinstance(embeddings, Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    if embeddings.dim() == 3:
        V.check_features("embeddings", embeddings, ndim=3)
        if embeddings.shape[1] < 1:
            raise ValueError(
                f"embeddings (B, V, D) must hold at least one view per sample (V ≥ 1), got shape "
                f"{tuple(embeddings.shape)}"
            )
        b = embeddings.shape[0]
        if labels is None:
            labels = torch.arange(b, device=embeddings.device)
        else:
            V.check_labels("labels", labels, b, embeddings.device)
        parts = list(embeddings.unbind(1))
    elif embeddings.dim() == 2:
        if labels is None:
            raise ValueError(
                f"supcon_loss with 2-D embeddings {tuple(embeddings.shape)} needs labels: without "
                "them no row has a positive (pass a (B, V, D) tensor for views of one sample)"
            )
        V.check_features("embeddings", embeddings)
        V.check_labels("labels", labels, embeddings.shape[0], embeddings.device)
        parts = [embeddings]
    else:
        raise ValueError(
            f"embeddings must be (n, D) with labels or (B, V, D), got shape {tuple(embeddings.shape)}"
        )
    if V.check_bool("check_finite", check_finite):
        V.check_all_finite(("embeddings", embeddings))
    dtype = V.common_dtype(embeddings)
    parts = [t.to(dtype) for t in parts]
    return parts, labels


def supcon_loss(embeddings: Tensor, labels: Optional[Tensor] = None, temperature: float = 0.1,
                base_temperature: Optional[float] = None, *, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, indices_tuple=None, backend: str = "auto",
                check_finite: bool = False, distributed=None, group=None,
                uniform_shards: bool = False) -> Tensor:
    """Supervised contrastive loss, "L_out" (docs/losses.md §5; Khosla et al. 2020).

    ``L = (τ/τ_base)·mean_{a: |P(a)|>0} [LSE_{b≠a} ℓ_ab − (1/|P(a)|) Σ_{p∈P(a)} ℓ_ap]``, positives
    P(a) = {b ≠ a: y_b = y_a}, which stay in the normaliser.

    Args:
        embeddings: (n, D) rows with ``labels`` (n,) — pytorch-metric-learning's call style — or
            (B, V, D), V views per sample (HobbitLong's style) with ``labels`` (B,) defaulting to
            the sample index; the anchors are ordered view-major (all samples of view 0, then view
            1, …) as HobbitLong's ``cat(unbind(features, 1))``. L2-normalised inside.
            2-D embeddings without labels are a ValueError.
        temperature: τ > 0, default 0.1. base_temperature: τ_base > 0, default τ; τ/τ_base must
            be finite in the compute dtype.
        ref_emb, ref_labels: pytorch-metric-learning's reference set, (m, D) and (m,), given
            together with 2-D embeddings and labels. The anchors are the rows of ``embeddings``;
            positives and negatives come from ``ref_emb`` only: P(a) = {r: ref_labels_r =
            labels_a} (no self-exclusion: a row that is also in ref_emb is its own positive, as
            in PML), the normaliser runs over every reference row. Gradients reach both sets.
            As in PML, passing the labels tensor itself as ``ref_labels`` (the same object)
            excludes the pairs (i, i) from positives and normaliser (then n = m).
            One n×m ``similarity_lse`` call (rows only) plus per-class sums of the unit
            reference rows: memory O((n+m)·D).
        indices_tuple: must be None. Miner output (pairs or triplets) would index the n×m pair
            matrix mmloss never forms: NotImplementedError, naming what is supported.
        check_finite: True raises a ValueError naming the input tensor that holds NaN/Inf
            (default False: they propagate to a NaN loss, as in torch; a host sync on GPUs).
        distributed: None (default: the loss of the given rows) | "auto" (gather when a process
            group of world size > 1 is initialised; a collective call) | "gather" | "ring"
            (ValueError: SupCon has no ring form). Gathered, the samples of every rank form the
            global batch (rank order, any number ≥ 1 per rank) and ``labels`` travel with their
            rows (the default labels of a (B, V, D) call are the GLOBAL sample indices): this
            rank's anchors run against the unit rows of all views of every rank (gathered once)
            and the class sums of the global batch; the number of anchors with a positive is
            counted over the global labels. With ``ref_emb``, the reference set (and
            ``ref_labels``) is gathered too, as pytorch-metric-learning's
            ``DistributedLossWrapper`` does, and the anchors' labels are gathered to count the
            global anchors; ``ref_labels`` given as the labels tensor itself excludes the global
            pairs (i, i). The value is the global loss on every rank, the gradient W × this
            rank's share (``mmloss.distributed``). group: the process group; uniform_shards:
            every rank holds the same number of rows (skips the exchange of sizes).

    Anchors without a positive are skipped; when none has one the loss is 0 and still
    backpropagates (zero gradient). (B, 2, D) without labels equals ``ntxent_loss`` at the same τ.
    Primitives: V within-view and V(V−1)/2 cross-view blocks (B×B, nothing excluded across views);
    positives: Σ_{a∈c} Σ_{p∈P(a)} ⟨u_a, u_p⟩ = ‖S_c‖² − Σ_{a∈c} ‖u_a‖² with S_c the class sum of
    unit rows. Memory O(n·D) plus one block's workspace (gathered: the V·B_global·D gathered unit
    rows and one B_local×B_global block's). Returns fp32 (fp64 for fp64 inputs).
    """
    mode = resolve_distributed("supcon_loss", distributed, group, uniform_shards)
    if indices_tuple is not None:
        raise NotImplementedError(
            "supcon_loss: indices_tuple (a miner's pairs or triplets) is not supported — mmloss never "
            "forms the pair matrix a miner indexes. Supported: all pairs defined by labels "
            "(indices_tuple=None), optionally against a reference set (ref_emb=, ref_labels=)"
        )
    if ref_emb is not None or ref_labels is not None:
        return _supcon_against_refs(embeddings, labels, ref_emb, ref_labels, temperature, base_temperature,
                                    backend, check_finite, mode, group, uniform_shards)
    sample_labels = labels is None
    parts, labels = _supcon_views(embeddings, labels, check_finite)
    dt = V.compute_dtype(parts[0])
    tau = check_temperature("temperature", temperature, dt)
    base = tau if base_temperature is None else check_positive_float("base_temperature", base_temperature, dt)
    ratio = float(V.check_scalar("temperature / base_temperature", tau / base, positive=True, dtype=dt))
    comm = open_exchange("supcon_loss", mode, group, uniform_shards, 1, embeddings=parts[0])
    if comm is not None:
        if sample_labels:  # the default labels are the global sample indices
            labels = labels + comm.shards["embeddings"].offset
        with no_autocast(parts[0].device):
            return ratio * _supcon_gathered(GatheredViews(Views(parts, tau), comm, "embeddings"), labels, backend)
    with no_autocast(parts[0].device):
        views = Views(parts, tau)
        dt, device = views.dtype, views.raw[0].device
        b = views.rows

        # Class sums over every view: sample k of each view carries labels[k].
        slots = class_slots(torch.sort(labels).values, labels)
        unit_sum = views.unit(0)
        squares = views.squared_unit_norm(0)
        for l in range(1, views.count):
            unit_sum = unit_sum + views.unit(l)
            squares = squares + views.squared_unit_norm(l)
        class_sum = torch.zeros(b, unit_sum.shape[1], dtype=dt, device=device).index_add(0, slots, unit_sum)
        class_squares = torch.zeros(b, dtype=dt, device=device).index_add(0, slots, squares)
        class_rows = torch.zeros(b, dtype=dt, device=device).index_add(
            0, slots, torch.full((b,), float(views.count), dtype=dt, device=device))
        # Σ over ordered pairs (a, p), a ≠ p, of one class of ⟨u_a, u_p⟩ / |P(a)|, per class slot.
        pairs_per_anchor = class_rows - 1.0
        has_positives = pairs_per_anchor > 0
        positive_sum = (_SquaredNorms.apply(class_sum) - class_squares) / pairs_per_anchor.clamp_min(1.0)
        positive_total = torch.where(has_positives, positive_sum, 0.0).sum() / tau

        anchor_ok = has_positives[slots]                         # (B,) the same for every view
        normalisers, = views.normalisers(within=True, across="none", backend=backend)
        lse_total = sum(torch.where(anchor_ok, r, 0.0).sum() for r in normalisers)
        anchors = anchor_ok.sum() * views.count
        return ratio * ((lse_total - positive_total) / anchors.clamp_min(1).to(dt))


def _supcon_gathered(views: GatheredViews, labels: Tensor, backend: str) -> Tensor:
    """(τ_base/τ)·SupCon of this rank's anchors against the global batch (value global, gradient
    W × this rank's share). Per anchor a of class c: LSE_a − (⟨u_a, S_c⟩ − ‖u_a‖²)/(|P(a)|·τ),
    S_c the class sum of the global unit rows of every view; summed over the rank's anchors
    with a positive and divided by the global count of such anchors (known from the gathered
    labels on every rank: no further collective)."""
    local, dt = views.local, views.dtype
    device = local.raw[0].device
    labels_all = views.comm.gather("embeddings", labels.to(torch.int64))       # (B_global,)
    slots_all = class_slots(torch.sort(labels_all).values, labels_all)
    b = views.rows
    unit_sum = views.unit(0)
    for l in range(1, views.count):
        unit_sum = unit_sum + views.unit(l)
    class_sum = torch.zeros(b, unit_sum.shape[1], dtype=dt, device=device).index_add(0, slots_all, unit_sum)
    class_rows = torch.zeros(b, dtype=dt, device=device).index_add(
        0, slots_all, torch.full((b,), float(views.count), dtype=dt, device=device))
    pairs_per_anchor = class_rows - 1.0
    has_positives = pairs_per_anchor > 0
    slots = views.local_part(slots_all)
    anchor_ok = has_positives[slots]
    pairs = pairs_per_anchor[slots].clamp_min(1.0) * views.temperature
    positives = [(torch.linalg.vecdot(local.unit(l), class_sum[slots]) - local.squared_unit_norm(l)) / pairs
                 for l in range(views.count)]
    normalisers, = views.normalisers(within=True, across="none", backend=backend)
    terms = torch.cat([torch.where(anchor_ok, lse - pos, 0.0) for lse, pos in zip(normalisers, positives)])
    anchors = has_positives[slots_all].sum() * views.count
    return views.comm.finish(terms, "sum", anchors="embeddings") / anchors.clamp_min(1).to(dt)


def _supcon_against_refs(embeddings, labels, ref_emb, ref_labels, temperature, base_temperature, backend,
                         check_finite, mode, group, uniform_shards) -> Tensor:
    """SupCon with PML's reference set (``supcon_loss`` docstring): anchors are ``embeddings``,
    positives and negatives ``ref_emb``.

    ``L = (τ/τ_base)·mean_{a: |P(a)|>0} [LSE_r ℓ_ar − ⟨u_a, mean_{r∈P(a)} u_r⟩/τ]``.
    """
    if ref_emb is None or ref_labels is None:
        raise ValueError("supcon_loss: ref_emb and ref_labels must be given together")
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 2:
        shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
        raise ValueError(f"supcon_loss with ref_emb needs 2-D embeddings (n, D) and labels, got {shape}")
    if labels is None:
        raise ValueError("supcon_loss with ref_emb needs labels for the anchors (embeddings)")
    # PML's quirk, kept for drop-in fidelity: ref_labels that *is* the labels tensor makes the
    # pairs (i, i) neither positive nor negative (get_matches_and_diffs fills the diagonal).
    same_rows = ref_labels is labels
    x, r = V.prepare_features("embeddings", embeddings, "ref_emb", ref_emb)
    V.check_same_dim("embeddings", x, "ref_emb", r)
    if same_rows and x.shape[0] != r.shape[0]:
        raise ValueError(
            f"supcon_loss: ref_labels is the labels tensor itself, which pairs embeddings row i with "
            f"ref_emb row i, but embeddings has {x.shape[0]} rows and ref_emb {r.shape[0]}"
        )
    labels = V.check_labels("labels", labels, x.shape[0], x.device)
    ref_labels = V.check_labels("ref_labels", ref_labels, r.shape[0], r.device)
    if V.check_bool("check_finite", check_finite):
        V.check_all_finite(("embeddings", x), ("ref_emb", r))
    dt = V.compute_dtype(x)
    tau = check_temperature("temperature", temperature, dt)
    base = tau if base_temperature is None else check_positive_float("base_temperature", base_temperature, dt)
    ratio = float(V.check_scalar("temperature / base_temperature", tau / base, positive=True, dtype=dt))
    comm = open_exchange("supcon_loss", mode, group, uniform_shards, 1, embeddings=x, ref_emb=r)
    with no_autocast(x.device):
        anchors, refs = Views([x], tau), Views([r], tau)
        # The O(N·D) positive term first, the block last (memory order, see Views).
        own_refs = unit_refs = refs.unit(0)
        ref_offset = 0
        if comm is not None:  # the reference set of every rank, labels with their rows
            unit_refs = comm.gather("ref_emb", own_refs)
            ref_labels = comm.gather("ref_emb", ref_labels)
            ref_offset = comm.shards["ref_emb"].offset
        classes = LabelClasses(unit_refs, ref_labels, anchors.dtype)

        def positives_count(anchor_labels: Tensor) -> Tensor:
            slots = classes.slots_for(anchor_labels)
            count = torch.where(classes.sorted_labels[slots] == anchor_labels, classes.counts[slots], 0.0)
            return count - 1.0 if same_rows else count  # same_rows: drop the pair (i, i)

        slots = classes.slots_for(labels)
        count = positives_count(labels)
        positive_sum = torch.linalg.vecdot(anchors.unit(0), classes.sums[slots])
        if same_rows:       # drop the pair (i, i) from P(i) and from the normaliser
            positive_sum = positive_sum - torch.linalg.vecdot(anchors.unit(0), own_refs)
        has_positive = count > 0
        positive = positive_sum / (count.clamp_min(1.0) * tau)
        normaliser, _ = similarity_lse(anchors.raw[0], unit_refs, anchors.scale[0],
                                       exclude="diagonal" if same_rows else "none",
                                       offset=ref_offset if same_rows else 0, cols=False, backend=backend)
        terms = torch.where(has_positive, normaliser - positive, 0.0)
        if comm is None:
            return ratio * (terms.sum() / has_positive.sum().clamp_min(1).to(anchors.dtype))
        # The global number of anchors with a positive, from the gathered anchor labels.
        with_positive = (positives_count(comm.gather("embeddings", labels)) > 0).sum()
        total = comm.finish(terms, "sum", anchors="embeddings")
        return ratio * (total / with_positive.clamp_min(1).to(anchors.dtype))

__all__ = ["supcon_loss"]
