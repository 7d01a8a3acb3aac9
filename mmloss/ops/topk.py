"""``similarity_topk``: the k best columns of ``s·x·yᵀ`` per row, streamed over row chunks.

A utility for evaluation (retrieval recall@k) and for masks that need a row's argmax (ModX's
"teacher is right" rows) without the N×M matrix. No gradient; any device; plain torch.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from ._args import check_chunk_size, split_scalar
from ._spec import PairSpec
from .torch_chunked import MIN_CHUNK_ROWS, ChunkedLogits, workspace_budget

Tensor = torch.Tensor

# A chunk's memory in C×M fp32 units: the logit tile and its scratch twin (``ChunkedLogits``),
# and for k > 1 the sorted values, the int64 indices (two units) and the sort's own scratch.
_UNITS_ARGMAX = 2
_UNITS_SORT = 6


def _chunk_rows(n: int, m: int, k: int, device: torch.device, dtype: torch.dtype, chunk: Optional[int]) -> int:
    if chunk is not None:
        return min(chunk, n)
    elem = torch.finfo(dtype).bits // 8
    units = _UNITS_ARGMAX if k == 1 else _UNITS_SORT
    rows = workspace_budget(device, n * m * elem) // (units * m * elem)
    return max(1, min(n, max(MIN_CHUNK_ROWS, rows)))


def similarity_topk(x: Tensor, y: Tensor, k: int, *, scale=1.0, chunk_size: Optional[int] = None,
                    chunk: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """The k largest logits ``L_ij = s·⟨x_i, y_j⟩`` of every row, and their column indices.

    Args:
        x: (N, D), y: (M, D) fp16/bf16/fp32/fp64 features on one device, any strides (dtypes
            promoted as a matmul would; tiles are computed in fp32, fp64 for fp64 inputs).
        k: 1 ≤ k ≤ M.
        scale: the logit scale s: a float, a 0-d tensor or an (N,) per-row tensor (finite).
        chunk_size: rows per chunk (≥ 1); default from the torch backend's workspace budget
            (1/16 of the N×M fp32 matrix within its bounds, or ``MMLOSS_CHUNK_BYTES``).
        chunk: deprecated spelling of ``chunk_size`` (DeprecationWarning).

    Returns:
        ``(values (N, k), indices (N, k))``: values in fp32 (fp64 for fp64 inputs), sorted in
        descending order; indices int64. Ties resolve to the lower column index: k = 1 uses
        ``argmax`` (first maximum), k > 1 a stable descending sort of each row chunk — so the
        result is deterministic and the same on every device. No gradient flows (computed under
        ``torch.no_grad`` from detached inputs).

    Memory: O((N+M)·D + N·k) plus a chunk workspace of C×M (k = 1: two fp32 buffers; k > 1:
    about six fp32-sized buffers, the sort's outputs included) within the budget.
    """
    x, y = V.prepare_features("x", x, "y", y)
    n, m = x.shape[0], y.shape[0]
    k = V.check_int("k", k)
    if k < 1 or k > m:
        raise ValueError(f"k must satisfy 1 ≤ k ≤ M = {m} (the rows of y), got k={k}")
    scale = V.check_scalar("scale", scale, rows=n, device=x.device)
    chunk_size = V.renamed_argument("similarity_topk", "chunk", chunk, "chunk_size", chunk_size)
    chunk_size = check_chunk_size(chunk_size)
    scale = scale.detach() if isinstance(scale, Tensor) else scale
    scale_t, scale_v = split_scalar(scale, x)
    return _similarity_topk_op(x.detach(), y.detach(), k, scale_t, scale_v, chunk_size)


@torch.library.custom_op("mmloss::similarity_topk", mutates_args=())
def _similarity_topk_op(x: Tensor, y: Tensor, k: int, scale: Optional[Tensor], scale_value: float,
                        chunk: int) -> tuple[Tensor, Tensor]:
    """The chunk loop as one custom op, so torch.compile sees one node (no specialisation on
    N from the loop) and no gradient: it has no autograd formula."""
    n, m = x.shape[0], y.shape[0]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = _chunk_rows(n, m, k, x.device, cdt, chunk or None)
    spec = PairSpec(x, y, scale, scale_value, None, 0.0, "none", 0, None, None, rows)
    tiles = ChunkedLogits(spec, exclude_marks=False)
    values = torch.empty(n, k, dtype=cdt, device=x.device)
    indices = torch.empty(n, k, dtype=torch.long, device=x.device)
    with torch.no_grad():
        for i0, i1 in tiles.ranges():
            logits = tiles.logits(i0, i1)
            if k == 1:
                torch.amax(logits, dim=1, keepdim=True, out=values[i0:i1])
                torch.argmax(logits, dim=1, keepdim=True, out=indices[i0:i1])
            else:
                top, where = torch.sort(logits, dim=1, descending=True, stable=True)
                values[i0:i1] = top[:, :k]
                indices[i0:i1] = where[:, :k]
                del top, where
    return values, indices


@_similarity_topk_op.register_fake
def _(x, y, k, scale, scale_value, chunk):
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((x.shape[0], k), dtype=cdt), x.new_empty((x.shape[0], k), dtype=torch.long)


__all__ = ["similarity_topk"]
