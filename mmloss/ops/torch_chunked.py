"""The ``torch`` backend: row chunks of the logit matrix with plain torch ops, any device.

Forward streams row chunks ``S = (s·x_c)·yᵀ`` (C×M) through a preallocated workspace, reduces
each chunk to row statistics and merges column statistics online (running max and rescaled sum,
in chunk order, so results are deterministic). Backward recomputes every chunk from the saved
fp32 statistics, forms the logit gradient ``G`` in place and applies it with two GEMMs:
``dx_c = s_c·(G·y)`` and ``dy += Gᵀ·(s·x_c)``; the scale gradient is ``⟨x_i, (G·y)_i⟩`` (no
division by s, so s = 0 works) and the bias gradient needs no extra pass.

Cost: symmetric statistics take one GEMM-equivalent forward; backward takes three (recompute,
dx, dy) — two when ``similarity_lse`` kept its logits (``spec.keeps_logits``: a user's logit
budget admits the N×M compute-dtype matrix, held from forward to backward). Memory:
O((N+M)·D) plus a workspace of one C×M compute-dtype buffer and a cache-sized column-block scratch, C chosen from a byte budget (``workspace_budget``: half the size of x and
y, within [1 MiB, 16 MiB] on CPU and up to 512 MiB on GPUs; ``MMLOSS_CHUNK_BYTES`` overrides)
or given as ``chunk_size``. Accumulation is
fp32 (fp64 for fp64 inputs); half inputs are upcast per chunk.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ._spec import PairSpec

# Default workspace: half the bytes of the operands x and y, so memory stays O((N+M)·D) with a
# small constant whatever N·M is, within [1 MiB, cap]. The cap keeps CPU chunks near the
# last-level cache and lets GPU chunks be large enough for efficient GEMMs. Callers that do not
# describe their operands get 1/16 of the N×M matrix instead.
_BUDGET_CAP = {"cpu": 16 << 20}
_BUDGET_CAP_ACCEL = 512 << 20
_BUDGET_FLOOR = 1 << 20
_MATRIX_FRACTION = 16
_OPERAND_FRACTION = 2
# Elementwise passes that need a second copy of a chunk work on column blocks of at most this
# many bytes (and at most 1/8 of the workspace), so the scratch stays cache-sized instead of
# doubling the workspace.
_BLOCK_BYTES = 2 << 20
MIN_CHUNK_ROWS = 16


def _parse_bytes(text: str) -> int:
    text = text.strip().lower()
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    for suffix in ("kib", "mib", "gib", "kb", "mb", "gb", "k", "m", "g"):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * units[suffix[0]])
    return int(text)


def workspace_budget(device: torch.device, matrix_bytes: int, operand_bytes: Optional[int] = None) -> int:
    """Bytes the chunk workspace may hold.

    ``MMLOSS_CHUNK_BYTES`` (e.g. "64MiB") overrides the default: half of ``operand_bytes`` (the
    size of x and y together; 1/16 of ``matrix_bytes`` when not given), clamped to
    [1 MiB, 16 MiB] on CPU and [1 MiB, 512 MiB] on accelerators.
    """
    env = os.environ.get("MMLOSS_CHUNK_BYTES")
    if env:
        try:
            value = _parse_bytes(env)
        except ValueError:
            raise ValueError(f"MMLOSS_CHUNK_BYTES must be a byte count such as 64MiB, got {env!r}")
        if value <= 0:
            raise ValueError(f"MMLOSS_CHUNK_BYTES must be positive, got {env!r}")
        return value
    cap = _BUDGET_CAP.get(device.type, _BUDGET_CAP_ACCEL)
    if operand_bytes is None:
        budget = matrix_bytes // _MATRIX_FRACTION
    else:
        budget = operand_bytes // _OPERAND_FRACTION
    return max(_BUDGET_FLOOR, min(cap, budget))


def _scratch_bytes(budget: int) -> int:
    return min(_BLOCK_BYTES, budget // 8)


def chunk_rows(spec: PairSpec) -> int:
    """Rows per chunk: ``chunk_size`` when given, else as many as the workspace budget holds
    (at least 16). Per row the workspace holds M logits and two D-wide temporaries (the
    scaled x rows and G·y); the column-block scratch comes off the top."""
    if spec.chunk_size > 0:
        return min(spec.chunk_size, spec.n)
    elem = torch.finfo(spec.compute_dtype).bits // 8
    d = spec.x.shape[1]
    budget = workspace_budget(spec.x.device, spec.n * spec.m * elem, (spec.n + spec.m) * d * elem)
    rows = (budget - _scratch_bytes(budget)) // ((spec.m + 2 * d) * elem)
    return max(1, min(spec.n, max(MIN_CHUNK_ROWS, rows)))


class ChunkedLogits:
    """Recomputes row chunks of ``S = s·x·yᵀ`` (bias not added) with marks applied.

    With ``kept`` (an (N, M) compute-dtype tensor) each chunk is written into its rows of
    ``kept`` instead of the workspace, so the whole matrix survives the pass (similarity_lse's
    kept logits); the workspace then serves as the target of the passes that must not
    overwrite S."""

    def __init__(self, spec: PairSpec, exclude_marks: bool, kept: Optional[torch.Tensor] = None):
        self.spec = spec
        self.cdt = spec.compute_dtype
        self.exclude_marks = exclude_marks
        self.kept = kept
        self.y = spec.y.to(self.cdt)
        self.rows = chunk_rows(spec)
        device = spec.x.device
        self.buf = torch.empty(self.rows, spec.m, dtype=self.cdt, device=device)
        elem = torch.finfo(self.cdt).bits // 8
        scratch = _scratch_bytes(self.rows * spec.m * elem)
        self.block_cols = max(1, min(spec.m, scratch // (self.rows * elem)))
        self.scratch = torch.empty(self.rows, self.block_cols, dtype=self.cdt, device=device)
        self._full_scratch = None
        self._scaled, self._scaled_rows = None, None
        if spec.scale is None:
            self.scale = spec.scale_value
        elif spec.per_row_scale:
            self.scale = spec.scale.to(self.cdt)
        else:
            self.scale = spec.scale.to(device=device, dtype=self.cdt)
        if spec.bias is None:
            self.bias = spec.bias_value
        else:
            self.bias = spec.bias.to(device=device, dtype=self.cdt)

    def ranges(self):
        for i0 in range(0, self.spec.n, self.rows):
            yield i0, min(self.spec.n, i0 + self.rows)

    def blocks(self, chunk: torch.Tensor):
        """(j0, j1, chunk[:, j0:j1], scratch view of the same shape) over column blocks."""
        c = chunk.shape[0]
        for j0 in range(0, self.spec.m, self.block_cols):
            j1 = min(self.spec.m, j0 + self.block_cols)
            yield j0, j1, chunk[:, j0:j1], self.scratch[:c, : j1 - j0]

    @property
    def tmp(self) -> torch.Tensor:
        """A second full C×M buffer, allocated on first use (for callers that need one)."""
        if self._full_scratch is None:
            self._full_scratch = torch.empty_like(self.buf)
        return self._full_scratch

    def scale_of(self, i0: int, i1: int):
        return self.scale[i0:i1, None] if self.spec.per_row_scale else self.scale

    def scaled_x(self, i0: int, i1: int) -> torch.Tensor:
        """s·x for rows [i0, i1); the last chunk's value is kept for the backward GEMM."""
        if self._scaled_rows != (i0, i1):
            self._scaled = self.spec.x[i0:i1].to(self.cdt) * self.scale_of(i0, i1)
            self._scaled_rows = (i0, i1)
        return self._scaled

    def label_mask(self, i0: int, i1: int) -> torch.Tensor:
        return self.spec.x_labels[i0:i1, None] == self.spec.y_labels[None, :]

    def logits(self, i0: int, i1: int) -> torch.Tensor:
        """S for rows [i0, i1) in the workspace (in ``kept`` when given); marked pairs are −inf
        when excluding."""
        out = self.buf[: i1 - i0] if self.kept is None else self.kept[i0:i1]
        torch.mm(self.scaled_x(i0, i1), self.y.t(), out=out)
        if self.exclude_marks:
            self.fill_marked(out, i0, i1, float("-inf"))
        return out

    def fill_marked(self, t: torch.Tensor, i0: int, i1: int, value: float) -> None:
        marks = self.spec.marks
        if marks == "diagonal":
            t.diagonal(i0 + self.spec.offset).fill_(value)
        elif marks == "same_label":
            t.masked_fill_(self.label_mask(i0, i1), value)

    def negate_marked(self, t: torch.Tensor, i0: int, i1: int) -> None:
        marks = self.spec.marks
        if marks == "diagonal":
            t.diagonal(i0 + self.spec.offset).neg_()
        elif marks == "same_label":
            t.addcmul_(t, self.label_mask(i0, i1), value=-2)


