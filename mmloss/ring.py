"""``distributed="ring"``: the fused primitives over a global batch whose candidate side travels
around the ranks, so no rank ever holds more than two shards of it.

Rank r keeps its own rows x_r (the anchors) and passes the candidate shards y_k around the ring
(to rank r+1, from rank r−1) with ``torch.distributed.batch_isend_irecv``; the next shard is in
flight while the current one is computed. At step t rank r holds shard k = r − t (mod W):

- forward (no autograd graph): the primitive's forward op on (x_r, y_k) gives this block's row
  statistics, merged into x_r's running record, and its column statistics, merged into the record
  that travels with y_k; after W steps every shard's column record has visited every rank and
  one more hop returns it, complete, to its owner;
- backward: a second ring. Each block calls the primitive's backward op with the *final*
  statistics (the "backward from given statistics" entry point of ``mmloss.ops._schema``): x_r's
  gradient accumulates locally, y_k's gradient (fp32) travels with the shard and reaches its
  owner after the last hop, as do the column gradients' upstream values.

Autograd saves only x_r, y_r and the final statistics: O(B_local·D) per rank, plus in flight two
candidate shards and two gradient accumulators (4·B·D·4 bytes in fp32) and the primitives' own
workspace. Statistics are merged in the backend's own units (``merge_lse_stats`` /
``lse_from_stats`` of the backend module), so large logits keep their exactness.

Positions are global: the diagonal of the global batch pairs row ``i`` of rank r with column
``j`` of shard k when ``offset_r + i == offset_k + j``, i.e. the primitive's ``offset`` is
``offset_r − offset_k``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .ops._args import resolve_deterministic, split_scalar
from .ops._backends import resolve_backend
from .ops._primitives import PAIRWISE_SIGMOID, SIMILARITY_LSE

Tensor = torch.Tensor


@dataclass(frozen=True)
class Ring:
    """The ring of one call: the group, this rank's place in it, and the row counts of the
    anchors (``x_sizes``) and the travelling candidates (``y_sizes``) on every rank."""

    group: object
    rank: int
    size: int
    x_sizes: tuple
    y_sizes: tuple

    def offset(self, sizes, rank: int) -> int:
        return sum(sizes[:rank])

    def holder_of(self, step: int) -> int:
        """The shard this rank holds at ``step``."""
        return (self.rank - step) % self.size


def _travel(ring: Ring, rows_first, rows_last, step: int, wait: bool = True):
    """Send tensors of the shard held at ``step`` to the next rank and receive those of the shard
    held at ``step + 1`` from the previous one: ``rows_first`` laid out (rows, ...) (features,
    per-row vectors), ``rows_last`` laid out (fields, rows) (statistics). Returns (received
    rows-first, received rows-last, pending works — already waited on when ``wait``)."""
    dist = torch.distributed
    rows = ring.y_sizes[ring.holder_of(step + 1)]
    recv_first = [t.new_empty((rows,) + tuple(t.shape[1:])) for t in rows_first]
    recv_last = [t.new_empty(tuple(t.shape[:-1]) + (rows,)) for t in rows_last]
    nxt, prv = (ring.rank + 1) % ring.size, (ring.rank - 1) % ring.size
    # One batch_isend_irecv: NCCL then launches the sends and receives as one group, which a
    # ring needs (separate isend/irecv would each wait for their peer's matching call: every rank
    # sending first deadlocks the ring).
    ops = []
    for send, recv in zip(list(rows_first) + list(rows_last), recv_first + recv_last):
        ops.append(dist.P2POp(dist.isend, send.contiguous(), group=ring.group, group_peer=nxt))
        ops.append(dist.P2POp(dist.irecv, recv, group=ring.group, group_peer=prv))
    works = dist.batch_isend_irecv(ops) if ops else []
    if wait:
        for w in works:
            w.wait()
        works = []
    return recv_first, recv_last, works


def _arrive(pending):
    """Wait for a ``_travel(..., wait=False)``; return (received rows-first, received rows-last).
    The works are dropped here: a finished send still references its tensor, and keeping it
    would hold one more shard alive per step."""
    received_first, received_last, works = pending
    for w in works:
        w.wait()
    return received_first, received_last


def _stats_functions(backend: str):
    module = SIMILARITY_LSE.backend_module(backend)
    merge, to_lse = getattr(module, "merge_lse_stats", None), getattr(module, "lse_from_stats", None)
    if merge is None or to_lse is None:
        raise RuntimeError(f"mmloss backend {backend!r} cannot merge similarity_lse statistics across ranks "
                           "(distributed='ring'); use backend='torch' or distributed='gather'")
    return merge, to_lse


def _accumulate(total: Optional[Tensor], part: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``total + part`` in ``dtype``, in place when ``total`` exists (no second full-size buffer:
    the ring's memory bound counts one accumulator per gradient)."""
    if part is None or part.numel() == 0:
        return total
    if total is None:
        return part.to(dtype)
    return total.add_(part)


