"""§1 CLIP / symmetric InfoNCE (docs/losses.md)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from .. import distributed as D
from ..ops import similarity_lse
from ..ops._primitives import similarity_lse_prevalidated
from ..ring import similarity_lse_ring
from ._common import (LabelClasses, attach_unused, compute_dtype, paired_features, reduce, rowwise_dot, scale_as,
                      softplus)

Tensor = torch.Tensor


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale,
    logit_bias=None,
    *,
    labels: Optional[Tensor] = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    check_finite: bool = False,
    distributed=None,
    group=None,
    uniform_shards: bool = False,
) -> Tensor:
    """Symmetric CLIP loss ½·[mean_i CE(row i) + mean_j CE(column j)] (docs/losses.md §1).

    Args:
        image_features, text_features: (N, D) each, fp16/bf16/fp32/fp64 embeddings, used as
            given (normalise them in the model). N ≠ M is a ValueError (use ``infonce_loss``).
        logit_scale: the multiplier s (already exponentiated, as open_clip passes it): a
            positive float or 0-d tensor.
        logit_bias: accepted for DDP (it is a no-op for softmax); its gradient is exactly 0.
        labels: optional (N,) integer ids; a row's target is uniform over same-id columns.
        label_smoothing: ε in [0, 1); targets (1−ε)·q + ε/N.
        reduction: "mean" | "sum" (N × mean) | "none" ((N,) terms ½(image_i + text_i)).
        check_finite: raise a ValueError naming the tensor when an input holds NaN/Inf (by
            default they propagate to the loss, as in torch; a host sync on GPUs).
        distributed: None (default: the loss of the given tensors) | "auto" (gather when a
            process group of world size > 1 is initialised; a collective call) | "gather" |
            "ring" (the texts travel around the ranks, ``mmloss.ring``: same value and gradients,
            O(N_local·D) memory per rank; labels need "gather"). Gathered, the rows of every rank form the
            global batch (rank order) and ``labels`` travel with their rows; this rank computes
            its rows against the global texts and its texts against the global images (never a
            B×B matrix). The value is the global loss on every rank; the gradient is W × this
            rank's share (``mmloss.distributed``: DDP's average then gives the single-process
            gradient); logit_scale's gradient is the global one on every rank. "sum": the global
            sum; "none": this rank's (N_local,) terms of the global loss, gradient × W.
        group: the process group (default: the world). uniform_shards: every rank holds the same
            N (skips the exchange of sizes, D and dtype).

    Returns an fp32 loss (fp64 for fp64 inputs). Memory O(N·D) plus the backend's workspace
    (gathered: O(N_global·D) for the gathered features);
    single-positive rows use the softplus form ``softplus(LSE_{j≠i} L_ij − L_ii)``.
    """
    return clip_loss_core(image_features, text_features, logit_scale, logit_bias, labels=labels,
                          label_smoothing=label_smoothing, reduction=reduction, backend=backend,
                          check_finite=check_finite, distributed=distributed, group=group,
                          uniform_shards=uniform_shards)


def clip_loss_core(image_features, text_features, logit_scale, logit_bias=None, *, labels=None,
                   label_smoothing=0.0, reduction="mean", backend="auto", check_finite=False,
                   distributed=None, group=None, uniform_shards=False, local_share=False,
                   configured_world_size=1, loss_name="clip_loss"):
    """``clip_loss`` plus the options only ``ClipLoss`` sets: ``local_share=True`` is open_clip's
    ``local_loss=True`` under gathering: the mean of this rank's terms with its own gradient (no
    scalar all-reduces)."""
    x, y = paired_features("clip_loss", image_features, text_features,
                           hint=" (use infonce_loss for rectangular problems)")
    n = x.shape[0]
    dt = compute_dtype(x)
    logit_scale = V.check_scalar("logit_scale", logit_scale, device=x.device, positive=True, dtype=dt)
    if logit_bias is not None:
        logit_bias = V.check_scalar("logit_bias", logit_bias, device=x.device, dtype=dt)
    eps = V.check_fraction("label_smoothing", label_smoothing)
    V.check_reduction(reduction)
    if labels is not None:
        labels = V.check_labels("labels", labels, n, x.device)
    if V.check_bool("check_finite", check_finite):
        V.check_all_finite(("image_features", x), ("text_features", y), ("logit_scale", logit_scale),
                           ("logit_bias", logit_bias))

    mode = D.resolve_mode(loss_name, distributed, group, configured_world_size, ring=True)
    if mode == "gather":
        return _clip_gathered(x, y, logit_scale, logit_bias, labels, eps, reduction, backend, dt, group,
                              V.check_bool("uniform_shards", uniform_shards), local_share, loss_name)
    if mode == "ring":
        return _clip_ring(x, y, logit_scale, logit_bias, labels, eps, reduction, backend, dt, group,
                          V.check_bool("uniform_shards", uniform_shards), local_share, loss_name)
    s = scale_as(logit_scale, dt, x.device)
    if labels is None:
        # The positive logits are formed before the primitive on purpose: autograd runs the
        # newest node first, so the primitive's backward (and its workspace) finishes before
        # the O(N·D) positive-pair gradients are materialised, one at a time.
        diag = s * _positive_dot(x, y, dt)
        # x, y and logit_scale were validated above (the primitive's own checks would repeat them).
        row_lse, col_lse = similarity_lse_prevalidated(x, y, logit_scale, exclude="diagonal", backend=backend)
        if eps == 0.0:
            # Rows and columns as one (2, N) pass (fewer ops and autograd nodes: host time is
            # most of a small batch's cost); the mean over both is the mean of ½·(row + col).
            terms = softplus(torch.stack((row_lse, col_lse)) - diag)
            loss = terms.mean() if reduction == "mean" else reduce(0.5 * terms.sum(0), reduction)
            return attach_unused(loss, logit_bias)
        rows, cols = _diagonal_terms(row_lse, col_lse, diag, eps, s,
                                     lambda: (_mean_logit(x, y, dt), _mean_logit(y, x, dt)))
    else:
        row_lse, col_lse = similarity_lse_prevalidated(x, y, logit_scale, backend=backend)
        rows = row_lse - s * _target_logit(x, y, labels, eps, dt)
        cols = col_lse - s * _target_logit(y, x, labels, eps, dt)
    loss = reduce(0.5 * (rows + cols), reduction)
    return attach_unused(loss, logit_bias)


# Up to this many bytes of one (N, D) feature gradient, the positive pairs' dot product is one
# autograd op whose backward forms dx and dy together (one N×D temporary more at the peak than
# ``rowwise_dot``'s two nodes, at most 1 MiB); its two Python nodes cost more host time than a
# small batch's GEMMs.
_FUSED_DOT_BYTES = 1 << 20


def _positive_dot(x: Tensor, y: Tensor, dt: torch.dtype) -> Tensor:
    """(N,) ⟨x_i, y_i⟩ in the compute dtype ``dt`` (``rowwise_dot``)."""
    if x.numel() * x.element_size() <= _FUSED_DOT_BYTES and not torch.is_autocast_enabled(x.device.type):
        return torch.linalg.vecdot(x if x.dtype == dt else x.to(dt), y if y.dtype == dt else y.to(dt))
    return rowwise_dot(x, y)


def _diagonal_terms(row_lse, col_lse, diag, eps, s, mean_logits):
    """Row and column terms of single-positive CLIP from the LSEs over the negatives:
    ``softplus(LSE_{j≠i} − L_ii)``, mixed with label smoothing ε's CE against the uniform target
    (LSE over all pairs minus the mean logit; ``mean_logits()`` gives the (rows, cols) mean
    unscaled logits ⟨x_i, ȳ⟩, ⟨y_j, x̄⟩ over the global batch)."""
    rows = softplus(row_lse - diag)
    cols = softplus(col_lse - diag)
    if eps > 0.0:
        row_mean, col_mean = mean_logits()
        rows = (1.0 - eps) * rows + eps * (torch.logaddexp(row_lse, diag) - s * row_mean)
        cols = (1.0 - eps) * cols + eps * (torch.logaddexp(col_lse, diag) - s * col_mean)
    return rows, cols


def _clip_ring(x, y, logit_scale, logit_bias, labels, eps, reduction, backend, dt, group, uniform_shards,
               local_share, loss_name):
    """The ring form (``mmloss.ring``): the texts travel around the ranks; this rank's image rows
    get their LSE over every text and its texts their LSE over every image, with O(N_local·D)
    memory per rank. Label smoothing's mean logits use one all-reduce of Σ x and Σ y."""
    if labels is not None:
        raise ValueError(f"{loss_name}: distributed='ring' pairs image i with text i; with labels use "
                         "distributed='gather'")
    comm = D.Exchange.open(loss_name, group, uniform_shards, image_features=x, text_features=y)
    if comm.shards["image_features"].sizes != comm.shards["text_features"].sizes:  # pragma: no cover - N == M
        raise ValueError(f"{loss_name}: every rank needs as many texts as images")
    if not local_share:
        logit_scale = comm.scalar(logit_scale)
    s = scale_as(logit_scale, dt, x.device)
    diag = s * rowwise_dot(x, y)
    row_lse, col_lse = similarity_lse_ring(x, y, logit_scale, exclude="diagonal",
                                           ring=comm.ring("image_features", "text_features"), backend=backend)
    total = comm.shards["image_features"].total

    def mean_logits():
        x_mean, y_mean = (comm.sum_rows(t.to(dt)) / total for t in (x, y))
        return x.to(dt) @ y_mean, y.to(dt) @ x_mean

    rows, cols = _diagonal_terms(row_lse, col_lse, diag, eps, s, mean_logits)
    terms = 0.5 * (rows + cols)
    loss = reduce(terms, reduction) if local_share else comm.finish(terms, reduction, anchors="image_features")
    return attach_unused(loss, logit_bias)