def _finite_or_zero(t: torch.Tensor) -> torch.Tensor:
    """Statistics of fully excluded rows are −inf; shifting by 0 there keeps exp() at 0."""
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))


def _empty(spec: PairSpec, dtype) -> torch.Tensor:
    return spec.x.new_empty(0, dtype=dtype)


# --------------------------------------------------------------------------- similarity_lse


def similarity_lse_forward(spec: PairSpec, rows: bool, cols: bool):
    """(row_lse (N,), col_lse (M,), row_stats (2, N), col_stats (2, M), logits) over allowed pairs.

    LSEs include the bias; a direction not asked for is empty ((0,) and (2, 0)). The statistics
    are this backend's unrounded record of each row (column) of ``S = s·x·yᵀ``: ``[shift, sum]``
    with ``shift`` the exact maximum of the S values (0 where every pair is excluded) and
    ``sum = Σ exp(S − shift)``. The backward recomputes S with the same chunk plan, so
    ``exp(S − shift)/sum`` reproduces each probability to fp32 accuracy whatever |S| is — a
    single rounded LSE would shift every exponent by up to |S|·2⁻²⁴ (docs/guarantees.md).

    ``logits``: when ``spec.keeps_logits`` (the N×M compute-dtype matrix fits
    ``spec.logit_budget``), the (N, M) matrix S itself (excluded pairs −inf) — each chunk is
    formed in its rows and the passes below leave it intact, writing their exponentials to the
    workspace — so the backward skips its recompute GEMM; else an empty (0,) tensor.
    """
    dev = spec.x.device
    kept = torch.empty(spec.n, spec.m, dtype=spec.compute_dtype, device=dev) if spec.keeps_logits else None
    ch = ChunkedLogits(spec, exclude_marks=True, kept=kept)
    cdt = ch.cdt
    if rows:
        row_stats = torch.empty((2, spec.n), dtype=cdt, device=dev)
        row_shift, row_total = row_stats[0], row_stats[1]
    if cols:
        col_max = torch.full((spec.m,), float("-inf"), dtype=cdt, device=dev)
        col_sum = torch.zeros(spec.m, dtype=cdt, device=dev)
    for i0, i1 in ch.ranges():
        s = ch.logits(i0, i1)
        if rows:
            row_max = _finite_or_zero(s.amax(dim=1))
            row_shift[i0:i1] = row_max
        if cols:
            new_max = torch.maximum(col_max, s.amax(dim=0))
            shift = _finite_or_zero(new_max)
            col_sum.mul_(col_max.sub_(shift).exp_())
            col_max = new_max
        if rows and cols:
            # Two exponentials with different shifts: one column block at a time in scratch.
            row_sum = row_total[i0:i1].zero_()
            for j0, j1, sb, e in ch.blocks(s):
                row_sum += torch.sub(sb, row_max[:, None], out=e).exp_().sum(dim=1)
                col_sum[j0:j1] += torch.sub(sb, shift[None, j0:j1], out=e).exp_().sum(dim=0)
        elif rows:
            torch.sum(_shifted_exp(ch, s, row_max[:, None]), dim=1, out=row_total[i0:i1])
        else:
            col_sum += _shifted_exp(ch, s, shift[None, :]).sum(dim=0)
    empty_stats = spec.x.new_empty((2, 0), dtype=cdt)
    if rows:
        row = row_total.log().add_(row_shift).add_(ch.bias)
    else:
        row, row_stats = _empty(spec, cdt), empty_stats
    if cols:
        col_stats = torch.stack((_finite_or_zero(col_max), col_sum))
        col = col_sum.log().add_(col_stats[0]).add_(ch.bias)
    else:
        col, col_stats = _empty(spec, cdt), empty_stats
    return row, col, row_stats, col_stats, (_empty(spec, cdt) if kept is None else kept)