def _block_grads(acc, block, needs, cdt):
    """Accumulate one block's (dx, dscale, dbias) into ``acc`` (a list, updated in place)."""
    for slot, need in ((0, needs[0]), (1, needs[2]), (2, needs[3])):
        if need:
            acc[slot] = _accumulate(acc[slot], block[slot], cdt)


def _allowed_sum(grad: Tensor, lse: Tensor) -> Tensor:
    """Σ grad over the rows whose LSE has an allowed pair (−inf: none); NaN propagates."""
    return torch.where(lse == float("-inf"), torch.zeros((), dtype=grad.dtype, device=grad.device), grad).sum()


def _cast_back(t: Optional[Tensor], like: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.to(like.dtype)


class _RingLSE(torch.autograd.Function):
    """(row LSE of x_r over every shard of y, column LSE of y_r over every rank's x)."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, scale_value, bias_value, exclude, rows, cols, ring, options):
        backend = options["backend"]
        merge, to_lse = _stats_functions(backend)
        x_offset = ring.offset(ring.x_sizes, ring.rank)
        row_stats = col_record = None
        current = y
        for step in range(ring.size):
            k = ring.holder_of(step)
            last = step == ring.size - 1
            pending = [] if last else _travel(ring, [current], [], step, wait=False)
            # Statistics only (logit budget 0: a block's logits are never kept across the ring).
            _, _, block_rows, block_cols, _ = SIMILARITY_LSE(
                x, current, scale, scale_value, bias, bias_value, exclude, x_offset - ring.offset(ring.y_sizes, k),
                None, None, True, cols, backend, options["chunk_size"], options["deterministic"], 0)
            row_stats = block_rows if row_stats is None else merge(row_stats, block_rows)
            if cols:
                col_record = block_cols if col_record is None else merge(col_record, block_cols)
            if not last:
                (current,), _ = _arrive(pending)
                pending = None
            if cols:  # the column record moves on with its shard (after the last step: home)
                col_record = _travel(ring, [], [col_record], step)[1][0]
        ctx.save_for_backward(x, y, scale, bias, row_stats, col_record)
        ctx.meta = (scale_value, bias_value, exclude, rows, cols, ring, options)
        shift = bias if bias is not None else bias_value
        row = to_lse(row_stats) + shift if rows else None
        col = to_lse(col_record) + shift if cols else None
        return row, col

    @staticmethod
    def backward(ctx, grad_row, grad_col):
        x, y, scale, bias, row_stats, col_record = ctx.saved_tensors
        scale_value, bias_value, exclude, rows, cols, ring, options = ctx.meta
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2],
                 ctx.needs_input_grad[3])
        cdt = row_stats.dtype
        grad_row = (grad_row if grad_row is not None else torch.zeros_like(row_stats[0])) if rows else None
        if cols:
            grad_col = grad_col if grad_col is not None else torch.zeros_like(col_record[0])
        x_offset = ring.offset(ring.x_sizes, ring.rank)
        acc = [None, None, None]  # dx, dscale, dbias in the compute dtype
        current, record, upstream = y, col_record, grad_col
        dy_acc = torch.zeros(y.shape, dtype=cdt, device=y.device) if needs[1] else None
        for step in range(ring.size):
            k = ring.holder_of(step)
            last = step == ring.size - 1
            first = [current] + ([upstream] if cols else [])
            pending = None if last else _travel(ring, first, [record] if cols else [], step, wait=False)
            # The bias gradient is not additive over blocks (a backend forms it as Σ grad over
            # rows with an allowed pair, once per call): it is formed below from the final stats.
            bx, by, bs, bb = SIMILARITY_LSE.run_backward(
                grad_row, upstream, x, current, scale, scale_value, bias, bias_value, exclude,
                x_offset - ring.offset(ring.y_sizes, k), None, None, rows, cols, options["backend"],
                options["chunk_size"], options["deterministic"], 0, row_stats, record if cols else
                torch.empty((2, 0), dtype=cdt, device=x.device), torch.empty(0, dtype=cdt, device=x.device),
                needs[0], needs[1], needs[2], False)
            _block_grads(acc, (bx, bs, bb), needs, cdt)
            if dy_acc is not None:
                dy_acc = _accumulate(dy_acc, by, cdt)
            del bx, by, bs, bb
            if pending is not None:
                received_first, received_last = _arrive(pending)
                pending = None
                current = received_first[0]
                if cols:
                    upstream, record = received_first[1], received_last[0]
                del received_first, received_last
            if dy_acc is not None:  # the shard's gradient moves on (after the last step: home)
                dy_acc = _travel(ring, [dy_acc], [], step)[0][0]
        if needs[3]:  # ∂LSE/∂b = 1 for every row (column) with an allowed pair
            _, to_lse = _stats_functions(options["backend"])
            acc[2] = _allowed_sum(grad_row, to_lse(row_stats)) if rows else torch.zeros((), dtype=cdt)
            if cols:
                acc[2] = acc[2] + _allowed_sum(grad_col, to_lse(col_record))
        dx, ds, db = (_cast_back(t, like) for t, like in zip(acc, (x, scale, bias)))
        return dx, _cast_back(dy_acc, y), ds, db, None, None, None, None, None, None, None


def similarity_lse_ring(x: Tensor, y: Tensor, scale, bias=None, *, exclude: str = "none", rows: bool = True,
                        cols: bool = True, ring: Ring, backend: str = "auto", chunk_size: Optional[int] = None,
                        deterministic: Optional[bool] = None):
    """``similarity_lse`` of this rank's x against the global y (rows) and of this rank's y
    against the global x (columns), with y travelling around ``ring``. Features already
    validated and of one dtype (the losses call it after ``Exchange.open``); ``exclude`` is
    "none" or "diagonal" (global positions). Returns (row (N_r,) | None, col (M_r,) | None)."""
    name = resolve_backend(backend, x.device, x.dtype)
    if name == "reference":
        name = "torch"  # the dense reference has no statistics to merge; the chunked backend is exact
    scale_t, scale_value = split_scalar(scale, x)
    bias_t, bias_value = split_scalar(0.0 if bias is None else bias, x)
    options = dict(backend=name, chunk_size=chunk_size or 0, deterministic=resolve_deterministic(deterministic))
    return _RingLSE.apply(x, y, scale_t, bias_t, scale_value, bias_value, exclude, rows, cols, ring, options)


class _RingSigmoid(torch.autograd.Function):
    """Per-row Σ_j softplus(−z_ij·L_ij) of x_r over every shard of y (z = +1 on the global
    diagonal when ``positives`` is "diagonal")."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, scale_value, bias_value, positives, ring, options):
        x_offset = ring.offset(ring.x_sizes, ring.rank)
        total, current = None, y
        for step in range(ring.size):
            k = ring.holder_of(step)
            last = step == ring.size - 1
            pending = None if last else _travel(ring, [current], [], step, wait=False)
            block = PAIRWISE_SIGMOID(x, current, scale, scale_value, bias, bias_value, positives,
                                     x_offset - ring.offset(ring.y_sizes, k), None, None, options["backend"],
                                     options["chunk_size"], options["deterministic"])
            total = block if total is None else total + block
            if pending is not None:
                (current,), _ = _arrive(pending)
                pending = None
        ctx.save_for_backward(x, y, scale, bias)
        ctx.meta = (scale_value, bias_value, positives, ring, options)
        return total

    @staticmethod
    def backward(ctx, grad):
        x, y, scale, bias = ctx.saved_tensors
        scale_value, bias_value, positives, ring, options = ctx.meta
        needs = tuple(ctx.needs_input_grad[:4])
        x_offset = ring.offset(ring.x_sizes, ring.rank)
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        acc = [None, None, None]  # dx, dscale, dbias in the compute dtype
        current = y
        dy_acc = torch.zeros(y.shape, dtype=cdt, device=y.device) if needs[1] else None
        for step in range(ring.size):
            k = ring.holder_of(step)
            last = step == ring.size - 1
            pending = None if last else _travel(ring, [current], [], step, wait=False)
            bx, by, bs, bb = PAIRWISE_SIGMOID.run_backward(
                grad, x, current, scale, scale_value, bias, bias_value, positives,
                x_offset - ring.offset(ring.y_sizes, k), None, None, options["backend"], options["chunk_size"],
                options["deterministic"], *needs)
            _block_grads(acc, (bx, bs, bb), needs, cdt)
            if dy_acc is not None:
                dy_acc = _accumulate(dy_acc, by, cdt)
            del bx, by, bs, bb
            if pending is not None:
                (current,), _ = _arrive(pending)
                pending = None
            if dy_acc is not None:  # the shard's gradient moves on (after the last step: home)
                dy_acc = _travel(ring, [dy_acc], [], step)[0][0]
        dx, ds, db = (_cast_back(t, like) for t, like in zip(acc, (x, scale, bias)))
        return dx, _cast_back(dy_acc, y), ds, db, None, None, None, None, None


def pairwise_sigmoid_ring(x: Tensor, y: Tensor, scale, bias=None, *, positives: str = "diagonal", ring: Ring,
                          backend: str = "auto", chunk_size: Optional[int] = None,
                          deterministic: Optional[bool] = None) -> Tensor:
    """``pairwise_sigmoid`` of this rank's x against the global y travelling around ``ring``:
    (N_r,) per-row sums (fp32, fp64 for fp64 inputs). ``positives`` "diagonal" (global) or
    "none"."""
    name = resolve_backend(backend, x.device, x.dtype)
    if name == "reference":
        name = "torch"
    scale_t, scale_value = split_scalar(scale, x)
    bias_t, bias_value = split_scalar(0.0 if bias is None else bias, x)
    options = dict(backend=name, chunk_size=chunk_size or 0, deterministic=resolve_deterministic(deterministic))
    return _RingSigmoid.apply(x, y, scale_t, bias_t, scale_value, bias_value, positives, ring, options)