def _clip_gathered(x, y, logit_scale, logit_bias, labels, eps, reduction, backend, dt, group,
                   uniform_shards, local_share, loss_name):
    """This rank's (N_local,) terms against the global batch, reduced by the convention of
    ``mmloss.distributed``. Image rows: x_local against y_global; text rows (CLIP's columns):
    y_local against x_global, i.e. the row statistics of the swapped primitive."""
    tensors = dict(image_features=x, text_features=y)
    comm = D.Exchange.open(loss_name, group, uniform_shards, **tensors)
    shard = comm.shards["image_features"]
    offset = shard.offset
    if not local_share:
        logit_scale = comm.scalar(logit_scale)
    s = scale_as(logit_scale, dt, x.device)
    x_all = comm.gather("image_features", x)
    y_all = comm.gather("text_features", y)
    if labels is None:
        diag = s * rowwise_dot(x, y)
        row_lse, _ = similarity_lse(x, y_all, logit_scale, exclude="diagonal", offset=offset, cols=False,
                                    backend=backend)
        col_lse, _ = similarity_lse(y, x_all, logit_scale, exclude="diagonal", offset=offset, cols=False,
                                    backend=backend)
        rows, cols = _diagonal_terms(row_lse, col_lse, diag, eps, s,
                                     lambda: (_mean_logit(x, y_all, dt), _mean_logit(y, x_all, dt)))
    else:
        labels_all = comm.gather("image_features", labels)
        row_lse, _ = similarity_lse(x, y_all, logit_scale, cols=False, backend=backend)
        col_lse, _ = similarity_lse(y, x_all, logit_scale, cols=False, backend=backend)
        rows = row_lse - s * _target_logit_global(x, y_all, labels, labels_all, eps, dt)
        cols = col_lse - s * _target_logit_global(y, x_all, labels, labels_all, eps, dt)
    terms = 0.5 * (rows + cols)
    if local_share:
        loss = reduce(terms, reduction)
    else:
        loss = comm.finish(terms, reduction, anchors="image_features")
    return attach_unused(loss, logit_bias)


def _target_logit_global(x, y_all, labels, labels_all, eps, dt):
    """(N_local,) Σ_j q_ij ⟨x_i, y_j⟩ over the global columns (class sums of y_all)."""
    target = LabelClasses(y_all, labels_all, dt).mean_dot(x, labels)
    if eps > 0.0:
        target = (1.0 - eps) * target + eps * _mean_logit(x, y_all, dt)
    return target


def _mean_logit(x: Tensor, y: Tensor, dt: torch.dtype) -> Tensor:
    """(N,) mean_j ⟨x_i, y_j⟩ = ⟨x_i, ȳ⟩."""
    return x.to(dt) @ y.to(dt).mean(dim=0)


def _target_logit(x: Tensor, y: Tensor, labels: Tensor, eps: float, dt: torch.dtype) -> Tensor:
    """(N,) Σ_j q_ij ⟨x_i, y_j⟩ for q = (1−ε)·uniform(same label) + ε/N, via class sums."""
    classes = LabelClasses(y, labels, dt)
    target = classes.mean_dot(x, labels)
    if eps > 0.0:
        target = (1.0 - eps) * target + eps * _mean_logit(x, y, dt)
    return target