def _shifted_exp(ch: ChunkedLogits, s: torch.Tensor, shift) -> torch.Tensor:
    """exp(s − shift): in place on a workspace chunk; into the workspace when ``s`` is a row
    block of kept logits, which must survive."""
    if ch.kept is None:
        return s.sub_(shift).exp_()
    return torch.sub(s, shift, out=ch.buf[: s.shape[0]]).exp_()


def merge_lse_stats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The (2, K) statistics ``[shift, sum]`` of the union of two column sets whose statistics
    are ``a`` and ``b`` (the same rows, e.g. two shards of y): the shift is the larger exact
    maximum (0 where neither has an allowed pair) and each sum is rescaled to it, so the merged
    record is what one pass over both sets would hold up to the order of additions. NaN
    propagates."""
    floor = torch.tensor(float("-inf"), dtype=a.dtype, device=a.device)
    top = torch.maximum(torch.where(a[1] == 0, floor, a[0]), torch.where(b[1] == 0, floor, b[0]))
    shift = _finite_or_zero(top)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    total = (torch.where(a[1] == 0, zero, a[1] * torch.exp(a[0] - shift))
             + torch.where(b[1] == 0, zero, b[1] * torch.exp(b[0] - shift)))
    return torch.stack((shift, total))


def lse_from_stats(stats: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp (without bias) a (2, K) statistics record stands for; −inf where no pair
    was allowed."""
    return stats[1].log() + stats[0]


