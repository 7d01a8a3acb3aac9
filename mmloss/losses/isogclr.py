"""§11 ISogCLRLoss module (docs/losses.md): iSogCLR's per-sample state as buffers; the math is
``mmloss.functional.isogclr_loss``."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from ..functional.isogclr import ISOGCLR_DEFAULTS, ISOGCLR_FORMS, ISOGCLR_MODES, isogclr_hyperparameters, isogclr_loss
from ._base import LossModule

__all__ = ["ISogCLRLoss"]


class ISogCLRLoss(LossModule):
    """iSogCLR with per-sample temperatures (docs/losses.md §11), LibAUC's GCLoss_v1 / GCLoss_v2 with
    ``enable_isogclr=True``; see ``mmloss.functional.isogclr_loss`` for the algorithm.

    ``ISogCLRLoss(dataset_size, mode="unimodal", *, tau_init=None, tau_min=None, tau_max=None,
    rho=None, gamma=0.9, beta=0.9, eta=0.01, form="libauc", update_state_in_eval=False,
    check_finite=False, state_dtype=torch.float32, distributed=None, backend="auto")``;
    None takes LibAUC's default for the mode (unimodal: τ_init 0.1, τ ∈ [0.05, 0.7], ρ 0.3;
    bimodal: τ_init 0.01, τ ∈ [0.005, 0.05], ρ 6.0).

    Buffers (saved in ``state_dict``; ``sides`` = 1 unimodal, 2 bimodal (image, text)):
    ``log_u`` (dataset_size, sides), ``tau`` (dataset_size, sides), ``tau_momentum``
    (dataset_size, sides), ``seen`` (dataset_size,) bool, ``running_max`` (dataset_size, sides):
    LibAUC's b, used by the bimodal "libauc" form. Memory: (4·sides + 1)·dataset_size values.

    State rules:
    - The state changes only in training mode (torch's convention for running statistics):
      under ``.eval()`` forward returns the same loss and objective but writes nothing, unless
      the module was built with ``update_state_in_eval=True`` (LibAUC's losses have no modes
      and always update).
    - The floating state is kept in ``state_dtype`` (float32, or float64 for exact fp64
      comparisons) whatever the module is cast to: ``.half()``, ``.bfloat16()``, ``.double()``
      and ``.to(dtype)`` leave it alone, device moves (``.to(device)``, ``.cuda()``) move it.
      It survives ``state_dict`` / ``load_state_dict`` and ``copy.deepcopy``.
    - Index validation and the refusal of non-finite updates happen before any write (see
      ``isogclr_loss``, "State writes"): a failing step leaves the state unchanged.

    ``check_finite=True`` makes forward raise ValueError naming the features that hold NaN or
    Inf (a host synchronisation on GPUs; skipped while compiling).

    Distributed: no distributed form in mmloss yet. ``distributed="gather"`` / ``"ring"``, or
    ``"auto"`` under a process group of world size > 1, make forward raise a RuntimeError before
    the state is touched (never a silent rank-local loss); ``distributed=None`` (the default)
    computes the rank-local loss and updates the state of this rank's indices only.

    ``forward(features_a (N, D), features_b (N, D), index (N,))`` returns the surrogate loss and
    stores the detached logged objective in ``self.objective``.
    """

    _STATE = ("log_u", "tau", "tau_momentum", "running_max")

    def __init__(self, dataset_size: int, mode: str = "unimodal", *, tau_init: Optional[float] = None,
                 tau_min: Optional[float] = None, tau_max: Optional[float] = None, rho: Optional[float] = None,
                 gamma: float = 0.9, beta: float = 0.9, eta: float = 0.01, form: str = "libauc",
                 update_state_in_eval: bool = False, check_finite: bool = False,
                 state_dtype: torch.dtype = torch.float32, distributed=None, group=None, backend: str = "auto"):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite)
        dataset_size = V.check_int("dataset_size", dataset_size)
        if dataset_size < 1:
            raise ValueError(f"dataset_size must be ≥ 1, got {dataset_size}")
        self.mode = V.check_choice("mode", mode, ISOGCLR_MODES)
        self.form = V.check_choice("form", form, ISOGCLR_FORMS)
        self.update_state_in_eval = V.check_bool("update_state_in_eval", update_state_in_eval)
        if state_dtype not in (torch.float32, torch.float64):
            raise TypeError(f"state_dtype must be torch.float32 or torch.float64, got {state_dtype!r}")
        (self.rho, self.gamma, self.beta, self.eta, self.tau_min, self.tau_max) = isogclr_hyperparameters(
            mode, rho=rho, gamma=gamma, beta=beta, eta=eta, tau_min=tau_min, tau_max=tau_max)
        tau_init = ISOGCLR_DEFAULTS[mode]["tau_init"] if tau_init is None else tau_init
        V.check_scalar("tau_init", tau_init, positive=True, dtype=state_dtype, reciprocal=True)
        V.check_scalar("tau_min", self.tau_min, positive=True, dtype=state_dtype, reciprocal=True)
        self.tau_init = float(tau_init)
        sides = 2 if mode == "bimodal" else 1
        self.register_buffer("log_u", torch.zeros(dataset_size, sides, dtype=state_dtype))
        self.register_buffer("tau", torch.full((dataset_size, sides), self.tau_init, dtype=state_dtype))
        self.register_buffer("tau_momentum", torch.zeros(dataset_size, sides, dtype=state_dtype))
        self.register_buffer("seen", torch.zeros(dataset_size, dtype=torch.bool))
        self.register_buffer("running_max", torch.zeros(dataset_size, sides, dtype=state_dtype))
        self.objective: Optional[torch.Tensor] = None

    @property
    def dataset_size(self) -> int:
        return self.seen.shape[0]

    @property
    def state_dtype(self) -> torch.dtype:
        return self.log_u.dtype

    def _apply(self, fn, recurse=True):
        """Module casts keep the state's dtype; every other conversion (device moves, sharing)
        applies as usual. A cast would round τ and log u (fp16 cannot hold log u at large
        logits) and a round trip through a lower precision would not restore them."""
        held = {}
        for name in self._STATE:
            state = self._buffers[name]
            probe = fn(torch.empty(0, dtype=state.dtype, device=state.device))
            if probe.dtype != state.dtype:
                held[name] = state.to(device=probe.device)
                self._buffers[name] = None  # skipped by Module._apply
        try:
            return super()._apply(fn, recurse)
        finally:
            self._buffers.update(held)

    def forward(self, features_a: torch.Tensor, features_b: torch.Tensor, index: torch.Tensor):
        """One iSogCLR step (docs/losses.md §11); updates the state in training (or ``update_state_in_eval``).

        Args:
            features_a, features_b: (N, D) each, N ≥ 2: two views (unimodal) or images and texts
                (bimodal), used as given (LibAUC normalises inside: normalise first for parity).
            index: (N,) integer dataset indices of the rows, in [0, dataset_size).

        Returns:
            The 0-d surrogate loss (LibAUC's value and gradient); the detached logged objective goes
                to ``self.objective``. No distributed form: a mode other than None under a process
                group raises a RuntimeError before the state is touched.
        """
        self._require_local()
        loss, self.objective = isogclr_loss(
            features_a, features_b, index, self.log_u, self.tau, self.tau_momentum, self.seen,
            running_max=self.running_max, mode=self.mode, rho=self.rho, gamma=self.gamma,
            beta=self.beta, eta=self.eta, tau_min=self.tau_min, tau_max=self.tau_max, form=self.form,
            update_state=self.training or self.update_state_in_eval, check_finite=self.check_finite,
            backend=self.backend,
        )
        return loss

    def extra_repr(self) -> str:
        return (f"dataset_size={self.dataset_size}, mode={self.mode!r}, form={self.form!r}, "
                + super().extra_repr())
