"""torch.distributed integration of the losses.

Cross-rank gathering and the ring exchange are not implemented yet. Until they are, a loss that
would have to gather (``distributed="auto"`` under an initialised process group of world size
> 1, a module built with ``world_size > 1``, or an explicit "gather"/"ring") raises a clear
``RuntimeError`` rather than silently computing a rank-local loss. ``distributed=None`` always
computes the local loss.
"""
from __future__ import annotations

from typing import Optional

import torch

MODES = ("auto", "gather", "ring", None)


def check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {list(MODES)}, got {mode!r}")


def world_size(group=None) -> int:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def require_local(loss_name: str, mode: Optional[str], group=None, configured_world_size: int = 1) -> None:
    """Raise unless this call may compute a rank-local loss."""
    check_mode(mode)
    if mode is None:
        return
    if mode in ("gather", "ring"):
        raise RuntimeError(
            f"{loss_name}: distributed={mode!r} is not supported yet by mmloss; "
            "pass distributed=None to compute the rank-local loss"
        )
    size = max(world_size(group), configured_world_size)
    if size > 1:
        raise RuntimeError(
            f"{loss_name}: running with world size {size} but mmloss cannot gather across ranks "
            "yet; the result would silently be a rank-local loss. Pass distributed=None to "
            "accept the local loss explicitly."
        )
