"""O(N·D) building blocks the loss functions compose with the fused primitives."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from .._device import no_autocast

Tensor = torch.Tensor


compute_dtype = V.compute_dtype  # fp64 stays fp64, the rest accumulate in fp32


def paired_features(loss: str, image_features, text_features, hint: str = "") -> tuple[Tensor, Tensor]:
    """Validated (N, D) image and text features of one dtype, as many texts as images (pair i
    is the positive of row i)."""
    x, y = V.prepare_features("image_features", image_features, "text_features", text_features)
    if y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{loss} needs as many texts as images: image_features has {x.shape[0]} rows, "
            f"text_features {y.shape[0]}{hint}"
        )
    return x, y


def softplus(t: Tensor) -> Tensor:
    """log(1 + e^t), exact at every magnitude (aten's softplus switches to t above 20)."""
    return torch.logaddexp(t, torch.zeros((), dtype=t.dtype, device=t.device))


def reduce(terms: Tensor, reduction: str, anchors: Optional[int] = None) -> Tensor:
    """"mean": the loss; "sum": the mean × number of anchors; "none": the per-anchor terms."""
    if reduction == "none":
        return terms
    mean = terms.mean()
    if reduction == "sum":
        return mean * (terms.shape[0] if anchors is None else anchors)
    return mean


def as_compute(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def scale_as(scale, dtype: torch.dtype, device: torch.device):
    """A loss's scalar scale as a compute-dtype 0-d tensor (or float) on the features' device."""
    if isinstance(scale, Tensor):
        return scale.to(device=device, dtype=dtype)
    return float(scale)


class _DotGradX(torch.autograd.Function):
    """⟨x_i, y_i⟩ in the compute dtype; the gradient flows to x only."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(y)
        dt = compute_dtype(x)
        with no_autocast(x.device):
            return torch.linalg.vecdot(as_compute(x, dt), as_compute(y, dt))

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        with no_autocast(y.device):
            return (grad[:, None] * y).to(y.dtype), None


class _DotGradY(torch.autograd.Function):
    """Zero in value; carries the y-half of the gradient of ⟨x_i, y_i⟩."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x)
        return x.new_zeros(x.shape[0], dtype=compute_dtype(x))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with no_autocast(x.device):
            return None, (grad[:, None] * x).to(x.dtype)


def rowwise_dot(x: Tensor, y: Tensor) -> Tensor:
    """(N,) ⟨x_i, y_i⟩ in fp32 (fp64 for fp64 inputs) for (N, D) x and y.

    The x- and y-gradients come from two autograd nodes, so a backward materialises one N×D
    gradient at a time beside the primitives' own (this keeps CLIP's peak memory at dx, dy plus
    one N×D temporary instead of two).
    """
    return _DotGradX.apply(x, y) + _DotGradY.apply(x, y)


def class_slots(sorted_labels: Tensor, labels: Tensor) -> Tensor:
    """Index of each label's first occurrence in ``sorted_labels``: a class id in [0, len)."""
    return torch.searchsorted(sorted_labels, labels)


class LabelClasses:
    """Class sums of one side's features keyed by label, with static shapes (no unique()).

    ``sums[k]`` and ``counts[k]`` describe the class whose first sorted occurrence is slot k.
    """

    def __init__(self, features: Tensor, labels: Tensor, dtype: torch.dtype):
        sorted_labels = torch.sort(labels).values
        self.sorted_labels = sorted_labels
        slots = class_slots(sorted_labels, labels)
        n = labels.shape[0]
        self.sums = torch.zeros(n, features.shape[1], dtype=dtype, device=features.device).index_add(
            0, slots, as_compute(features, dtype)
        )
        self.counts = torch.zeros(n, dtype=dtype, device=features.device).index_add(
            0, slots, torch.ones(n, dtype=dtype, device=features.device)
        )

    def slots_for(self, labels: Tensor) -> Tensor:
        """Slots of other labels in this class table (their class must exist here)."""
        return class_slots(self.sorted_labels, labels).clamp_(max=self.sorted_labels.shape[0] - 1)

    def has(self, labels: Tensor, name: str) -> None:
        """Value check (CPU / eager only): every label in ``labels`` has a class here."""
        if not V.value_checks_enabled(labels):
            return
        slots = self.slots_for(labels)
        missing = self.sorted_labels[slots] != labels
        if bool(missing.any()):
            i = int(missing.nonzero()[0, 0])
            raise ValueError(
                f"{name}[{i}] = {int(labels[i])} has no positive: no matching label on the other side"
            )

    def mean_dot(self, features: Tensor, labels: Tensor) -> Tensor:
        """(N,) mean over same-label rows j of ⟨features_i, other_j⟩."""
        slots = self.slots_for(labels)
        dt = self.sums.dtype
        return torch.linalg.vecdot(as_compute(features, dt), self.sums[slots]) / self.counts[slots]


def attach_unused(loss: Tensor, *params) -> Tensor:
    """Make ``params`` part of the graph with an exactly zero gradient (softmax ignores a bias)."""
    for p in params:
        if isinstance(p, Tensor) and p.requires_grad:
            loss = loss + 0.0 * p.sum().to(loss.dtype)
    return loss
