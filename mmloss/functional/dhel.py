"""Decoupled hyperspherical energy loss (docs/losses.md §7): the positive against uniformity
within each view only (no cross-view negatives), from the ``ssl_common.Views`` within-view blocks.

The multi-view form (MV-DHEL) is in ``multiview``, beside MV-InfoNCE, whose view handling it shares.
"""
from __future__ import annotations

import torch

from .. import _validation as V
from .._device import no_autocast
from .ssl_common import check_temperature, prepare_two_views
from .ssl_gather import min_local_rows, open_exchange, resolve_distributed, views_of

Tensor = torch.Tensor


def dhel_loss(out0: Tensor, out1: Tensor, temperature: float = 0.3, include_augs: bool = True, *,
              backend: str = "auto", check_finite: bool = False, distributed=None, group=None,
              uniform_shards: bool = False) -> Tensor:
    """Decoupled hyperspherical energy loss (docs/losses.md §7; Koromilas et al. 2024).

    ``L = mean_i [LSE_{j≠i} ⟨u_i,u_j⟩/τ − ⟨u_i,v_i⟩/τ]`` plus, with ``include_augs`` (default True,
    the authors' code), ``mean_i LSE_{j≠i} ⟨v_i,v_j⟩/τ``. out0 = u, out1 = v: (N, D), N ≥ 2,
    L2-normalised inside; τ default 0.3. ``check_finite=True`` raises a ValueError naming an
    input holding NaN/Inf (default: they propagate). Primitives: the within-view blocks only (one
    or two N×N calls). Memory O(N·D) plus one block's workspace.

    ``distributed`` (None | "auto" | "gather"; "ring" raises: DHEL has no ring form), ``group``,
    ``uniform_shards``: as ``ntxent_loss``. Gathered, this rank's rows run against the unit rows
    of every rank (both views gathered in one collective; a rank may hold one row, the global
    batch needs N ≥ 2): the value is the global loss on every rank, the gradient W × this
    rank's share (``mmloss.distributed``). Memory: the gathered 2·N_global·D unit rows plus
    one N_local×N_global block's workspace.
    """
    mode = resolve_distributed("dhel_loss", distributed, group, uniform_shards)
    x0, x1 = prepare_two_views(out0, out1, min_local_rows(mode, 2), "dhel_loss", check_finite)
    tau = check_temperature("temperature", temperature, V.compute_dtype(x0))
    V.check_bool("include_augs", include_augs)
    comm = open_exchange("dhel_loss", mode, group, uniform_shards, 2, out0=x0)
    with no_autocast(x0.device):
        views = views_of([x0, x1], tau, comm, "out0")
        positive = views.positive(0, 1)
        terms = views.within(0, 1.0, backend) - positive
        if include_augs:
            terms = terms + views.within(1, 1.0, backend)
        return views.reduce(terms, "mean")


__all__ = ["dhel_loss"]
