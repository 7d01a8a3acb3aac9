"""§9 Symile module (docs/losses.md); the math is ``mmloss.functional.symile_loss``."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from ..functional.symile import SYMILE_SAMPLING, symile_loss
from ._base import LossModule

__all__ = ["SymileLoss"]


class SymileLoss(LossModule):
    """Symile loss of K ≥ 2 modalities (docs/losses.md §9); see ``mmloss.functional.symile_loss``.

    ``SymileLoss(negative_sampling="n", *, reduction="mean", check_finite=False, distributed=None,
    group=None, uniform_shards=False, backend="auto")``
    ``.forward(representations (list of K (N, D)), logit_scale, generator=None)``.
    Stateless. Rank-local by default; ``distributed="auto"`` / ``"gather"`` compute the global
    batch's loss across the process group (both samplings; "n" uses the group's first rank's
    permutations), "ring" raises (no ring form).
    """

    def __init__(self, negative_sampling: str = "n", *, reduction: str = "mean", check_finite: bool = False,
                 distributed=None, group=None, uniform_shards: bool = False, backend: str = "auto"):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite,
                         uniform_shards=uniform_shards)
        self.negative_sampling = V.check_choice("negative_sampling", negative_sampling, SYMILE_SAMPLING)
        self.reduction = V.check_reduction(reduction)

    def forward(self, representations, logit_scale, generator: Optional[torch.Generator] = None):
        """Symile loss of K ≥ 2 modalities (docs/losses.md §9).

        Args:
            representations: a list or tuple of K (N, D) tensors or one (K, N, D) tensor, as given.
            logit_scale: the exponentiated scale, a positive float or 0-d tensor.
            generator: None or a torch.Generator (CPU or the inputs' device) for "n" sampling.

        Returns:
            The loss, fp32 (fp64 for fp64 inputs): 0-d, or (N,) with ``reduction="none"``. Rank-local
                by default; "auto"/"gather" (a collective call) the global batch's loss on every rank.
        """
        return symile_loss(representations, logit_scale, self.negative_sampling, generator,
                           reduction=self.reduction, check_finite=self.check_finite, backend=self.backend,
                           distributed=self.distributed, group=self.group, uniform_shards=self.uniform_shards)

    def extra_repr(self) -> str:
        return f"negative_sampling={self.negative_sampling!r}, " + super().extra_repr()
