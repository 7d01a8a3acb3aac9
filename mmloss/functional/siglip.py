"""§3 SigLIP (docs/losses.md)."""
from __future__ import annotations

import torch

from .. import _validation as V
from .. import distributed as D
from ..ops import pairwise_sigmoid
from ..ring import pairwise_sigmoid_ring

Tensor = torch.Tensor


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale,
    logit_bias=None,
    *,
    labels=None,
    reduction: str = "mean",
    backend: str = "auto",
    check_finite: bool = False,
    distributed=None,
    group=None,
    uniform_shards: bool = False,
) -> Tensor:
    """Sigmoid loss −(1/N) Σ_i Σ_j log sigmoid(z_ij·L_ij), L = s·x·yᵀ + b (docs/losses.md §3).

    Args:
        image_features: (N, D); text_features: (M, D); M must equal N unless ``labels`` is a pair.
        logit_scale: positive float or 0-d tensor (init exp(log 10)); logit_bias: optional float
            or 0-d tensor (init −10).
        labels: None (positives on the diagonal), (N,) integer ids shared by both sides, or a
            pair ``(image_labels (N,), text_labels (M,))``; same ids are positives (z = +1).
        reduction: "mean" (sum over columns, mean over rows) | "sum" | "none" ((N,) row sums).
        check_finite: raise a ValueError naming the tensor when an input holds NaN/Inf (by
            default they propagate to the loss, as in torch; a host sync on GPUs).
        distributed: None (default: the loss of the given tensors) | "auto" (gather when a
            process group of world size > 1 is initialised; a collective call) | "gather" |
            "ring" (the texts travel around the ranks, ``mmloss.ring``: same value and gradients,
            O(N_local·D) memory per rank; labels need "gather"). Gathered, only the texts (and their labels)
            are gathered: this rank's images against every rank's texts, rows of the global
            N_global × M_global problem (rank order). The value is the global loss on every
            rank (mean over N_global images); the gradient is W × this rank's share
            (``mmloss.distributed``); logit_scale's and logit_bias's gradients are the global
            ones on every rank. "sum": the global sum; "none": this rank's (N_local,) row sums,
            gradient × W.
        group: the process group (default: the world). uniform_shards: every rank holds the same
            N and M (skips the exchange of sizes, D and dtype).

    Returns fp32 (fp64 for fp64 inputs). Memory O((N+M)·D) plus the backend's workspace
    (gathered: O(M_global·D) for the gathered texts).
    """
    return siglip_loss_core(image_features, text_features, logit_scale, logit_bias, labels=labels,
                            reduction=reduction, backend=backend, check_finite=check_finite,
                            distributed=distributed, group=group, uniform_shards=uniform_shards)


def siglip_loss_core(image_features, text_features, logit_scale, logit_bias=None, *, labels=None,
                     reduction="mean", backend="auto", check_finite=False, distributed=None, group=None,
                     uniform_shards=False, configured_world_size=1, loss_name="siglip_loss"):
    """``siglip_loss`` plus the options only ``SigLipLoss`` sets (the world size it was built
    with, the name its errors use)."""
    x, y = V.prepare_features("image_features", image_features, "text_features", text_features)
    n, m = x.shape[0], y.shape[0]
    dt = V.compute_dtype(x)
    logit_scale = V.check_scalar("logit_scale", logit_scale, device=x.device, positive=True, dtype=dt)
    if logit_bias is not None:
        logit_bias = V.check_scalar("logit_bias", logit_bias, device=x.device, dtype=dt)
    V.check_reduction(reduction)
    if V.check_bool("check_finite", check_finite):
        V.check_all_finite(("image_features", x), ("text_features", y), ("logit_scale", logit_scale),
                           ("logit_bias", logit_bias))
    if labels is None or isinstance(labels, torch.Tensor):
        if n != m:
            raise ValueError(
                f"siglip_loss needs as many texts as images: image_features has {n} rows, "
                f"text_features {m} (or pass labels as a pair (image_labels, text_labels))"
            )
    x_labels = y_labels = None
    if labels is not None:  # validated before any collective, so a bad call fails on its own rank
        if isinstance(labels, (tuple, list)):
            if len(labels) != 2:
                raise ValueError(f"labels as a pair must hold 2 tensors, got {len(labels)}")
            x_labels = V.check_labels("labels[0] (image labels)", labels[0], n, x.device)
            y_labels = V.check_labels("labels[1] (text labels)", labels[1], m, x.device)
        elif isinstance(labels, torch.Tensor):
            x_labels = y_labels = V.check_labels("labels", labels, n, x.device)
        else:
            raise TypeError(f"labels must be a tensor or a pair of tensors, got {type(labels).__name__}")
    # A scalar loss lets the primitive form its gradients during the forward pass.
    kind = "none" if reduction == "none" else "sum"
    comm = None
    offset = 0
    mode = D.resolve_mode(loss_name, distributed, group, configured_world_size, ring=True)
    if mode == "ring":
        return _siglip_ring(x, y, logit_scale, logit_bias, labels, reduction, backend, group,
                            V.check_bool("uniform_shards", uniform_shards), loss_name)
    if mode == "gather":
        comm = D.Exchange.open(loss_name, group, V.check_bool("uniform_shards", uniform_shards),
                               image_features=x, text_features=y)
        if labels is None or isinstance(labels, torch.Tensor):
            if comm.shards["image_features"].sizes != comm.shards["text_features"].sizes:
                raise ValueError(f"{loss_name}: every rank needs as many texts as images")
        offset = comm.shards["image_features"].offset
        logit_scale = comm.scalar(logit_scale)
        logit_bias = comm.scalar(logit_bias)
        y = comm.gather("text_features", y)
    if labels is None:
        out = pairwise_sigmoid(x, y, logit_scale, logit_bias, positives="diagonal", offset=offset,
                               reduction=kind, backend=backend)
    else:
        if comm is not None:
            y_labels = comm.gather("text_features", y_labels)
        out = pairwise_sigmoid(x, y, logit_scale, logit_bias, positives="same_label",
                               x_labels=x_labels, y_labels=y_labels, reduction=kind, backend=backend)
    if comm is not None:
        return comm.finish(out, reduction, anchors="image_features")
    if reduction == "none":
        return out
    return out if reduction == "sum" else out / n


def _siglip_ring(x, y, logit_scale, logit_bias, labels, reduction, backend, group, uniform_shards, loss_name):
    """The ring form (``mmloss.ring``): the texts travel around the ranks and this rank's image
    rows sum their sigmoid terms over every text; O(N_local·D) memory per rank."""
    if labels is not None:
        raise ValueError(f"{loss_name}: distributed='ring' pairs image i with text i; with labels use "
                         "distributed='gather'")
    comm = D.Exchange.open(loss_name, group, uniform_shards, image_features=x, text_features=y)
    if comm.shards["image_features"].sizes != comm.shards["text_features"].sizes:
        raise ValueError(f"{loss_name}: every rank needs as many texts as images")
    rows = pairwise_sigmoid_ring(x, y, comm.scalar(logit_scale), comm.scalar(logit_bias), positives="diagonal",
                                 ring=comm.ring("image_features", "text_features"), backend=backend)
    return comm.finish(rows, reduction, anchors="image_features")
