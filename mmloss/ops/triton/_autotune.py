"""Kernel launches through the tile table, or through Triton's autotuner when
``MMLOSS_TRITON_AUTOTUNE=1`` (never under the interpreter) and the launch is not deterministic.

The autotuner only re-picks ``BLOCK_B``, ``num_warps`` and ``num_stages``
(``_config.AUTOTUNE_CANDIDATES``): the owned block, the output chunks and the column splits shape
the grid and the workspaces, and ``BLOCK_K`` fixes the order in which a logit tile sums D (the
backward must reproduce the forward's tiles bit for bit), so they stay as the table sets them. Every tuned kernel is
idempotent (partials are overwritten, not accumulated) except the atomic owner variant, whose
fp32 atomic target is reset to zero between trials.

Determinism (issue 11): the autotuner picks whichever candidate timed fastest in *this*
process, so two processes may pick different candidates. A different ``BLOCK_B`` changes the
order in which the online statistics and the owner accumulators sum over the streamed rows, and
a different ``num_warps`` changes the MMA layout and the reductions over it: results may differ
in the last bits. No candidate set can be proven bit-identical to the table without a GPU, so in
the default deterministic mode autotuning is OFF: ``launch(..., deterministic=True)`` (the
default) always uses the table's tiles, whatever ``MMLOSS_TRITON_AUTOTUNE`` says. The autotuner
runs only for launches that are non-deterministic anyway: a caller passing
``deterministic=False`` (``spec.deterministic``), or the atomic owner variant (``ATOMIC_B``,
which only runs with ``deterministic=False`` and whose fp32 atomics already sum in run-dependent
order). ``uses_autotuner`` is the decision.
"""
from __future__ import annotations

import triton

from .. import _traffic
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
    if not _traffic.launches_enabled():  # counting on meta tensors (mmloss.bench --model)
        return
    kernel[grid](**kwargs, num_warps=num_warps)


def uses_autotuner(kind: str, kwargs: dict, deterministic: bool = True) -> bool:
    """Whether a launch of ``kind`` goes through Triton's autotuner: ``MMLOSS_TRITON_AUTOTUNE=1``
    (not under the interpreter), a kind with candidates, and a non-deterministic launch
    (``deterministic=False``, or the atomic owner variant, ``ATOMIC_B``). Deterministic launches
    always take the table's tiles, so results never depend on which candidate a process timed
    fastest (module docstring)."""
    if not autotuning() or kind not in AUTOTUNE_CANDIDATES:
        return False
    return not deterministic or bool(kwargs.get("ATOMIC_B", False))


def launch(kernel, kind: str, t: Tiles, grid, kwargs: dict, atomic_target: str = "",
           deterministic: bool = True) -> None:
    """``kernel[grid](**kwargs)`` with the table's tiles, or autotuned ones (``uses_autotuner``)."""
    if not _traffic.launches_enabled():  # counting on meta tensors (mmloss.bench --model)
        return
    if uses_autotuner(kind, kwargs, deterministic):
        _tuned(kernel, kind, atomic_target)[grid](**kwargs, BLOCK_K=t.block_k)
        return
    kernel[grid](**kwargs, BLOCK_B=t.block_b, BLOCK_K=t.block_k, num_warps=t.num_warps,
                 num_stages=t.num_stages)
