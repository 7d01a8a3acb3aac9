"""torch.distributed integration of the losses: exact global-batch losses across ranks.

Modes (keyword ``distributed`` of the losses that support it; ``group=`` picks the process group,
default the world):

- ``None``: compute on the given, rank-local tensors (no collective).
- ``"auto"``: ``"gather"`` when torch.distributed is initialised and the group has world size
  > 1, else ``None``. A collective call: every rank of the group must make it.
- ``"gather"``: each rank gathers the other side's features (with a gradient, see
  :func:`gather_rows`) and computes its LOCAL anchors against the GLOBAL columns through the
  fused primitives. Needs an initialised process group.
- ``"ring"``: for the losses with a ring form (clip_loss, infonce_loss, siglip_loss and their
  modules; ``mmloss.ring``): the other side's shards travel around the ranks, so per-rank memory
  stays O(B_local·D). Same values and gradients as "gather". Other losses raise a ValueError.

Convention (the one DDP users need), implemented by :meth:`Exchange.finish`:
the VALUE returned on every rank is the single-process loss of the concatenated global batch; the
GRADIENT it carries is W × this rank's share (W = the group's world size), so that after DDP's
averaging (÷ W) every parameter gradient equals the single-process gradient. Learnable scalars
shared by all ranks (logit scale, bias) are passed through :func:`global_scalar_grad`, whose
backward all-reduces their gradient and divides by W: every rank then holds the global scalar
gradient itself (open_clip's per-rank gradient with ``gather_with_grad=True``), and DDP's average
of equal values leaves it unchanged.

Uneven shards: the per-rank row counts (with D and the dtype, for clear errors) are exchanged first
with one small all-gather; ``uniform_shards=True`` skips that exchange (every rank must then hold
the same number of rows; D/dtype mismatches are not diagnosed). Shards are padded to the largest
for the collective and the padding is sliced off before any math.

What ``torch.distributed.nn.functional.all_gather`` lacks, and why :func:`gather_rows` exists: it
needs equal shapes on every rank (no uneven batches), returns a list (one more concatenation), and
its backward on non-NCCL backends goes through all_to_all. Here the forward pads to the largest
shard and the backward is a reduce-scatter on NCCL and an all-reduce of the gathered gradient
followed by this rank's slice elsewhere (gloo has no reduce-scatter).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

Tensor = torch.Tensor

MODES = ("auto", "gather", "ring", None)

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4, torch.int64: 5,
                torch.int32: 6}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


def check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {list(MODES)}, got {mode!r}")


def check_group(group) -> None:
    """``group`` is None (the world) or a torch.distributed ProcessGroup."""
    if group is None:
        return
    member = getattr(torch.distributed, "GroupMember", None)
    if member is not None and group is member.NON_GROUP_MEMBER:
        return  # what new_group() gives ranks outside it: refused as "not a member" where used
    process_group = getattr(torch.distributed, "ProcessGroup", None)
    if process_group is None or not isinstance(group, process_group):
        raise TypeError(f"group must be None or a torch.distributed ProcessGroup, got {type(group).__name__}")


def _dist():
    return torch.distributed


def is_initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    """The group's world size, 1 when torch.distributed is not initialised."""
    if not is_initialized():
        return 1
    return _dist().get_world_size(group)


def _check_member(loss_name: str, group) -> None:
    dist = _dist()
    if group is not None and dist.get_rank(group) < 0:
        raise RuntimeError(
            f"{loss_name}: this process (global rank {dist.get_rank()}) is not a member of the "
            "process group passed as group=; only the group's ranks may call a distributed loss"
        )


RING_LOSSES = ("clip_loss", "infonce_loss", "siglip_loss")


def _ring_unavailable(loss_name: str, why: str = "") -> ValueError:
    return ValueError(
        f"{loss_name}: distributed='ring' is not available for this loss{why}; the ring is implemented for "
        f"{', '.join(RING_LOSSES)} and their modules. Use distributed='gather' (exact, same result; per-rank "
        "memory holds the gathered features)"
    )


def resolve_mode(loss_name: str, mode, group=None, configured_world_size: int = 1, *,
                 ring: bool = False) -> Optional[str]:
    """``None`` (compute locally), ``"gather"`` or (for a loss with a ring form, ``ring=True``)
    ``"ring"``.

    ``configured_world_size`` is open_clip's ``world_size`` constructor argument: the group's
    actual size wins; a value other than 1 that differs from it raises a ValueError, and a value
    > 1 without an initialised process group raises a RuntimeError (the loss could not be global).
    """
    check_mode(mode)
    check_group(group)
    if mode is None:
        return None
    if mode == "ring" and not ring:
        raise _ring_unavailable(loss_name)
    if not is_initialized():
        if mode in ("gather", "ring"):
            raise RuntimeError(
                f"{loss_name}: distributed={mode!r} needs an initialised torch.distributed process "
                "group (torch.distributed.init_process_group); use distributed='auto' to compute "
                "locally when there is none"
            )
        if configured_world_size > 1:
            raise RuntimeError(
                f"{loss_name}: built with world_size={configured_world_size} but torch.distributed is "
                "not initialised, so the loss cannot gather across ranks; initialise the process "
                "group first, or pass distributed=None to compute the rank-local loss explicitly"
            )
        return None
    _check_member(loss_name, group)
    size = world_size(group)
    if configured_world_size not in (1, size):
        raise ValueError(
            f"{loss_name}: world_size={configured_world_size} was given but the process group has "
            f"world size {size}; the group's size is used, so drop world_size or make it match"
        )
    if size == 1:
        return None
    return "ring" if mode == "ring" else "gather"


