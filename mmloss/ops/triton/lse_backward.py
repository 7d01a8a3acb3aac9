"""``similarity_lse`` backward from the forward's saved statistics (docs/kernels.md, "Backward").

``dL/dL_ij = g_i·exp(L_ij − r_i) + h_j·exp(L_ij − c_j)`` on allowed pairs, formed in log2 units
as ``g_i·2^((t2_ij − m2_i) − lg2_i) + h_j·2^((t2_ij − m2_j) − lg2_j)`` from the (2, ·) fp32
statistics ``[max, log-sum]`` of ``lse_forward`` and tiles recomputed bit for bit as the forward
formed them (``owner.py``): exact exponents at any logit magnitude. Default
(deterministic): the row-owner pass writes dx (and the scale-gradient rows ⟨x_i, (G·y)_i⟩), the
column-owner pass writes dy; no atomics, every gradient written once — 2 recomputes + 2 gradient
GEMMs (more recomputes when D is sliced, see ``owner.py``). ``deterministic=False`` with both dx
and dy wanted: one row-owner pass that adds dy with fp32 atomics — 1 recompute + 2 GEMMs.
The bias gradient needs no kernel: Σ_ij G_ij = Σ_i g_i + Σ_j h_j over the rows / columns that
have an allowed pair (finite LSE); a row or column whose LSE is NaN or +inf adds NaN (its
probabilities are NaN, as in torch).
"""
from __future__ import annotations

import torch

from .._spec import PairSpec
from ._launch import fp32_vector, make_pair, weighted_shifts, zeros_if_missing
from ._modes import LseStat, OwnerKind
from .owner import atomic_pays, run_owner


def _bias_weights(stats: torch.Tensor) -> torch.Tensor:
    """Σ_j of a row's probabilities: 0 with no allowed pair (log-sum −inf), 1 for a finite LSE,
    NaN for a NaN or +inf one (torch's softmax of such a row is NaN)."""
    lse2 = stats[LseStat.MAX] + stats[LseStat.LOG_SUM]
    empty = stats[LseStat.LOG_SUM] == float("-inf")
    return torch.where(empty, 0.0, torch.where(torch.isfinite(lse2), 1.0, float("nan")))


def lse_gradients(spec: PairSpec, grad_row, grad_col, row_stats, col_stats, needs):
    """(dx, dy, dscale, dbias) of ⟨grad_row, row LSE⟩ + ⟨grad_col, col LSE⟩ from the (2, N) /
    (2, M) statistics of ``lse_statistics``; None where ``needs`` is False."""
    need_x, need_y, need_scale, need_bias = needs
    g, h = fp32_vector(grad_row), fp32_vector(grad_col)
    # (2, n) [max, log-sum] rows the kernels read with one row stride
    r = fp32_vector(row_stats) if g is not None else None
    c = fp32_vector(col_stats) if h is not None else None
    # NaN/±inf bias → NaN gradients (the statistics leave the bias out)
    poison = None if spec.bias is None else spec.bias.detach().to(torch.float32) * 0.0
    wr = weighted_shifts(r, g, poison) if g is not None else None
    wc = weighted_shifts(c, h, poison) if h is not None else None
    dx = dy = dscale = dbias = None
    if g is not None or h is not None:
        run_rows = need_x or need_scale
        rows_pair = make_pair(spec, a_is_x=True)
        atomic = run_rows and need_y and not spec.deterministic and atomic_pays(rows_pair)
        if run_rows:
            res = run_owner(rows_pair, OwnerKind.LSE, a_grad=g, a_stat=wr, b_grad=h, b_stat=wc,
                            store_out=need_x, need_dscale=need_scale, atomic_b=atomic)
            dx = res.out
            if need_scale:
                dscale = res.dscale_rows if spec.per_row_scale else res.dscale_rows.sum()
            if atomic:
                dy = res.out_b.to(spec.y.dtype)
        if need_y and not atomic:
            dy = run_owner(make_pair(spec, a_is_x=False), OwnerKind.LSE, a_grad=h, a_stat=wc, b_grad=g, b_stat=wr,
                           store_out=True).out
    dx, dy = zeros_if_missing(dx, need_x, spec.x), zeros_if_missing(dy, need_y, spec.y)
    if need_scale:
        if dscale is None:
            dscale = torch.zeros(spec.scale.shape, dtype=torch.float32, device=spec.x.device)
        dscale = dscale.to(spec.scale.dtype)
    if need_bias:
        total = torch.zeros((), dtype=torch.float32, device=spec.x.device)
        if g is not None:
            total = total + (g * _bias_weights(r)).sum()
        if h is not None:
            total = total + (h * _bias_weights(c)).sum()
        if spec.bias is not None:
            total = total + (spec.bias.detach().to(torch.float32) * 0.0)  # NaN/±inf bias → NaN, as torch
        dbias = total.to(spec.bias.dtype) if spec.bias is not None else total
    return dx, dy, dscale, dbias
