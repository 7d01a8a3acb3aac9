"""distributed="gather" for the self-supervised losses (ntxent, supcon, dcl, dhel, multiview, hcl;
``mmloss.distributed`` for the modes and the convention).

Every SSL loss computes this rank's anchors against the global batch (the rows of every rank, in
rank order) through ``GatheredViews``, which has the interface of ``ssl_common.Views``: the unit
rows of all views are gathered in ONE collective (the gather's backward returns the candidates'
summed gradient to the owning rank) and each block is a rows-only ``similarity_lse`` of the local
raw rows (per-row scale) against the gathered unit rows, the diagonal marks at the rank's row
offset; no rank forms an N_local × N_global (let alone N_global × N_global) matrix.

Exactness: per-anchor quantities are exact because each anchor's normaliser runs over the global
batch; whole-batch quantities (N in HCL's Ñ, DCLW's softmax, DCL's ``weight_fn``, SupCon's class
sums and its count of anchors with a positive) are formed from the gathered rows (and labels) on
every rank, identically. The reduction follows ``Exchange.finish``: the value is the global loss
on every rank, the gradient W × this rank's share, so DDP's average is the single-process
gradient. No SSL loss has a "ring" form (``resolve_distributed`` raises a ValueError).

Rows: a loss that needs N ≥ 2 (negatives) needs it of the global batch only; a rank may hold a
single row (never zero). Per-rank memory: the V·N_global·D gathered unit rows in the compute
dtype and their gradient in backward, plus one N_local × N_global block's workspace.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _validation as V
from .. import distributed as D
from ..ops import similarity_lse
from .ssl_common import Views, merge_lses

Tensor = torch.Tensor


def resolve_distributed(loss: str, distributed, group, uniform_shards) -> Optional[str]:
    """None (compute on the given rows) or "gather" (``mmloss.distributed.resolve_mode``; "ring"
    is a ValueError: the SSL losses have no ring form). Also checks ``group`` (None or a
    ``torch.distributed.ProcessGroup``) and ``uniform_shards`` (a bool) on every call."""
    if group is not None:
        dist = torch.distributed
        if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
            raise TypeError(
                f"{loss}: group must be None (the default process group) or a torch.distributed "
                f"ProcessGroup, got {type(group).__name__}"
            )
    V.check_bool("uniform_shards", uniform_shards)
    return D.resolve_mode(loss, distributed, group)


def min_local_rows(mode: Optional[str], min_rows: int) -> int:
    """Rows a call needs on this rank: ``min_rows`` when computing locally; one when gathering
    (the global batch is checked by ``open_exchange``)."""
    return min_rows if mode is None else 1


def open_exchange(loss: str, mode: Optional[str], group, uniform_shards: bool, min_rows: int,
                  **tensors: Tensor) -> Optional[D.Exchange]:
    """None for a local call; else the ``Exchange`` of the named tensors (one small all-gather
    of sizes, D and dtype) after checking that the global batch holds ``min_rows`` rows of the
    first of them. Every rank sees the same sizes, so every rank raises together (none is left
    waiting in a collective). Call it after every local check."""
    if mode is None:
        return None
    comm = D.Exchange.open(loss, group, uniform_shards, **tensors)
    name = next(iter(tensors))
    total = comm.shards[name].total
    if total < min_rows:
        raise ValueError(
            f"{loss} needs at least {min_rows} rows per view in the global batch (negatives come "
            f"from the other rows), got {total} over {comm.size} ranks (rows per rank: "
            f"{list(comm.shards[name].sizes)})"
        )
    return comm


def views_of(tensors: Sequence[Tensor], temperature: float, comm: Optional[D.Exchange], name: str):
    """``Views`` of the tensors, or ``GatheredViews`` of them against the group's global batch
    when ``comm`` is given (laid out as the exchanged tensor ``name``)."""
    views = Views(tensors, temperature)
    return views if comm is None else GatheredViews(views, comm, name)


class GatheredViews:
    """``Views`` of this rank's rows, computed against the rows of every rank (module docstring).

    The unit rows of the V local views are stacked into one (N_local, V, D) tensor and gathered
    once (``Exchange.gather``), so ``unit(l)`` is view l of the (N_global, V, D) result (row
    stride V·D). Whole-batch quantities are global — ``rows`` is the global row count,
    ``unit(l)`` / ``cosine_value`` cover the global batch, ``local_part`` slices this rank's rows
    out of a global per-sample tensor — while ``positive`` and the LSEs of ``within`` /
    ``normalisers`` are per LOCAL anchor, and ``reduce`` applies ``Exchange.finish``.
    """

    def __init__(self, views: Views, comm: D.Exchange, name: str):
        self.local, self.comm, self.name = views, comm, name
        shard = comm.shards[name]
        self.offset, self.rows, self.local_rows = shard.offset, shard.total, shard.local
        self.count, self.dtype, self.temperature = views.count, views.dtype, views.temperature
        stacked = torch.stack([views.unit(l) for l in range(views.count)], dim=1)
        self._units = comm.gather(name, stacked)                # (N_global, V, D)

    def unit(self, l: int) -> Tensor:
        """(N_global, D) unit rows of view l of every rank (a strided view, with gradient)."""
        return self._units[:, l]

    def cosine_value(self, l: int, m: int) -> Tensor:
        """(N_global,) ⟨u_l,i, u_m,i⟩ of the global batch, detached."""
        with torch.no_grad():
            return torch.linalg.vecdot(self.unit(l), self.unit(m))

    def positive(self, l: int, m: int) -> Tensor:
        """(N_local,) ⟨u_l,i, u_m,i⟩/τ of this rank's rows."""
        return self.local.positive(l, m)

    def local_part(self, t):
        """This rank's rows of a global (N_global,) tensor; scalars unchanged."""
        if isinstance(t, Tensor) and t.dim() == 1:
            return t[self.offset: self.offset + self.local_rows]
        return t

    def against(self, l: int, m: int, exclude: str, factor: float, backend: str) -> Tensor:
        """(N_local,) LSE over the global view-m rows of factor·⟨u_l,i, u_m,j⟩/τ for this rank's
        view-l anchors; ``exclude="diagonal"`` drops the anchor's own global row."""
        views = self.local
        scale = views.scale[l] * factor if factor != 1.0 else views.scale[l]
        row, _ = similarity_lse(views.raw[l], self.unit(m), scale, exclude=exclude,
                                offset=self.offset if exclude == "diagonal" else 0, cols=False,
                                backend=backend)
        return row

    def within(self, l: int, factor: float, backend: str) -> Tensor:
        """(N_local,) LSE_{j≠i} over the global view-l rows (−∞ when the global batch has one row)."""
        return self.against(l, l, "diagonal", factor, backend)

    def normalisers(self, *, within: bool, across: Optional[str], factors: Sequence[float] = (1.0,),
                    backend: str) -> list[list[Tensor]]:
        """``Views.normalisers`` for this rank's anchors against the global batch: for each
        factor, per view l, the (N_local,) merged LSE."""
        parts = [[[] for _ in range(self.count)] for _ in factors]
        for l in range(self.count):
            for k, factor in enumerate(factors):
                if across is not None:
                    for m in range(self.count):
                        if m != l:
                            parts[k][l].append(self.against(l, m, across, factor, backend))
                if within and self.rows > 1:
                    parts[k][l].append(self.within(l, factor, backend))
        device = self.local.raw[0].device
        return [[merge_lses(p, self.local_rows, self.dtype, device) for p in per_view] for per_view in parts]

    def reduce(self, terms: Tensor, reduction: str) -> Tensor:
        """Per-anchor terms of this rank (k·N_local, k views stacked view-major) → the global
        "mean" (Σ over every rank / (k·N_global)), "sum", or this rank's terms ("none"), with the
        gradient convention of ``Exchange.finish`` (value global, gradient W × this rank's share)."""
        if reduction == "none":
            return self.comm.finish(terms, "none", anchors=self.name)
        total = self.comm.finish(terms, "sum", anchors=self.name)
        if reduction == "sum":
            return total
        per_row = terms.shape[0] // self.local_rows
        return total / float(per_row * self.rows)
