"""``pairwise_sigmoid``: per-row sums of softplus(−z·L) and their gradients, and the summed
SigLIP path (docs/kernels.md, "pairwise_sigmoid"). All passes are ``owner.py`` kernels
(``OwnerKind.SIGMOID``).

- forward (per-row output): one row-owner pass that only sums softplus — 1 GEMM-equivalent;
- backward with a per-row upstream gradient g: row owner (dx, dscale rows, dbias partials) and
  column owner (dy) — 2 recomputes + 2 GEMMs, or with ``deterministic=False`` one row-owner pass
  adding dy with atomics;
- ``pairwise_sigmoid_sum`` (the SigLIP loss, every row's upstream gradient is the same scalar):
  the row-owner pass computes the loss *and* dx in the forward, then one column-owner pass dy —
  4 GEMM-equivalents deterministic, 3 with ``deterministic=False`` (dy by atomics in the same
  pass), for D within one program's accumulators (each extra D slice adds a recompute per pass,
  see ``owner.py``); without gradients only the loss (1).
The bias gradient is Σ_ij G_ij from per-program partials summed by torch in a fixed order.
"""
from __future__ import annotations

import torch

from .._spec import PairSpec
from ._launch import make_pair
from ._modes import OwnerKind
from .owner import atomic_pays, run_owner


def _finish_scale(spec: PairSpec, rows):
    ds = rows if spec.per_row_scale else rows.sum()
    return ds.to(spec.scale.dtype)


def _finish_bias(spec: PairSpec, total):
    return total.to(spec.bias.dtype) if spec.bias is not None else total


def sigmoid_rows(spec: PairSpec) -> torch.Tensor:
    """(N,) fp32 Σ_j softplus(−z_ij·L_ij)."""
    return run_owner(make_pair(spec, a_is_x=True), OwnerKind.SIGMOID, with_loss=True).loss_rows


def _gradients(spec: PairSpec, needs, upstream, with_loss: bool):
    """Row-owner (+ column-owner) passes; ``upstream`` (N,) fp32 or None for the summed loss."""
    need_x, need_y, need_scale, need_bias = needs
    run_rows = with_loss or need_x or need_scale or (need_bias and not need_y)
    rows_pair = make_pair(spec, a_is_x=True)
    atomic = need_y and (need_x or need_scale) and not spec.deterministic and atomic_pays(rows_pair)
    rows_bias = need_bias and run_rows
    dx = dy = dscale = dbias = loss = None
    if run_rows:
        res = run_owner(rows_pair, OwnerKind.SIGMOID, a_grad=upstream, store_out=need_x,
                        need_dscale=need_scale, atomic_b=atomic, with_loss=with_loss,
                        need_dbias=rows_bias)
        dx, loss = res.out, res.loss_rows
        if need_scale:
            dscale = _finish_scale(spec, res.dscale_rows)
        if rows_bias:
            dbias = _finish_bias(spec, res.dbias)
        if atomic:
            dy = res.out_b.to(spec.y.dtype)
    if need_y and not atomic:
        res = run_owner(make_pair(spec, a_is_x=False), OwnerKind.SIGMOID, b_grad=upstream, store_out=True,
                        need_dbias=need_bias and not rows_bias)
        dy = res.out
        if need_bias and not rows_bias:
            dbias = _finish_bias(spec, res.dbias)
    return loss, dx, dy, dscale, dbias


def sigmoid_gradients(spec: PairSpec, grad: torch.Tensor, needs):
    """(dx, dy, dscale, dbias) of ⟨grad, per-row sums⟩."""
    upstream = grad.detach().to(torch.float32).contiguous()
    _, dx, dy, dscale, dbias = _gradients(spec, needs, upstream, with_loss=False)
    return dx, dy, dscale, dbias


def sigmoid_sum(spec: PairSpec, needs):
    """(Σ_i σ_i as a 0-d fp32 tensor, dx, dy, dscale, dbias) with the gradients of the total
    formed in the same passes; None for gradients not asked."""
    loss, dx, dy, dscale, dbias = _gradients(spec, needs, None, with_loss=True)
    return (loss.sum(),) + (dx, dy, dscale, dbias)
