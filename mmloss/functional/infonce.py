"""§2 One-directional InfoNCE (docs/losses.md)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from .. import distributed as D
from ..ops import similarity_lse
from ..ring import similarity_lse_ring
from ._common import LabelClasses, as_compute, compute_dtype, reduce, rowwise_dot, scale_as, softplus

Tensor = torch.Tensor


def infonce_loss(
    query: Tensor,
    keys: Tensor,
    logit_scale,
    *,
    targets: Optional[Tensor] = None,
    query_labels: Optional[Tensor] = None,
    key_labels: Optional[Tensor] = None,
    soft_targets: Optional[Tensor] = None,
    reduction: str = "mean",
    backend: str = "auto",
    check_finite: bool = False,
    extra_keys: Optional[Tensor] = None,
    extra_key_labels: Optional[Tensor] = None,
    distributed=None,
    group=None,
    uniform_shards: bool = False,
) -> Tensor:
    """InfoNCE of queries (N, D) against keys (M, D): mean_i (LSE_j L_ij − L_{i,t_i}) (docs/losses.md §2).

    Exactly one way of naming positives may be given (default: ``targets = arange(N)``, which
    needs M ≥ N, e.g. keys followed by a queue of extra negatives):
        targets: (N,) integer key index of each query's positive.
        query_labels (N,) + key_labels (M,): every same-label key is a positive; the target is
            uniform over them. Computed with class sums: no N×M tensor.
        soft_targets: (N, M) dense target distribution q (non-negative rows summing to 1,
            checked on CPU tensors to 1e-3 relative): mean_i (LSE_j L_ij − Σ_j q_ij L_ij).
    Integer targets and labels of any integer dtype are accepted.
    ``logit_scale`` is a positive float or 0-d tensor. ``reduction``: "mean" | "sum" | "none"
    ((N,) per-query terms). ``check_finite``: raise a ValueError naming the tensor when an input
    holds NaN/Inf (by default they propagate, as in torch; a host sync on GPUs).

    ``extra_keys`` (Q, D): more keys appended after ``keys`` (e.g. a queue of negatives); they are
    never gathered (a queue is the same on every rank). With labels, ``extra_key_labels`` (Q,)
    gives theirs. ``targets``, ``soft_targets`` columns and the default targets index the
    concatenation [keys (gathered when distributed); extra_keys].

    ``distributed``: None (default: the loss of the given tensors) | "auto" (gather when a
    process group of world size > 1 is initialised; a collective call) | "gather" | "ring" (the
    keys travel around the ranks, ``mmloss.ring``: default targets only, as many keys as queries
    on every rank; O(N_local·D) memory per rank). Gathered, the keys (and ``key_labels``) of every rank are
    concatenated in rank order; the queries stay local and are rows of the global batch (rank
    order), so the default target of this rank's query i is global key (query offset + i). The
    value is the global loss on every rank; the gradient is W × this rank's share
    (``mmloss.distributed``); a tensor ``logit_scale`` gets the global gradient on every rank.
    "sum": the global sum; "none": this rank's (N_local,) terms, gradient × W. ``group``: the
    process group; ``uniform_shards``: every rank holds the same N and M (skips the exchange).

    Returns fp32 (fp64 for fp64 inputs); memory O((N+M+Q)·D) plus the backend's workspace (and
    the N×M soft targets when given; gathered, M is the global key count).
    """
    x, y = V.prepare_features("query", query, "keys", keys)
    if extra_keys is not None:
        x, extra_keys = V.prepare_features("query", x, "extra_keys", extra_keys)
        y = y.to(x.dtype)
    if (extra_key_labels is not None) and (extra_keys is None or key_labels is None):
        raise ValueError("extra_key_labels needs extra_keys and key_labels")
    if extra_keys is not None and key_labels is not None and extra_key_labels is None:
        raise ValueError("with key_labels and extra_keys, give extra_key_labels (the extra keys' labels)")
    n, m = x.shape[0], y.shape[0]
    dt = compute_dtype(x)
    logit_scale = V.check_scalar("logit_scale", logit_scale, device=x.device, positive=True, dtype=dt)
    V.check_reduction(reduction)
    if (query_labels is None) != (key_labels is None):
        raise ValueError("query_labels and key_labels must be given together")
    given = [name for name, v in (("targets", targets), ("query_labels", query_labels),
                                  ("soft_targets", soft_targets)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of targets, query/key labels, soft_targets; got {given}")
    if V.check_bool("check_finite", check_finite):
        V.check_all_finite(("query", x), ("keys", y), ("extra_keys", extra_keys), ("logit_scale", logit_scale),
                           ("soft_targets", soft_targets))

    if query_labels is not None:  # local checks come before any collective
        query_labels = V.check_labels("query_labels", query_labels, n, x.device)
        key_labels = V.check_labels("key_labels", key_labels, m, x.device)
        if extra_key_labels is not None:
            extra_key_labels = V.check_labels("extra_key_labels", extra_key_labels, extra_keys.shape[0],
                                              x.device)
    if targets is not None:
        targets = V.check_labels("targets", targets, n, x.device)
    if soft_targets is not None:
        V.check_tensor("soft_targets", soft_targets)
        if not soft_targets.is_floating_point():
            raise TypeError(f"soft_targets must be a floating tensor, got dtype {soft_targets.dtype}")
        V.check_same_device(("query", x), ("soft_targets", soft_targets))
    comm = None
    query_offset, n_total, m_total = 0, n, m
    mode = D.resolve_mode("infonce_loss", distributed, group, ring=True)
    if mode == "ring":
        if targets is not None or query_labels is not None or soft_targets is not None:
            raise ValueError("infonce_loss: distributed='ring' pairs query i with key i (the default "
                             "targets); with targets, labels or soft_targets use distributed='gather'")
        return _infonce_ring(x, y, logit_scale, dt, extra_keys, reduction, backend, group,
                             V.check_bool("uniform_shards", uniform_shards))
    if mode == "gather":
        comm = D.Exchange.open("infonce_loss", group, V.check_bool("uniform_shards", uniform_shards),
                               query=x, keys=y)
        query_offset, n_total, m_total = comm.shards["query"].offset, comm.shards["query"].total, comm.shards["keys"].total
    m_total += 0 if extra_keys is None else extra_keys.shape[0]
    # Checks that need the global key count (a failure here leaves the other ranks waiting in
    # the next collective until the process group's timeout).
    if targets is not None:
        V.check_index_range("targets", targets, m_total)
    if soft_targets is not None:
        if tuple(soft_targets.shape) != (n, m_total):
            raise ValueError(f"soft_targets must have shape ({n}, {m_total}), got {tuple(soft_targets.shape)}")
        _check_distribution_rows(soft_targets)
    if targets is None and query_labels is None and soft_targets is None and m_total < n_total:
        raise ValueError(
            f"infonce_loss with default targets pairs query i with key i, so keys needs at "
            f"least as many rows as query: got query {n_total} rows, keys {m_total} rows"
        )
    if comm is not None:
        logit_scale = comm.scalar(logit_scale)
        y = comm.gather("keys", y)
        if key_labels is not None:
            key_labels = comm.gather("keys", key_labels)
    if extra_keys is not None:
        y = torch.cat([y, extra_keys.to(y.dtype)], dim=0)
        if key_labels is not None:
            key_labels = torch.cat([key_labels, extra_key_labels], dim=0)
    terms = _infonce_terms(x, y, logit_scale, dt, targets, query_labels, key_labels, soft_targets,
                           query_offset, backend)
    if comm is not None:
        return comm.finish(terms, reduction, anchors="query")
    return reduce(terms, reduction)


def _infonce_terms(x, y, logit_scale, dt, targets, query_labels, key_labels, soft_targets, query_offset,
                   backend):
    """(N,) terms of the (validated) local queries against all keys ``y`` (M, D); query i is
    global query ``query_offset + i`` (its default target is that key)."""
    n, m = x.shape[0], y.shape[0]
    s = scale_as(logit_scale, dt, x.device)
    if soft_targets is not None:
        row_lse, _ = similarity_lse(x, y, logit_scale, cols=False, backend=backend)
        target_keys = as_compute(soft_targets, dt) @ as_compute(y, dt)  # (N, D) = q·k
        terms = row_lse - s * torch.linalg.vecdot(as_compute(x, dt), target_keys)
    elif query_labels is not None:
        classes = LabelClasses(y, key_labels, dt)
        classes.has(query_labels, "query_labels")
        row_lse, _ = similarity_lse(x, y, logit_scale, cols=False, backend=backend)
        terms = row_lse - s * classes.mean_dot(x, query_labels)
    elif targets is not None:
        keys_index = torch.arange(m, device=x.device)
        # Excluding pairs with targets[i] == j leaves the negatives: softplus form.
        row_lse, _ = similarity_lse(x, y, logit_scale, exclude="same_label", x_labels=targets,
                                    y_labels=keys_index, cols=False, backend=backend)
        terms = softplus(row_lse - s * rowwise_dot(x, y.index_select(0, targets)))
    else:
        row_lse, _ = similarity_lse(x, y, logit_scale, exclude="diagonal", offset=query_offset, cols=False,
                                    backend=backend)
        terms = softplus(row_lse - s * rowwise_dot(x, y[query_offset: query_offset + n]))
    return terms


def _infonce_ring(x, y, logit_scale, dt, extra_keys, reduction, backend, group, uniform_shards):
    """The ring form (``mmloss.ring``): the keys travel around the ranks; this rank's queries get
    their LSE over every key (and the never-gathered ``extra_keys``); O(N_local·D) per rank.
    Query i of rank r is paired with key i of rank r, so every rank holds as many keys as queries."""
    comm = D.Exchange.open("infonce_loss", group, uniform_shards, query=x, keys=y)
    if comm.shards["query"].sizes != comm.shards["keys"].sizes:
        raise ValueError("infonce_loss: distributed='ring' needs as many keys as queries on every rank "
                         f"(query rows {list(comm.shards['query'].sizes)}, key rows {list(comm.shards['keys'].sizes)}); "
                         "use distributed='gather'")
    logit_scale = comm.scalar(logit_scale)
    s = scale_as(logit_scale, dt, x.device)
    row_lse, _ = similarity_lse_ring(x, y, logit_scale, exclude="diagonal", cols=False,
                                     ring=comm.ring("query", "keys"), backend=backend)
    if extra_keys is not None:
        extra_lse, _ = similarity_lse(x, extra_keys, logit_scale, cols=False, backend=backend)
        row_lse = torch.logaddexp(row_lse, extra_lse)
    terms = softplus(row_lse - s * rowwise_dot(x, y))
    return comm.finish(terms, reduction, anchors="query")


def _check_distribution_rows(q: Tensor) -> None:
    """Value check (CPU, eager): soft targets are non-negative and each row sums to 1 (1e-3
    relative, loose enough for half-precision targets). NaN entries propagate (NaN policy)."""
    if q.numel() == 0 or not V.value_checks_enabled(q):
        return
    q = q.detach()
    finite = torch.isfinite(q)
    negative = (q < 0) & finite
    if bool(negative.any()):
        i, j = (int(v) for v in negative.nonzero()[0])
        raise ValueError(f"soft_targets must be non-negative, got soft_targets[{i}, {j}] = {float(q[i, j])}")
    sums = q.double().sum(dim=1)
    off = finite.all(dim=1) & ((sums - 1).abs() > 1e-3)
    if bool(off.any()):
        i = int(off.nonzero()[0, 0])
        raise ValueError(f"soft_targets rows must sum to 1, got row {i} summing to {float(sums[i]):.6g}")
