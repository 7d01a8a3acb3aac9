"""§9 Symile, §10 TCL and §11 iSogCLR modules, and the MemoryQueue of MoCo/TCL keys (docs/losses.md)."""
from __future__ import annotations

import math
import numbers
from typing import Mapping, Optional

import torch

from .. import _validation as V
from ..functional.multimodal import (
    ISOGCLR_DEFAULTS,
    ISOGCLR_FORMS,
    SYMILE_SAMPLING,
    _tcl_weights,
    isogclr_hyperparameters,
    isogclr_loss,
    symile_loss,
    tcl_loss,
)
from ._base import LossModule

__all__ = ["ISogCLRLoss", "MemoryQueue", "SymileLoss", "TripleContrastiveLoss"]


class SymileLoss(LossModule):
    """Symile loss of K ≥ 2 modalities (docs/losses.md §9); see ``mmloss.functional.symile_loss``.

    ``SymileLoss(negative_sampling="n", *, reduction="mean", check_finite=False, distributed=None,
    backend="auto")``
    ``.forward(representations (list of K (N, D)), logit_scale, generator=None)``.
    Stateless.
    """

    def __init__(self, negative_sampling: str = "n", *, reduction: str = "mean", check_finite: bool = False,
                 distributed=None, group=None, backend: str = "auto"):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite)
        self.negative_sampling = V.check_choice("negative_sampling", negative_sampling, SYMILE_SAMPLING)
        self.reduction = V.check_reduction(reduction)

    def forward(self, representations, logit_scale, generator: Optional[torch.Generator] = None):
        self._require_local()
        return symile_loss(representations, logit_scale, self.negative_sampling, generator,
                           reduction=self.reduction, check_finite=self.check_finite, backend=self.backend)

    def extra_repr(self) -> str:
        return f"negative_sampling={self.negative_sampling!r}, " + super().extra_repr()


def _finite_or_refuse(name: str, t: torch.Tensor, refusal: str) -> Optional[torch.Tensor]:
    """Stateful losses never store NaN/Inf (README, "Guarantees"). Eager CPU tensors raise
    ValueError naming ``name`` here and return None; elsewhere (accelerators, compiling) a
    device-side assert is queued (no host synchronisation) and the 0-d "all finite" flag is
    returned for the caller to gate its write on."""
    finite = torch.isfinite(t).all()
    if V.value_checks_enabled(finite):
        if not bool(finite):
            bad = tuple(int(i) for i in (~torch.isfinite(t)).nonzero()[0])
            raise ValueError(f"{name} {tuple(t.shape)} has non-finite entries ({name}[{', '.join(map(str, bad))}] "
                             f"= {float(t[bad])}): {refusal}")
        return None
    torch._assert_async(finite, f"{name} has non-finite entries: {refusal}")
    return finite


