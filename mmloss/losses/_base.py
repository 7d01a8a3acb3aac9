"""Shared plumbing of the loss modules: backend choice and the distributed guard."""
from __future__ import annotations

import torch

from .. import _validation as V
from .. import distributed as D
from ..ops._backends import _CHOICES


class LossModule(torch.nn.Module):
    """Holds ``backend``, ``check_finite`` and the ``distributed``/``group`` options; no math
    lives here. ``check_finite=True`` makes ``forward`` raise a ValueError naming any input
    tensor that holds NaN/Inf (by default they propagate, as in torch; a host sync on GPUs)."""

    def __init__(self, *, backend: str = "auto", distributed="auto", group=None, world_size: int = 1,
                 check_finite: bool = False):
        super().__init__()
        V.check_choice("backend", backend, _CHOICES)  # TypeError / ValueError, as the functions
        D.check_mode(distributed)
        self.backend = backend
        self.distributed = distributed
        self.group = group
        self.world_size = int(world_size)
        self.check_finite = V.check_bool("check_finite", check_finite)

    def _require_local(self) -> None:
        D.require_local(type(self).__name__, self.distributed, self.group, self.world_size)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
