"""Log-sum-exps merged over disjoint key sets, shared by Symile (§9), TCL (§10) and iSogCLR (§11).

A loss whose negatives come from several key sets (batch and queue, both views, blocks of
candidate tuples) asks the primitive for one row LSE per set and merges them here: O(N) per
merge, no N×M tensor.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def merge_lse(parts: Sequence[Tensor]) -> Tensor:
    """Elementwise log-sum-exp of several (N,) log-sum-exps over disjoint key sets.

    Entries that are −inf in every part stay −inf with a zero (not NaN) gradient; NaN propagates.
    A single part is returned as is.
    """
    if len(parts) == 1:
        return parts[0]
    return stacked_logsumexp(torch.stack(list(parts)))


def stacked_logsumexp(stacked: Tensor) -> Tensor:
    """``logsumexp`` over dim 0 whose all-−inf entries give −inf with a zero gradient (torch's
    gives NaN gradients there) and whose NaN entries give NaN (the NaN policy)."""
    shift = stacked.detach().amax(dim=0)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros((), dtype=shift.dtype, device=shift.device))
    total = torch.exp(stacked - shift).sum(dim=0)
    empty = total == 0
    safe = torch.where(empty, torch.ones((), dtype=total.dtype, device=total.device), total)
    return torch.where(empty, torch.full((), float("-inf"), dtype=total.dtype, device=total.device),
                       shift + torch.log(safe))
