"""Shared plumbing of the loss modules: backend choice and the distributed guard."""
from __future__ import annotations

import torch

from .. import distributed as D
from ..ops._backends import _CHOICES


class LossModule(torch.nn.Module):
    """Holds ``backend`` and the ``distributed``/``group`` options; no math lives here."""

    def __init__(self, *, backend: str = "auto", distributed="auto", group=None, world_size: int = 1):
        super().__init__()
        if backend not in _CHOICES:
            raise ValueError(f"backend must be one of {list(_CHOICES)}, got {backend!r}")
        D.check_mode(distributed)
        self.backend = backend
        self.distributed = distributed
        self.group = group
        self.world_size = int(world_size)

    def _require_local(self) -> None:
        D.require_local(type(self).__name__, self.distributed, self.group, self.world_size)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
