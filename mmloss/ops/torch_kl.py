"""The ``torch`` backend of ``similarity_kl``: row chunks of the teacher and student logits.

Backend contract (every backend module that offers ``similarity_kl`` defines both functions;
the op layer ``mmloss.ops._kl`` looks them up by name, e.g. in ``mmloss.ops.triton``):

``similarity_kl_forward(spec: KLSpec, rows: bool, cols: bool, cross_entropy: bool)
-> (row, col, row_stats, col_stats)``
    ``row``: (N,) KL_i (or H_i when ``cross_entropy``), or an empty (0,) tensor when not
    ``rows``; ``col``: (M,) likewise down the columns. ``row_stats``: (4, N), or (4, 0) when
    not ``rows``, and ``col_stats``: (4, M) or (4, 0): the backend's unrounded statistics of the
    student's and the teacher's softmax per row / column (this backend: ``[max_s, sum_s, max_t,
    sum_t]`` with ``sum = Σ exp(L − max)``; other backends may use other units). Only the same
    backend's backward reads them. All in ``spec.compute_dtype`` (fp32; fp64 for fp64 inputs),
    freshly allocated (no views of inputs).

``similarity_kl_backward(spec: KLSpec, grad_row: Tensor | None, grad_col: Tensor | None,
row_stats: Tensor, col_stats: Tensor, needs: tuple[bool, bool, bool]) -> (dx_s, dy_s, dscale_s)``
    Gradients of ``⟨grad_row, row⟩ + ⟨grad_col, col⟩`` w.r.t. the student's x_s (N, D_s),
    y_s (M, D_s) and 0-d scale_s, each ``None`` where ``needs`` (x, y, scale) is False, in the
    dtype of the corresponding input. The logit gradient is
    ``G_ij = g_i·(softmax_j(L^s_i) − softmax_j(L^t_i)) + h_j·(softmax_i(L^s_·j) −
    softmax_i(L^t_·j))`` from the saved statistics, each probability recomputed as
    ``exp(L − max)/sum`` on tiles computed exactly as in the forward pass (so the exponent is
    exact at any logit magnitude); the teacher gets nothing.

This module's algorithm. Forward: one pass over row chunks; each chunk computes the student
tile ``S = s_s·x_s[c]·y_sᵀ`` and the teacher tile ``T = s_t·x_t[c]·y_tᵀ`` (C×M each, two GEMMs).
A chunk holds whole rows, so row statistics are exact per chunk: LSE of S and of T, the
teacher-weighted sum ``A_i = Σ_j e^{T_ij − max_i}·(T_ij − S_ij)`` and (cross-entropy) the
teacher entropy ``Σ_j e^{T_ij − max_i}·(max_i − T_ij)``. Columns merge online across chunks in
chunk order (deterministic): per column the student's running max and rescaled sum, and the
teacher's running max with its rescaled sum, ``A_j`` and entropy sum, all rescaled together by
``e^{m_old − m_new}`` when the teacher's max moves. Finally ``KL = A/l_t − LSE_t + LSE_s`` and
``H = KL + log l_t + Σ e^{T−max}(max − T)/l_t`` (both clamped at 0 against rounding).
Backward: recompute both tiles per chunk (same chunk plan, so bit-identical to the forward's)
and, from the saved maxima and sums, form G in place, and apply it with
``FeatureGrads`` (dx, dy, dscale: two GEMMs). Cost: 2 GEMM-equivalents forward, 4 backward.

Memory: O((N+M)·(D_s+D_t)) plus four C×M compute-dtype chunk buffers (two per tile source)
whose total stays within half of ``workspace_budget`` (by default half the operands' size, or
``MMLOSS_CHUNK_BYTES``), or C = ``chunk_size`` rows when given. Half,
because the distillation losses add this term to a CLIP term: the backward that runs second
holds the other's partial dx, dy beside its own workspace, and the two together must stay
within one budget plus O(N·D).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._spec import KLSpec
from .torch_chunked import MIN_CHUNK_ROWS, ChunkedLogits, FeatureGrads, workspace_budget

# Chunk buffers held at once: the student and teacher tiles and one scratch buffer each; all
# four together take 1/_BUDGET_SHARE of the workspace budget (see the module docstring).
_BUFFERS = 4
_BUDGET_SHARE = 2


def kl_chunk_rows(spec: KLSpec) -> int:
    """Rows per chunk: ``spec.chunk_size`` when given, else the most rows whose four C×M
    buffers fit in half the workspace budget (at least 16, at most N)."""
    if spec.chunk_size > 0:
        return min(spec.chunk_size, spec.n)
    elem = torch.finfo(spec.compute_dtype).bits // 8
    dims = spec.x_s.shape[1] + spec.x_t.shape[1]
    budget = workspace_budget(spec.x_s.device, spec.n * spec.m * elem, (spec.n + spec.m) * dims * elem)
    rows = budget // (_BUDGET_SHARE * _BUFFERS * spec.m * elem)
    return max(1, min(spec.n, max(MIN_CHUNK_ROWS, rows)))


def _tiles(spec: KLSpec) -> tuple[ChunkedLogits, ChunkedLogits]:
    rows = kl_chunk_rows(spec)
    return (ChunkedLogits(spec.student(rows), exclude_marks=False),
            ChunkedLogits(spec.teacher(rows), exclude_marks=False))


def _empty_stats(spec: KLSpec, dtype) -> torch.Tensor:
    return spec.x_s.new_empty((4, 0), dtype=dtype)


def _empty(spec: KLSpec, dtype) -> torch.Tensor:
    return spec.x_s.new_empty(0, dtype=dtype)


class _ColumnStats:
    """Online per-column statistics merged over row chunks (docs/kernels.md, "similarity_kl").

    Per chunk call ``add_student`` and then ``add_teacher``; the first chunk initialises.
    """

    def __init__(self, m: int, dtype, device, cross_entropy: bool):
        self.first = True
        self.cross_entropy = cross_entropy
        z = lambda: torch.zeros(m, dtype=dtype, device=device)  # noqa: E731
        self.max_s, self.sum_s = z(), z()
        self.max_t, self.sum_t, self.weighted, self.entropy = z(), z(), z(), z()

    def add_student(self, s: torch.Tensor, e: torch.Tensor) -> None:
        new_max = s.amax(dim=0)
        if not self.first:
            new_max = torch.maximum(self.max_s, new_max)
        torch.sub(s, new_max[None, :], out=e).exp_()
        tile_sum = e.sum(dim=0)
        if self.first:
            self.sum_s = tile_sum
        else:
            self.sum_s.mul_(torch.exp(self.max_s - new_max)).add_(tile_sum)
        self.max_s = new_max

    def add_teacher(self, t: torch.Tensor, diff: torch.Tensor, e: torch.Tensor, f: torch.Tensor) -> None:
        """Merge the teacher tile ``t`` (destroyed) with ``diff = T − S``; ``e``, ``f`` scratch."""
        new_max = t.amax(dim=0)
        if not self.first:
            new_max = torch.maximum(self.max_t, new_max)
        torch.sub(t, new_max[None, :], out=e).exp_()
        tile_sum = e.sum(dim=0)
        tile_weighted = torch.mul(e, diff, out=f).sum(dim=0)
        tile_entropy = None
        if self.cross_entropy:
            # Σ_i e^{T_ij − m_j}·(m_j − T_ij): non-negative terms, no cancellation.
            tile_entropy = t.sub_(new_max[None, :]).neg_().mul_(e).sum(dim=0)
        if self.first:
            self.sum_t, self.weighted = tile_sum, tile_weighted
            if tile_entropy is not None:
                self.entropy = tile_entropy
            self.first = False
        else:
            rescale = torch.exp(self.max_t - new_max)
            if tile_entropy is not None:
                # Σ e^{T−m_new}(m_new − T) = r·[Σ e^{T−m_old}(m_old − T) + (m_new − m_old)·l_old]
                self.entropy.addcmul_(new_max - self.max_t, self.sum_t).mul_(rescale).add_(tile_entropy)
            self.sum_t.mul_(rescale).add_(tile_sum)
            self.weighted.mul_(rescale).add_(tile_weighted)
        self.max_t = new_max

    def finish(self):
        lse_s = self.sum_s.log().add_(self.max_s)
        lse_t = self.sum_t.log().add_(self.max_t)
        stats = torch.stack((self.max_s, self.sum_s, self.max_t, self.sum_t))
        return lse_s, lse_t, self.weighted, self.sum_t, self.entropy, stats


def _divergence(weighted, sum_t, lse_s, lse_t, entropy, cross_entropy: bool) -> torch.Tensor:
    """KL = A/l_t − LSE_t + LSE_s; H = KL + log l_t + entropy/l_t; clamped at 0 (rounding)."""
    out = (weighted / sum_t).sub_(lse_t).add_(lse_s)
    if cross_entropy:
        out.add_(entropy / sum_t).add_(sum_t.log())
    return out.clamp_(min=0)


def similarity_kl_forward(spec: KLSpec, rows: bool, cols: bool, cross_entropy: bool):
    """Row / column KL (or cross-entropy) and the saved LSE statistics; see the module doc."""
    ch_s, ch_t = _tiles(spec)
    cdt = ch_s.cdt
    dev = spec.x_s.device
    if rows:
        row = torch.empty(spec.n, dtype=cdt, device=dev)
        row_stats = torch.empty(4, spec.n, dtype=cdt, device=dev)
    columns = _ColumnStats(spec.m, cdt, dev, cross_entropy) if cols else None
    for i0, i1 in ch_s.ranges():
        s = ch_s.logits(i0, i1)
        t = ch_t.logits(i0, i1)
        e = ch_s.tmp[: i1 - i0]
        f = ch_t.tmp[: i1 - i0]
        if rows:
            max_s = s.amax(dim=1)
            sum_s = torch.sub(s, max_s[:, None], out=e).exp_().sum(dim=1)
            lse_s = sum_s.log().add_(max_s)
        if columns is not None:
            columns.add_student(s, e)
        diff = torch.sub(t, s, out=s)  # the student tile is no longer needed: T − S in place
        if rows:
            max_t = t.amax(dim=1)
            exp_t = torch.sub(t, max_t[:, None], out=e).exp_()
            sum_t = exp_t.sum(dim=1)
            entropy = None
            if cross_entropy:
                entropy = torch.sub(max_t[:, None], t, out=f).mul_(exp_t).sum(dim=1)
            weighted = exp_t.mul_(diff).sum(dim=1)
            lse_t = sum_t.log().add_(max_t)
            row[i0:i1] = _divergence(weighted, sum_t, lse_s, lse_t, entropy, cross_entropy)
            row_stats[:, i0:i1] = torch.stack((max_s, sum_s, max_t, sum_t))
        if columns is not None:
            columns.add_teacher(t, diff, e, f)
    if not rows:
        row, row_stats = _empty(spec, cdt), _empty_stats(spec, cdt)
    if columns is not None:
        lse_s, lse_t, weighted, sum_t, entropy, col_stats = columns.finish()
        col = _divergence(weighted, sum_t, lse_s, lse_t, entropy, cross_entropy)
    else:
        col, col_stats = _empty(spec, cdt), _empty_stats(spec, cdt)
    return row, col, row_stats, col_stats


def similarity_kl_backward(
    spec: KLSpec,
    grad_row: Optional[torch.Tensor],
    grad_col: Optional[torch.Tensor],
    row_stats: torch.Tensor,
    col_stats: torch.Tensor,
    needs: tuple[bool, bool, bool],
):
    """(dx_s, dy_s, dscale_s) of ⟨grad_row, row⟩ + ⟨grad_col, col⟩; see the module doc."""
    ch_s, ch_t = _tiles(spec)
    cdt = ch_s.cdt
    g = grad_row.to(cdt) if grad_row is not None else None
    h = grad_col.to(cdt) if grad_col is not None else None
    if g is not None:
        # softmax = exp(L − max)·(1/sum); the upstream gradient joins the 1/sum factor
        row_s, row_t, w_rs, w_rt = row_stats[0], row_stats[2], g / row_stats[1], g / row_stats[3]
    if h is not None:
        col_s, col_t, w_cs, w_ct = col_stats[0], col_stats[2], h / col_stats[1], h / col_stats[3]
    grads = FeatureGrads(ch_s, needs + (False,))
    for i0, i1 in ch_s.ranges():
        s = ch_s.logits(i0, i1)
        t = ch_t.logits(i0, i1)
        e = ch_s.tmp[: i1 - i0]
        f = ch_t.tmp[: i1 - i0]
        grad = None
        if g is not None:
            # g_i·(softmax_j(S_i) − softmax_j(T_i)) into e
            torch.sub(s, row_s[i0:i1, None], out=e).exp_().mul_(w_rs[i0:i1, None])
            e.sub_(torch.sub(t, row_t[i0:i1, None], out=f).exp_().mul_(w_rt[i0:i1, None]))
            grad = e
        if h is not None:
            # h_j·(softmax_i(S_j) − softmax_i(T_j)) in place into s (t is scratch)
            s.sub_(col_s[None, :]).exp_().mul_(w_cs[None, :])
            s.sub_(t.sub_(col_t[None, :]).exp_().mul_(w_ct[None, :]))
            grad = s.add_(e) if grad is not None else s
        if grad is None:
            grad = s.zero_()
        grads.add_chunk(i0, i1, grad)
    dx, dy, dscale, _ = grads.finish(None)
    return dx, dy, dscale