class MemoryQueue(torch.nn.Module):
    """FIFO ring buffer of keys (MoCo / ALBEF / TCL negatives), saved in ``state_dict``.

    ``MemoryQueue(size, dim, *, init="random", dtype=torch.float32, device=None, generator=None)``

    Buffers: ``queue`` (size, dim), ``ptr`` (next slot) and ``filled`` (keys written so far,
    capped at size). ``init="random"`` fills the queue with unit-norm Gaussian rows as MoCo and
    TCL do (every slot is a key from the start); ``init="empty"`` starts with no keys. The
    queue follows module casts and moves (``.double()``, ``.half()``, ``.to(...)``), keys held
    by ``enqueue(..., defer=True)`` included: they take the queue's dtype and device when written.

    - ``enqueue(keys, defer=False)``: writes (B, dim) keys (detached, cast to the queue's dtype
      and device) at ``ptr``, wrapping around; B > size keeps the last ``size`` rows. Runs on
      the device without a host synchronisation. ``defer=True`` holds the keys until the next
      read of ``keys``, ``flush()`` or ``state_dict()``: a loss may then score the queue
      without copying it even though its keys are replaced in the same step (the graph keeps a
      view of the buffer; writing into it before backward would be an in-place error).
      Keys with NaN/Inf (after the cast) are refused: ValueError naming ``keys`` for eager CPU
      tensors; elsewhere a device-side assert, and the write is skipped.
    - ``keys``: the current keys, a (detached) view — the whole buffer, or with ``init="empty"``
      the first ``filled`` rows until it is full (one host read of ``filled`` per access).
      Storage order, not age order (losses do not depend on key order).
    - ``keys_with(positives)``: ``cat([positives, keys])``, the key matrix of ``InfoNCELoss``
      (default targets pair query i with key i).
    - ``len(queue)``: the number of keys, deferred ones included (capped at size).
    """

    def __init__(self, size: int, dim: int, *, init: str = "random", dtype: torch.dtype = torch.float32,
                 device=None, generator: Optional[torch.Generator] = None):
        super().__init__()
        size, dim = V.check_int("size", size), V.check_int("dim", dim)
        if size < 1 or dim < 1:
            raise ValueError(f"MemoryQueue needs size ≥ 1 and dim ≥ 1, got size={size}, dim={dim}")
        self.init = V.check_choice("init", init, ("random", "empty"))
        if not isinstance(dtype, torch.dtype) or dtype not in V.FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if init == "random":
            keys = torch.randn(size, dim, generator=generator, dtype=torch.float32)
            keys = torch.nn.functional.normalize(keys, dim=1)
            filled = size
        else:
            keys = torch.zeros(size, dim)
            filled = 0
        self.register_buffer("queue", keys.to(device=device, dtype=dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("filled", torch.full((), filled, dtype=torch.long, device=device))
        # (keys, "all finite" flag or None) held by enqueue(..., defer=True)
        self._pending: list[tuple[torch.Tensor, Optional[torch.Tensor]]] = []
        self.register_state_dict_pre_hook(_flush_before_saving)
        self.register_load_state_dict_post_hook(_drop_pending_after_loading)

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    @property
    def dim(self) -> int:
        return self.queue.shape[1]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, defer: bool = False) -> None:
        V.check_features("keys", keys, min_rows=0)
        if keys.shape[1] != self.dim:
            raise ValueError(f"keys must have {self.dim} columns like the queue, got shape {tuple(keys.shape)}")
        V.check_bool("defer", defer)
        keys = keys.detach().to(device=self.queue.device, dtype=self.queue.dtype)
        finite = _finite_or_refuse("keys", keys, "MemoryQueue refuses to store them")
        if defer:
            self._pending.append((keys.clone(), finite))
            return
        self.flush()
        self._write(keys, finite)

    @torch.no_grad()
    def flush(self) -> None:
        """Write the keys held by ``enqueue(..., defer=True)``."""
        pending, self._pending = self._pending, []
        for keys, finite in pending:
            self._write(keys, finite)

    def _write(self, keys: torch.Tensor, finite: Optional[torch.Tensor]) -> None:
        """Write ``keys`` at ``ptr``; with a ``finite`` flag (device path) only if it is True."""
        count = keys.shape[0]
        if count == 0:
            return
        if count > self.size:
            keys, count = keys[-self.size:], self.size
        keys = keys.to(device=self.queue.device, dtype=self.queue.dtype)  # the module may have been cast since
        slots = (self.ptr + torch.arange(count, device=self.queue.device)) % self.size
        advance = count
        if finite is not None:
            finite = finite.to(self.queue.device)
            keys = torch.where(finite, keys, self.queue.index_select(0, slots))
            advance = finite.to(torch.long) * count
        self.queue.index_copy_(0, slots, keys)
        self.ptr.add_(advance).remainder_(self.size)
        self.filled.add_(advance).clamp_(max=self.size)

    @property
    def keys(self) -> torch.Tensor:
        self.flush()
        if self.init == "random":
            return self.queue.detach()
        return self.queue.detach()[: int(self.filled)]

    def keys_with(self, positives: torch.Tensor) -> torch.Tensor:
        """``cat([positives, keys])`` in the positives' dtype (a copy of the queue)."""
        V.check_features("positives", positives)
        keys = self.keys
        V.check_same_dim("positives", positives, "queue", keys)
        return torch.cat([positives, keys.to(device=positives.device, dtype=positives.dtype)])

    def forward(self) -> torch.Tensor:
        return self.keys

    def __len__(self) -> int:
        if self.init == "random":
            return self.size
        return min(self.size, int(self.filled) + sum(keys.shape[0] for keys, _ in self._pending))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, init={self.init!r}"


def _flush_before_saving(queue: "MemoryQueue", prefix: str, keep_vars: bool) -> None:
    queue.flush()


def _drop_pending_after_loading(queue: "MemoryQueue", incompatible_keys) -> None:
    queue._pending = []  # deferred keys belonged to the replaced state


class TripleContrastiveLoss(LossModule):
    """TCL's contrastive objective (CMA + IMC + LMI, docs/losses.md §10) with its temperature and queues.

    ``TripleContrastiveLoss(embed_dim=None, queue_size=0, *, alpha=0.4, temperature=0.07,
    temperature_bounds=(0.001, 0.5), learn_temperature=True, weights=None,
    update_state_in_eval=False, check_finite=False, distributed=None, backend="auto")``

    - ``temperature`` is a parameter (shared by every term), clamped in place to
      ``temperature_bounds`` at the start of each training forward, as TCL does.
    - ``queue_size > 0`` (needs ``embed_dim``) creates ``image_queue`` / ``text_queue``
      (MemoryQueue, random unit-norm init like TCL). Each forward scores the current queues and
      then, in training mode, enqueues this batch's momentum features; the write is deferred to
      the next read, so the queue is never copied (TCL clones it). Under ``torch.compile`` the
      queues are copied and written at once instead. TCL's queue size is 65536.
      Momentum features with NaN/Inf are never enqueued (ValueError naming them on eager CPU
      tensors; a device-side assert and a skipped write elsewhere).
    - State changes only in training mode (torch's convention): under ``.eval()`` forward
      neither clamps the parameter in place (it scores with the clamped value) nor enqueues,
      unless the module was built with ``update_state_in_eval=True`` (TCL's code has no modes).
    - ``weights``: term name → weight (default 1/6 each), see ``mmloss.functional.tcl_loss``.
    - ``check_finite=True``: forward raises ValueError naming the input that holds NaN/Inf (a
      host synchronisation on GPUs; skipped while compiling).

    ``forward(image_features, text_features, image_features_m, text_features_m,
    image_locals_m=None, text_locals_m=None, image_local_mask=None, text_local_mask=None,
    alpha=None, return_terms=False)``: global features (B, D); momentum locals (B, P, D);
    ``alpha`` overrides the constructor's (TCL ramps it up during the first epoch).
    """

    def __init__(self, embed_dim: Optional[int] = None, queue_size: int = 0, *, alpha: float = 0.4,
                 temperature: float = 0.07, temperature_bounds=(0.001, 0.5), learn_temperature: bool = True,
                 weights: Optional[Mapping] = None, update_state_in_eval: bool = False, check_finite: bool = False,
                 distributed=None, group=None, backend: str = "auto"):
        super().__init__(backend=backend, distributed=distributed, group=group, check_finite=check_finite)
        self.alpha = V.check_fraction("alpha", alpha, upper_open=False)
        bounds = tuple(temperature_bounds) if isinstance(temperature_bounds, (tuple, list)) else None
        if bounds is None or len(bounds) != 2 or not all(
                isinstance(b, numbers.Real) and not isinstance(b, bool) for b in bounds):
            raise TypeError(f"temperature_bounds must be a pair of floats, got {temperature_bounds!r}")
        if not 0.0 < bounds[0] <= bounds[1] or not all(map(math.isfinite, bounds)):
            raise ValueError(f"temperature_bounds must satisfy 0 < low ≤ high < inf, got {bounds}")
        # The clamped temperature divides fp32 logits: both bounds and their reciprocals must be
        # finite and nonzero in fp32.
        for b in bounds:
            V.check_scalar("temperature_bounds", float(b), positive=True, dtype=torch.float32, reciprocal=True)
        self.temperature_bounds = (float(bounds[0]), float(bounds[1]))
        V.check_scalar("temperature", temperature, positive=True)
        self.temperature = torch.nn.Parameter(torch.tensor(float(temperature)),
                                              requires_grad=V.check_bool("learn_temperature", learn_temperature))
        self.weights = _tcl_weights(weights)
        self.update_state_in_eval = V.check_bool("update_state_in_eval", update_state_in_eval)
        queue_size = V.check_int("queue_size", queue_size)
        if queue_size < 0:
            raise ValueError(f"queue_size must be ≥ 0, got {queue_size}")
        if queue_size > 0:
            if embed_dim is None:
                raise ValueError("TripleContrastiveLoss with queue_size > 0 needs embed_dim")
            self.image_queue = MemoryQueue(queue_size, embed_dim)
            self.text_queue = MemoryQueue(queue_size, embed_dim)
        else:
            self.image_queue = self.text_queue = None

    def forward(self, image_features, text_features, image_features_m, text_features_m, image_locals_m=None,
                text_locals_m=None, image_local_mask=None, text_local_mask=None, alpha: Optional[float] = None,
                return_terms: bool = False):
        self._require_local()
        update = self.training or self.update_state_in_eval
        if update:
            with torch.no_grad():
                self.temperature.clamp_(*self.temperature_bounds)
            temperature = self.temperature
        else:
            temperature = self.temperature.clamp(*self.temperature_bounds)
        queued = self.image_queue is not None
        # Compiled: score copies of the queues and write this batch's keys at once. Deferred keys
        # live in a Python list whose length dynamo guards on (empty on the first call, one
        # entry afterwards: a recompile), and a copy keeps the saved keys apart from the write.
        compiling = torch.compiler.is_compiling()
        image_queue = text_queue = None
        if queued:
            image_queue, text_queue = self.image_queue.keys, self.text_queue.keys
            if compiling:
                image_queue, text_queue = image_queue.clone(), text_queue.clone()
        out = tcl_loss(
            image_features, text_features, image_features_m, text_features_m, temperature,
            image_queue=image_queue, text_queue=text_queue,
            image_locals_m=image_locals_m, text_locals_m=text_locals_m, image_local_mask=image_local_mask,
            text_local_mask=text_local_mask, alpha=self.alpha if alpha is None else alpha,
            weights=self.weights, return_terms=return_terms, check_finite=self.check_finite, backend=self.backend,
        )
        if queued and update:
            pairs = (("image_features_m", image_features_m, self.image_queue),
                     ("text_features_m", text_features_m, self.text_queue))
            # Both checked before either queue is touched; naming the momentum features (eager
            # CPU) before a queue would refuse its "keys". Off that path each queue gates its own write.
            flags = [_finite_or_refuse(name, feats.detach().to(queue.queue.dtype), "TCL does not enqueue them")
                     for name, feats, queue in pairs]
            for _, feats, queue in pairs:
                if None not in flags:  # device path: one bad side poisons both, so neither queue moves
                    feats = torch.where(flags[0] & flags[1].to(flags[0].device), feats.detach(), float("nan"))
                queue.enqueue(feats, defer=not compiling)
        return out

    def extra_repr(self) -> str:
        size = self.image_queue.size if self.image_queue is not None else 0
        return f"queue_size={size}, alpha={self.alpha}, " + super().extra_repr()


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
        self.mode = V.check_choice("mode", mode, ("unimodal", "bimodal"))
        self.form = V.check_choice("form", form, ISOGCLR_FORMS)
        self.update_state_in_eval = V.check_bool("update_state_in_eval", update_state_in_eval)
        if state_dtype not in (torch.float32, torch.float64):
            raise TypeError(f"state_dtype must be torch.float32 or torch.float64, got {state_dtype!r}")
        bimodal = mode == "bimodal"
        (self.rho, self.gamma, self.beta, self.eta, self.tau_min, self.tau_max) = isogclr_hyperparameters(
            bimodal, rho=rho, gamma=gamma, beta=beta, eta=eta, tau_min=tau_min, tau_max=tau_max)
        tau_init = ISOGCLR_DEFAULTS[bimodal]["tau_init"] if tau_init is None else tau_init
        V.check_scalar("tau_init", tau_init, positive=True, dtype=state_dtype, reciprocal=True)
        V.check_scalar("tau_min", self.tau_min, positive=True, dtype=state_dtype, reciprocal=True)
        self.tau_init = float(tau_init)
        sides = 2 if bimodal else 1
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
        self._require_local()
        loss, self.objective = isogclr_loss(
            features_a, features_b, index, self.log_u, self.tau, self.tau_momentum, self.seen,
            running_max=self.running_max, bimodal=self.mode == "bimodal", rho=self.rho, gamma=self.gamma,
            beta=self.beta, eta=self.eta, tau_min=self.tau_min, tau_max=self.tau_max, form=self.form,
            update_state=self.training or self.update_state_in_eval, check_finite=self.check_finite,
            backend=self.backend,
        )
        return loss

    def extra_repr(self) -> str:
        return (f"dataset_size={self.dataset_size}, mode={self.mode!r}, form={self.form!r}, "
                + super().extra_repr())
