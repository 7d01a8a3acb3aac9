"""Single-process model of the ring (mmloss/ring.py) for one backend: the candidates y split into
shards, each block (x, y_k) run through the primitive's forward op for statistics only, the
statistics merged in the backend's units, then the backward op called per block with the final
statistics. Compared with one similarity_lse call on the whole y (values and gradients), so the
merge and the "backward from given statistics" entry point are tested without processes."""
from __future__ import annotations

import torch

from mmloss.ops import similarity_lse
from mmloss.ops._primitives import SIMILARITY_LSE


def ring_blocks(x, y, scale, bias, shard_rows, backend, *, exclude="diagonal", grad_row=None, grad_col=None):
    """(row LSE, col LSE, dx, dy, dscale, dbias) of x against y cut into ``shard_rows`` pieces."""
    module = SIMILARITY_LSE.backend_module(backend)
    offsets = [sum(shard_rows[:k]) for k in range(len(shard_rows))]
    shards = list(torch.split(y, list(shard_rows)))
    args = dict(scale=scale, scale_value=0.0, bias=bias, bias_value=0.0, exclude=exclude, x_labels=None,
                y_labels=None, rows=True, cols=True, backend=backend, chunk_size=0, deterministic=True,
                logit_budget=0)
    row_stats, col_stats = None, []
    for y_k, off in zip(shards, offsets):
        _, _, rs, cs, _ = SIMILARITY_LSE(x=x, y=y_k, offset=-off, **args)
        row_stats = rs if row_stats is None else module.merge_lse_stats(row_stats, rs)
        col_stats.append(cs)
    row = module.lse_from_stats(row_stats) + bias
    col = torch.cat([module.lse_from_stats(cs) for cs in col_stats]) + bias
    grads = [None, [], None, None]
    for y_k, off, cs, g_col in zip(shards, offsets, col_stats, torch.split(grad_col, list(shard_rows))):
        dx, dy, ds, db = SIMILARITY_LSE.run_backward(
            grad_row, g_col, x, y_k, scale, 0.0, bias, 0.0, exclude, -off, None, None, True, True, backend, 0,
            True, 0, row_stats, cs, row_stats.new_empty(0), True, True, True, False)
        grads[0] = dx if grads[0] is None else grads[0] + dx
        grads[1].append(dy)
        grads[2] = ds if grads[2] is None else grads[2] + ds
    # As the ring does: the bias gradient of an LSE is Σ upstream over rows (columns) with an
    # allowed pair, formed once from the final statistics (a block's own dbias is not additive).
    dbias = sum(torch.where(lse == float("-inf"), 0.0, g).sum() for g, lse in ((grad_row, row), (grad_col, col)))
    return row, col, grads[0], torch.cat(grads[1]), grads[2], dbias


def whole(x, y, scale, bias, backend, *, exclude="diagonal", grad_row=None, grad_col=None):
    """The same quantities from one similarity_lse call and autograd."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, y, scale, bias)]
    row, col = similarity_lse(*leaves, exclude=exclude, backend=backend)
    torch.autograd.backward([row, col], [grad_row, grad_col])
    return (row.detach(), col.detach(), *(t.grad for t in leaves))


def check_ring_blocks(x, y, scale, bias, shard_rows, backend, rtol, atol):
    g = torch.Generator().manual_seed(5)
    grad_row = torch.rand(x.shape[0], generator=g, dtype=x.dtype).to(torch.float64 if x.dtype == torch.float64
                                                                       else torch.float32)
    grad_col = torch.rand(y.shape[0], generator=g, dtype=grad_row.dtype)
    got = ring_blocks(x, y, scale, bias, shard_rows, backend, grad_row=grad_row, grad_col=grad_col)
    want = whole(x, y, scale, bias, backend, grad_row=grad_row, grad_col=grad_col)
    names = ("row LSE", "col LSE", "dx", "dy", "dscale", "dbias")
    for name, a, e in zip(names, got, want):
        torch.testing.assert_close(a.to(e.dtype), e, rtol=rtol, atol=atol, msg=lambda m: f"{backend} {name}: {m}")