def require_local(loss_name: str, mode: Optional[str], group=None, configured_world_size: int = 1) -> None:
    """For losses without a distributed form yet: raise unless this call may compute a rank-local
    loss (never a silent rank-local result where a global one was asked for)."""
    check_mode(mode)
    if mode is None:
        return
    if mode in ("gather", "ring"):
        raise RuntimeError(
            f"{loss_name}: distributed={mode!r} is not supported yet by this loss; "
            "pass distributed=None to compute the rank-local loss"
        )
    size = max(world_size(group), configured_world_size)
    if size > 1:
        raise RuntimeError(
            f"{loss_name}: running with world size {size} but this loss cannot gather across ranks "
            "yet; the result would silently be a rank-local loss. Pass distributed=None to "
            "accept the local loss explicitly."
        )


# ----------------------------------------------------------------------------- collectives


def _uses_nccl(group) -> bool:
    return str(_dist().get_backend(group)).lower() == "nccl"


def _all_gather_padded(t: Tensor, sizes: Sequence[int], group) -> Tensor:
    """Concatenation over ranks of each rank's ``t`` (``sizes[r]`` rows), no padding in the result."""
    dist = _dist()
    width = max(sizes)
    t = t.contiguous()
    if t.shape[0] < width:
        pad = t.new_zeros((width - t.shape[0],) + tuple(t.shape[1:]))
        t = torch.cat([t, pad], dim=0)
    buffers = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(buffers, t, group=group)
    if all(s == width for s in sizes):
        return torch.cat(buffers, dim=0)
    return torch.cat([b[:s] for b, s in zip(buffers, sizes)], dim=0)


class _GatherRows(torch.autograd.Function):
    """Forward: rows of every rank, concatenated in rank order. Backward: the incoming gradient
    summed over ranks, then this rank's rows (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, t, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = tuple(sizes), rank, group
        return _all_gather_padded(t, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        dist = _dist()
        sizes, rank, group = ctx.sizes, ctx.rank, ctx.group
        offset = sum(sizes[:rank])
        if _uses_nccl(group):
            width = max(sizes)
            chunks = list(torch.split(grad.contiguous(), list(sizes), dim=0))
            padded = [c if c.shape[0] == width else
                      torch.cat([c, c.new_zeros((width - c.shape[0],) + tuple(c.shape[1:]))]) for c in chunks]
            out = torch.empty_like(padded[0])
            dist.reduce_scatter(out, padded, group=group)
            return out[: sizes[rank]], None, None, None
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total[offset: offset + sizes[rank]], None, None, None


class _GlobalScalarGrad(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient and divides by the world size."""

    @staticmethod
    def forward(ctx, t, group, size):
        ctx.group, ctx.size = group, size
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        total = grad.contiguous().clone()
        _dist().all_reduce(total, group=ctx.group)
        return total / ctx.size, None, None


