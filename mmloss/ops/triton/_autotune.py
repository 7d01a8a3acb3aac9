"""Kernel launches through the tile table, or through Triton's autotuner when
``MMLOSS_TRITON_AUTOTUNE=1`` (never under the interpreter).

The autotuner only re-picks ``BLOCK_B``, ``num_warps`` and ``num_stages``
(``_config.AUTOTUNE_CANDIDATES``): the owned block, the output chunks and the column splits shape
the grid and the workspaces, and ``BLOCK_K`` fixes the order in which a logit tile sums D (the
backward must reproduce the forward's tiles bit for bit), so they stay as the table sets them. Every tuned kernel is
idempotent (partials are overwritten, not accumulated) except the atomic owner variant, whose
fp32 atomic target is reset to zero between trials.
"""
from __future__ import annotations

import triton

from ._config import AUTOTUNE_CANDIDATES, Tiles, autotuning

_TUNED: dict = {}
TUNED_PARAMS = ("BLOCK_B",)


def _tuned(kernel, kind: str, atomic_target):
    key = (kernel, kind, atomic_target)
    if key not in _TUNED:
        names = [p.name for p in kernel.params if p.is_constexpr and p.name not in TUNED_PARAMS]
        configs = [
            triton.Config({"BLOCK_B": b}, num_warps=w, num_stages=s)
            for b, w, s in AUTOTUNE_CANDIDATES[kind]
        ]
        _TUNED[key] = triton.autotune(
            configs=configs, key=["n_a", "n_b", "dim"] + names,
            reset_to_zero=[atomic_target] if atomic_target else None,
        )(kernel)
    return _TUNED[key]


def launch_fixed(kernel, grid, kwargs: dict, num_warps: int) -> None:
    """A launch with no tunable tiles (the partial-statistics combine)."""
    kernel[grid](**kwargs, num_warps=num_warps)


def launch(kernel, kind: str, t: Tiles, grid, kwargs: dict, atomic_target: str = "") -> None:
    """``kernel[grid](**kwargs)`` with the table's tiles, or autotuned ones."""
    if autotuning() and kind in AUTOTUNE_CANDIDATES:
        _tuned(kernel, kind, atomic_target)[grid](**kwargs, BLOCK_K=t.block_k)
        return
    kernel[grid](**kwargs, BLOCK_B=t.block_b, BLOCK_K=t.block_k, num_warps=t.num_warps,
                 num_stages=t.num_stages)