def _probability_weights(grad: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """``grad / sum`` per row (column): the factor that turns exp(S − shift) into the upstream
    gradient times the probability; 0 where nothing was allowed (sum 0, so 0·exp(−inf) stays 0)."""
    total = stats[1]
    return torch.where(total == 0, torch.zeros((), dtype=total.dtype, device=total.device), grad / total)


def _allowed_grad_sum(grad: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Σ grad over rows (columns) with an allowed pair; NaN/Inf statistics propagate."""
    total = stats[1]
    return torch.where(total == 0, torch.zeros((), dtype=total.dtype, device=total.device),
                       grad + 0 * total).sum()


def similarity_lse_backward(
    spec: PairSpec,
    grad_row: Optional[torch.Tensor],
    grad_col: Optional[torch.Tensor],
    row_stats: torch.Tensor,
    col_stats: torch.Tensor,
    logits: Optional[torch.Tensor],
    needs: tuple[bool, bool, bool, bool],
):
    """Gradients (dx, dy, dscale, dbias) of ⟨grad_row, row_lse⟩ + ⟨grad_col, col_lse⟩, from the
    forward's statistics (``similarity_lse_forward``); every chunk is recomputed exactly as the
    forward computed it (same chunk rows, same GEMM), so ``S − shift`` is exact.

    ``logits``: the forward's kept (N, M) matrix S, or empty. When given, the logit gradient
    G is formed from it chunk by chunk in the workspace (2 GEMMs per chunk instead of 3); it is
    only read — a saved tensor, which a ``retain_graph=True`` backward reads again."""
    kept = _kept_logits(spec, logits)
    ch = ChunkedLogits(spec, exclude_marks=True)
    cdt = ch.cdt
    g = h = None
    if grad_row is not None:
        g = grad_row.to(cdt)
        shift_r, w_r = row_stats[0], _probability_weights(g, row_stats)
    if grad_col is not None:
        h = grad_col.to(cdt)
        shift_c, w_c = col_stats[0], _probability_weights(h, col_stats)
    grads = FeatureGrads(ch, needs)
    for i0, i1 in ch.ranges():
        # G is formed in place on a recomputed chunk, or from kept rows into the workspace.
        s = ch.logits(i0, i1) if kept is None else kept[i0:i1]
        grad = s if kept is None else ch.buf[: i1 - i0]
        if g is not None and h is not None:
            r_c, g_c = shift_r[i0:i1, None], w_r[i0:i1, None]
            for j0, j1, sb, e in ch.blocks(s):
                torch.sub(sb, r_c, out=e).exp_().mul_(g_c)
                torch.sub(sb, shift_c[None, j0:j1], out=grad[:, j0:j1]).exp_().mul_(w_c[None, j0:j1]).add_(e)
        elif g is not None:
            torch.sub(s, shift_r[i0:i1, None], out=grad).exp_().mul_(w_r[i0:i1, None])
        elif h is not None:
            torch.sub(s, shift_c[None, :], out=grad).exp_().mul_(w_c[None, :])
        else:
            grad.zero_()
        grads.add_chunk(i0, i1, grad)
    dbias = None
    if needs[3]:
        # Σ_ij G_ij = Σ_i g_i + Σ_j h_j over rows / columns that have an allowed pair.
        total = torch.zeros((), dtype=cdt, device=spec.x.device)
        if g is not None:
            total = total + _allowed_grad_sum(g, row_stats)
        if h is not None:
            total = total + _allowed_grad_sum(h, col_stats)
        dbias = total
    return grads.finish(dbias)


def _kept_logits(spec: PairSpec, logits: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The kept (N, M) logits a backward was handed, or None when it got an empty tensor."""
    if logits is None or logits.numel() == 0:
        return None
    if tuple(logits.shape) != (spec.n, spec.m) or logits.dtype != spec.compute_dtype:
        raise ValueError(f"similarity_lse backward: kept logits must be ({spec.n}, {spec.m}) "
                         f"{spec.compute_dtype}, got {tuple(logits.shape)} {logits.dtype}")
    return logits


# --------------------------------------------------------------------------- pairwise_sigmoid


def _softplus(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.float64:
        # exact for the fp64 gradcheck path (aten's threshold drops log1p(e^-20) ≈ 2e-9)
        return torch.logaddexp(t, torch.zeros((), dtype=t.dtype, device=t.device), out=out)
    return torch.ops.aten.softplus.out(t, 1, 20, out=out)


def _signed_logits(ch: ChunkedLogits, i0: int, i1: int) -> torch.Tensor:
    """T = −z·L: the logit for negatives, minus the logit for positives."""
    s = ch.logits(i0, i1)
    s.add_(ch.bias)
    ch.negate_marked(s, i0, i1)
    return s


def pairwise_sigmoid_forward(spec: PairSpec) -> torch.Tensor:
    """Per-row sums Σ_j softplus(−z_ij·L_ij), shape (N,)."""
    ch = ChunkedLogits(spec, exclude_marks=False)
    out = torch.empty(spec.n, dtype=ch.cdt, device=spec.x.device)
    for i0, i1 in ch.ranges():
        t = _signed_logits(ch, i0, i1)
        out[i0:i1] = _softplus(t, t).sum(dim=1)
    return out


def pairwise_sigmoid_backward(spec: PairSpec, grad: torch.Tensor, needs):
    """Gradients (dx, dy, dscale, dbias) of ⟨grad, per-row sums⟩."""
    ch = ChunkedLogits(spec, exclude_marks=False)
    g = grad.to(ch.cdt)
    grads = FeatureGrads(ch, needs)
    dbias = torch.zeros((), dtype=ch.cdt, device=spec.x.device) if needs[3] else None
    for i0, i1 in ch.ranges():
        t = _signed_logits(ch, i0, i1)
        # dσ_i/dL_ij = −z_ij·sigmoid(−z_ij·L_ij): sigmoid(T), negated on positives.
        grad_tile = t.sigmoid_()
        ch.negate_marked(grad_tile, i0, i1)
        grad_tile.mul_(g[i0:i1, None])
        if dbias is not None:
            dbias += grad_tile.sum()
        grads.add_chunk(i0, i1, grad_tile)
    return grads.finish(dbias)


def pairwise_sigmoid_sum(spec: PairSpec, needs):
    """Σ_i σ_i as a 0-d tensor, with its gradients (dx, dy, dscale, dbias) formed in the same
    pass when ``needs`` asks for them: three GEMM-equivalents instead of four.

    The gradients stay in the compute dtype (fp32): they are the unscaled gradients of a sum
    over N·M pairs, which can exceed fp16's range before the upstream gradient scales them.
    """
    ch = ChunkedLogits(spec, exclude_marks=False)
    total = torch.zeros((), dtype=ch.cdt, device=spec.x.device)
    want_grads = any(needs)
    grads = FeatureGrads(ch, needs, keep_compute_dtype=True) if want_grads else None
    dbias = torch.zeros((), dtype=ch.cdt, device=spec.x.device) if needs[3] else None
    for i0, i1 in ch.ranges():
        t = _signed_logits(ch, i0, i1)
        if not want_grads:
            total += _softplus(t, t).sum()
            continue
        # The loss needs softplus(T) and the gradient sigmoid(T): loss per block in scratch,
        # then the block becomes its gradient tile in place.
        for _, _, tb, e in ch.blocks(t):
            total += _softplus(tb, e).sum()
            tb.sigmoid_()
        ch.negate_marked(t, i0, i1)
        if dbias is not None:
            dbias += t.sum()
        grads.add_chunk(i0, i1, t)
    if not want_grads:
        return total, None, None, None, None
    return (total,) + grads.finish(dbias)


# --------------------------------------------------------------------------- shared backward


class FeatureGrads:
    """Accumulates dx, dy and dscale from logit-gradient chunks G (w.r.t. L = s·⟨x,y⟩ + b)."""

    def __init__(self, ch: ChunkedLogits, needs, keep_compute_dtype: bool = False):
        self.ch = ch
        spec = ch.spec
        self.need_x, self.need_y, self.need_scale, self.need_bias = needs
        self.keep_compute_dtype = keep_compute_dtype
        dev = spec.x.device
        dx_dtype = ch.cdt if keep_compute_dtype else spec.x.dtype
        self.dx = torch.empty(spec.x.shape, dtype=dx_dtype, device=dev) if self.need_x else None
        self.dy = torch.zeros(spec.m, spec.x.shape[1], dtype=ch.cdt, device=dev) if self.need_y else None
        self.dscale_rows = (
            torch.empty(spec.n, dtype=ch.cdt, device=dev) if self.need_scale else None
        )

    def add_chunk(self, i0: int, i1: int, grad: torch.Tensor) -> None:
        ch = self.ch
        if self.need_x or self.need_scale:
            # A = G·y (C, D), before the row scale; written straight into dx when dtypes allow.
            in_place = self.need_x and self.dx.dtype == ch.cdt
            a = torch.mm(grad, ch.y, out=self.dx[i0:i1]) if in_place else grad @ ch.y
            if self.need_scale:
                self.dscale_rows[i0:i1] = torch.linalg.vecdot(ch.spec.x[i0:i1].to(ch.cdt), a)
            if self.need_x:
                a.mul_(ch.scale_of(i0, i1))
                if not in_place:
                    self.dx[i0:i1] = a
        if self.need_y:
            self.dy.addmm_(grad.t(), ch.scaled_x(i0, i1))

    def finish(self, dbias):
        spec = self.ch.spec
        dx, dy, dscale = self.dx, self.dy, None
        if self.need_scale:
            dscale = self.dscale_rows if spec.per_row_scale else self.dscale_rows.sum()
        if self.keep_compute_dtype:
            return dx, dy, dscale, dbias
        if dy is not None:
            dy = dy.to(spec.y.dtype)
        if dscale is not None:
            dscale = dscale.to(spec.scale.dtype)
        if dbias is not None and spec.bias is not None:
            dbias = dbias.to(spec.bias.dtype)
        return dx, dy, dscale, dbias