class _AllReduceSum(torch.autograd.Function):
    """Σ over ranks; the gradient of a sum every rank uses is the sum of their gradients."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        total = t.contiguous().clone()
        _dist().all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        total = grad.contiguous().clone()
        _dist().all_reduce(total, group=ctx.group)
        return total, None


class _ValueWithGradient(torch.autograd.Function):
    """Returns ``value`` (detached) while passing ``factor × grad`` to ``carrier``."""

    @staticmethod
    def forward(ctx, carrier, value, factor):
        ctx.factor = factor
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None, None


def gather_rows(t: Tensor, sizes: Sequence[int], rank: int, group=None) -> Tensor:
    """All-gather of (sizes[rank], ...) ``t`` into (Σ sizes, ...) with a correct backward: the
    gradient reaching ``t`` is the sum over ranks of the gathered tensor's gradient, sliced to this
    rank's rows. Integer tensors are gathered without autograd. Memory: the gathered tensor plus
    one padded copy per rank during the collective."""
    if not t.is_floating_point():
        return _all_gather_padded(t, sizes, group)
    return _GatherRows.apply(t, tuple(sizes), rank, group)


def global_scalar_grad(t, group, size: int):
    """``t`` unchanged; the gradient each rank receives is the average over ranks of the gradients
    (scalars shared by every rank: logit scale, bias). Floats and tensors not requiring gradients
    pass through without a collective."""
    if isinstance(t, Tensor) and t.requires_grad and torch.is_grad_enabled():
        return _GlobalScalarGrad.apply(t, group, size)
    return t


@dataclass(frozen=True)
class Shard:
    """Row layout of one tensor across the group: ``sizes[r]`` rows on rank r."""
    sizes: tuple
    rank: int

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def local(self) -> int:
        return self.sizes[self.rank]


class Exchange:
    """One distributed loss call: its group, and the row layouts of its named tensors.

    Built with :meth:`open`, which validates the group and exchanges (rows, D, dtype) of every named
    tensor in one small all-gather (skipped with ``uniform_shards=True``); a mismatch of D or dtype
    raises the same ValueError on every rank (so no rank is left waiting in a collective).
    """

    def __init__(self, loss_name: str, group, rank: int, size: int, shards: dict):
        self.loss_name, self.group, self.rank, self.size, self.shards = loss_name, group, rank, size, shards

    @classmethod
    def open(cls, loss_name: str, group, uniform_shards: bool, **tensors: Tensor) -> "Exchange":
        dist = _dist()
        _check_member(loss_name, group)
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        names = list(tensors)
        if uniform_shards:
            shards = {k: Shard((int(t.shape[0]),) * size, rank) for k, t in tensors.items()}
            return cls(loss_name, group, rank, size, shards)
        device = next(iter(tensors.values())).device
        meta = torch.tensor([v for t in tensors.values() for v in
                             (t.shape[0], t.shape[1] if t.dim() > 1 else 0, _DTYPE_CODES.get(t.dtype, 0))],
                            dtype=torch.int64, device=device)
        everyone = [torch.empty_like(meta) for _ in range(size)]
        dist.all_gather(everyone, meta, group=group)
        table = torch.stack(everyone).cpu().view(size, len(names), 3).tolist()
        shards = {}
        for k, name in enumerate(names):
            rows = tuple(int(table[r][k][0]) for r in range(size))
            for column, what in ((1, "feature dimension D"), (2, "dtype")):
                values = [table[r][k][column] for r in range(size)]
                if len(set(values)) > 1:
                    shown = values if column == 1 else [str(_CODE_DTYPES.get(v, "other")) for v in values]
                    listing = ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown))
                    raise ValueError(
                        f"{loss_name}: {name} must have the same {what} on every rank of the group, "
                        f"got {listing}"
                    )
            shards[name] = Shard(rows, rank)
        return cls(loss_name, group, rank, size, shards)

    def gather(self, name: str, t: Tensor) -> Tensor:
        """Gather ``t`` laid out as the tensor exchanged under ``name`` (labels travel with their
        features by naming the features' layout)."""
        shard = self.shards[name]
        if t.shape[0] != shard.local:  # pragma: no cover - callers gather what they exchanged
            raise ValueError(f"{self.loss_name}: {name} has {t.shape[0]} rows, expected {shard.local}")
        return gather_rows(t, shard.sizes, self.rank, self.group)

    def scalar(self, t):
        return global_scalar_grad(t, self.group, self.size)

    def sum_rows(self, t: Tensor) -> Tensor:
        """Σ over every rank's rows of ``t`` (rows, ...) → (...), with the gradient of an
        all-reduce (each rank's rows receive the sum over ranks of the incoming gradients)."""
        return _AllReduceSum.apply(t.sum(dim=0), self.group)

    def ring(self, x_name: str, y_name: str):
        """The ``mmloss.ring.Ring`` of this call: ``x_name``'s rows stay, ``y_name``'s travel."""
        from .ring import Ring

        return Ring(self.group, self.rank, self.size, self.shards[x_name].sizes, self.shards[y_name].sizes)

    def finish(self, terms: Tensor, reduction: str, anchors: str) -> Tensor:
        """This rank's per-anchor terms → the returned loss (module docstring's convention).

        "mean": value Σ_all terms / N_global; "sum": value Σ_all terms; both carry the gradient
        W·(Σ_local terms)/denominator, after one scalar all-reduce. "none": this rank's terms
        (values exact; gradient scaled by W, so ``.sum()`` on every rank followed by DDP's average
        gives the gradient of the global sum). N_global = total rows of ``anchors``.
        """
        factor = float(self.size)
        if reduction == "none":
            return _ValueWithGradient.apply(terms, terms, factor)
        local = terms.sum()
        total = local.detach().clone()
        _dist().all_reduce(total, group=self.group)
        if reduction == "mean":
            n = self.shards[anchors].total
            return _ValueWithGradient.apply(local, total / n, factor / n)
        return _ValueWithGradient.apply(local, total, factor)
