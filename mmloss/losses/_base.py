"""Shared plumbing of the loss modules: backend choice and the distributed options."""
from __future__ import annotations

import torch

from .. import _validation as V
from .. import distributed as D
from ..ops import BACKEND_CHOICES


class LossModule(torch.nn.Module):
    """Holds ``backend``, ``check_finite`` and the ``distributed``/``group``/``uniform_shards``
    options; no math lives here. ``check_finite=True`` makes ``forward`` raise a ValueError
    naming any input tensor that holds NaN/Inf (by default they propagate, as in torch; a host
    sync on GPUs). ``world_size`` is open_clip's constructor argument: the process group's actual
    size wins, a different value other than 1 raises (see ``mmloss.distributed.resolve_mode``)."""

    def __init__(self, *, backend: str = "auto", distributed="auto", group=None, world_size: int = 1,
                 check_finite: bool = False, uniform_shards: bool = False):
        super().__init__()
        V.check_choice("backend", backend, BACKEND_CHOICES)  # TypeError / ValueError, as the functions
        D.check_mode(distributed)
        self.backend = backend
        self.distributed = distributed
        self.group = group
        self.world_size = int(world_size)
        self.check_finite = V.check_bool("check_finite", check_finite)
        self.uniform_shards = V.check_bool("uniform_shards", uniform_shards)

    def _require_local(self) -> None:
        """For modules whose loss has no distributed form yet: never a silent rank-local loss."""
        D.require_local(type(self).__name__, self.distributed, self.group, self.world_size)

    def _resolve_distributed(self):
        """None (compute locally) or "gather"; raises for "ring" and inconsistent setups. Under
        "auto" this reads the process group, so every rank of the group must call forward."""
        return D.resolve_mode(type(self).__name__, self.distributed, self.group, self.world_size)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
