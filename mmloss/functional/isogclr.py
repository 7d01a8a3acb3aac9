"""§11 iSogCLR (docs/losses.md): contrastive learning with per-sample temperatures.

``isogclr_loss`` is one optimisation step of LibAUC's ``GCLoss_v1`` (unimodal) / ``GCLoss_v2``
(bimodal) with ``enable_isogclr=True``: a surrogate loss plus an in-place update of per-sample
state (moving-average normaliser u, temperature τ, its momentum, LibAUC's running max b). What
differs between the two modes and the two forms ("libauc", "paper") is one ``ISogCLRVariant``.

The softmax-weighted mean similarity ``Σ_j p_ij·⟨x_i, y_j⟩`` is ``∂row_lse_i/∂scale_i`` for a
per-row scale, obtained by autograd through ``similarity_lse``; no N×N tensor is built.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .. import _validation as V
from ..ops import similarity_lse, similarity_topk
from ._common import compute_dtype, rowwise_dot
from .logsumexp import merge_lse

Tensor = torch.Tensor

__all__ = ["isogclr_loss"]

ISOGCLR_MODES = ("unimodal", "bimodal")
ISOGCLR_FORMS = ("libauc", "paper")
# LibAUC defaults (GCLoss_v1 unimodal / GCLoss_v2 bimodal); tau_init is the modules' business.
ISOGCLR_DEFAULTS = {
    "unimodal": {"rho": 0.3, "tau_init": 0.1, "tau_min": 0.05, "tau_max": 0.7},
    "bimodal": {"rho": 6.0, "tau_init": 0.01, "tau_min": 0.005, "tau_max": 0.05},
}


@dataclass(frozen=True)
class ISogCLRVariant:
    """What changes between iSogCLR's modes and forms; ``ISogCLRVariant.of(mode, form)``.

    The mode decides the anchor sets: "unimodal" scores each view against both views (2N−2
    negatives) and keeps one state column per sample; "bimodal" scores images against texts and
    texts against images (N−1 negatives), a state column each. The form decides how u and the
    softmax weights are defined; LibAUC's guards (its clamps) are part of its behaviour.
    """

    mode: str
    form: str
    # u tracks mean_z exp(h_z/τ) with h = sim − sim⁺ (so the positive carries the weights too);
    # False: mean_z exp(sim_z/τ) and an unweighted positive (unimodal "libauc", GCLoss_v1).
    relative_to_positive: bool
    # log ε of GCLoss_v2's floor u ≥ ε·e^b, b the running max of h/τ (the running_max state),
    # stored in u and used by the weights; None: no floor and no running max.
    log_u_floor_over_running_max: Optional[float]
    # log ε of GCLoss_v1's max(u, ε) in the weights only (u is stored unclamped); None: none.
    log_u_floor_in_weights: Optional[float]
    # weights exp(h/τ)/u without the mean's 1/|Z| (GCLoss_v2), i.e. |Z| times the paper's.
    weights_times_negatives: bool

    @staticmethod
    def of(mode: str, form: str) -> "ISogCLRVariant":
        return ISOGCLR_VARIANTS[(mode, form)]

    @property
    def bimodal(self) -> bool:
        return self.mode == "bimodal"

    @property
    def sides(self) -> int:
        """State columns per sample: image and text anchors (bimodal), or one shared."""
        return 2 if self.bimodal else 1

    def anchor_sets(self, x: Tensor, y: Tensor) -> tuple[list, int]:
        """[(anchors, key sets, state column)] of each anchor set, and the negatives per anchor."""
        n = x.shape[0]
        if self.bimodal:
            return [(x, [y], 0), (y, [x], 1)], n - 1
        return [(x, [y, x], 0), (y, [x, y], 0)], 2 * (n - 1)

    def loss(self, terms: Sequence[Tensor]) -> Tensor:
        """The loss of the anchor sets' (N,) terms: unimodal sums the two views' terms per sample,
        bimodal averages the image and text means."""
        if self.bimodal:
            return 0.5 * (terms[0].mean() + terms[1].mean())
        return (terms[0] + terms[1]).mean()

    def state_columns(self, per_set: Sequence[Tensor], log_space: bool = False) -> Tensor:
        """(N, sides) state from the anchor sets' (N,) values: bimodal keeps a column per side,
        unimodal averages the two views (``log_space``: the mean of exp, for log u)."""
        if self.bimodal:
            return torch.stack(list(per_set), dim=1)
        if log_space:
            return (torch.logaddexp(per_set[0], per_set[1]) - math.log(2.0))[:, None]
        return (0.5 * (per_set[0] + per_set[1]))[:, None]


ISOGCLR_VARIANTS = {
    ("unimodal", "libauc"): ISogCLRVariant("unimodal", "libauc", relative_to_positive=False,
                                           log_u_floor_over_running_max=None,
                                           log_u_floor_in_weights=math.log(1e-8), weights_times_negatives=False),
    ("bimodal", "libauc"): ISogCLRVariant("bimodal", "libauc", relative_to_positive=True,
                                          log_u_floor_over_running_max=math.log(1e-20),
                                          log_u_floor_in_weights=None, weights_times_negatives=True),
    ("unimodal", "paper"): ISogCLRVariant("unimodal", "paper", relative_to_positive=True,
                                          log_u_floor_over_running_max=None,
                                          log_u_floor_in_weights=None, weights_times_negatives=False),
    ("bimodal", "paper"): ISogCLRVariant("bimodal", "paper", relative_to_positive=True,
                                         log_u_floor_over_running_max=None,
                                         log_u_floor_in_weights=None, weights_times_negatives=False),
}


class _StateRows(NamedTuple):
    """The batch's rows of the state as they were before this step, (N, sides) in the compute dtype."""
    tau: Tensor
    log_u: Tensor
    momentum: Tensor
    first: Tensor                   # (N,) bool: first visit
    running_max: Optional[Tensor]


def isogclr_loss(
    features_a: Tensor,
    features_b: Tensor,
    index: Tensor,
    log_u: Tensor,
    tau: Tensor,
    tau_momentum: Tensor,
    seen: Tensor,
    *,
    running_max: Optional[Tensor] = None,
    mode: Optional[str] = None,
    rho: Optional[float] = None,
    gamma: float = 0.9,
    beta: float = 0.9,
    eta: float = 0.01,
    tau_min: Optional[float] = None,
    tau_max: Optional[float] = None,
    form: str = "libauc",
    update_state: bool = True,
    check_finite: bool = False,
    backend: str = "auto",
    bimodal: Optional[bool] = None,
) -> tuple[Tensor, Tensor]:
    """iSogCLR step: surrogate loss and in-place state update (docs/losses.md §11).

    Behaves as LibAUC's ``GCLoss_v1`` (unimodal, two views) and ``GCLoss_v2`` (bimodal, image
    rows / text columns) with ``enable_isogclr=True``. State lives in caller-owned tensors keyed
    by dataset index (the ISogCLRLoss module holds them as buffers) and is updated in place, as
    ``F.batch_norm`` updates running statistics.

    Args:
        features_a, features_b: (N, D) each, N ≥ 2 — two views (unimodal) or images and texts
            (bimodal); used as given (LibAUC's GCLoss_v1 L2-normalises inside: normalise first
            for parity).
        index: (N,) tensor of any integer dtype, on any device: the rows' dataset indices, each
            in [0, S). Validated before any state is read or written (see "State writes").
            Repeated indices are allowed: every row reads the state as it was before this step
            (so each occurrence of a new index is a first visit), and each distinct index
            receives one update, the one computed from its first occurrence in the batch. One
            occurrence's update keeps the state of a sample one consistent tuple (u, τ, m, b —
            e.g. the bimodal clamp u ≥ 1e-20·e^b holds), which an average of several would not;
            LibAUC, which assumes distinct indices, keeps an unspecified one (the last on CPU).
        log_u: (S, sides) log of the moving-average normaliser u (sides = 1 unimodal, 2 bimodal:
            column 0 image anchors, 1 text anchors). Kept in log space: equal to LibAUC's shifted
            ``u·e^b`` without its overflow guard.
        tau: (S, sides) per-sample temperatures; tau_momentum: (S, sides) the momentum m of the
            temperature gradient; seen: (S,) bool, False until a sample's first visit (then
            u_i = g_i; afterwards ``u ← (1−γ)u + γg``).
        running_max: (S, sides) LibAUC's b, the running max of h/τ over every column a row has
            met (its diagonal included, so b ≥ 0). Needed (and updated) by the bimodal "libauc"
            form only, which clamps u at ``1e-20·e^b`` as GCLoss_v2 does; ignored otherwise.
        mode: "unimodal" (None, the default: 2N−2 negatives per anchor: both views minus self
            and positive; one state per sample shared by both views, u averaged over the views
            as LibAUC does) or "bimodal" (N−1 negatives, each side its own τ, u), as
            ``ISogCLRLoss(mode=)``.
        bimodal: deprecated alias of ``mode`` (True → "bimodal", False → "unimodal"); it warns
            with a DeprecationWarning, and giving both is a TypeError.
        rho, tau_min, tau_max: None → LibAUC defaults (unimodal 0.3, [0.05, 0.7]; bimodal 6.0,
            [0.005, 0.05]). gamma, beta, eta: moving-average, momentum and τ step (0.9, 0.9, 0.01).
            ``1/tau_min`` must be finite in the compute dtype (temperatures divide the logits).
        form: "libauc" (default, the code) or "paper" (docs/losses.md's formulas):
            - unimodal "libauc": u tracks mean_z exp(sim/τ) (GCLoss_v1), surrogate gradient
              ``Σ_z exp(ℓ_z/τ)/(max(u, 1e-8)·|Z|)·∇ℓ_z − ∇ℓ⁺``;
            - bimodal "libauc": u tracks mean_z exp(h/τ) with ``h = sim − sim⁺``, clamped at
              ``1e-20·e^b``; surrogate gradient ``Σ_z exp(h_z/τ)/u·∇h_z`` (GCLoss_v2: no 1/|Z|);
            - "paper": h-based u, no clamps, ``Σ_z exp(h_z/τ)/(u·|Z|)·∇h_z`` for both.
            ``ISogCLRVariant`` names these differences.
            In every form ``G = log u + ρ − mean_z p_z·x_z/τ`` (x = h, or sim for unimodal
            "libauc"), ``m ← (1−β)m + βG``, ``τ ← clip(τ − η·m, τ_min, τ_max)`` (used next visit).
        update_state: False computes the same loss and objective without writing the state
            (the modules pass False in ``eval()`` mode, torch's convention for running
            statistics).
        check_finite: raise ValueError naming features_a / features_b if they hold NaN or Inf
            (a host synchronisation on GPUs; skipped while compiling). Otherwise NaN/Inf
            propagate to the loss as in torch — but never into the state (see below).

    State writes: nothing is written unless every index is in range and every value to be
    written (log u, τ, m, b) is finite; otherwise the call raises and the state is unchanged.
    Eager CPU tensors raise ``ValueError`` before any write. On other devices and while
    compiling, the checks are device-side asserts (``torch._assert_async``: no host
    synchronisation, the error surfaces at the next synchronisation) and the write itself is
    gated on the same condition, so a failing step leaves the state unchanged even if the
    assert is reported after the write was issued.

    Returns ``(loss, objective)``: the surrogate whose value and gradient are LibAUC's
    (unimodal: mean_i of the two views' terms; bimodal: ½(image mean + text mean)), and the
    detached logged objective ``mean_i(τ_i·log u_i + τ_i·ρ)`` (bimodal: summed over sides;
    unimodal "libauc": ``mean_i(τ_i·log u_i − sim⁺_i + τ_i·ρ)``, the same quantity for its
    sim-based u), with τ the temperatures used in this step and u after the update.
    Memory O(N·D) plus the backend's workspace; compute ≈ 7 N×N GEMM-equivalents per anchor
    set (the softmax-weighted sums need one scale-only backward of the primitive), one more
    for the bimodal "libauc" form's running max (``similarity_topk``, k = 1).
    No distributed form: the loss of the given (rank-local) rows; ``ISogCLRLoss`` refuses
    ``distributed`` modes other than None under a process group.
    """
    _require_autograd("isogclr_loss")
    x, y = V.prepare_features("features_a", features_a, "features_b", features_b)
    V.check_same_shape("features_a", x, "features_b", y)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"isogclr_loss needs at least 2 rows (negatives), got features of shape {tuple(x.shape)}")
    mode = resolve_mode("isogclr_loss", mode, bimodal)
    variant = ISogCLRVariant.of(mode, V.check_choice("form", form, ISOGCLR_FORMS))
    V.check_bool("update_state", update_state)
    V.check_bool("check_finite", check_finite)
    rho, gamma, beta, eta, tau_min, tau_max = isogclr_hyperparameters(
        mode, rho=rho, gamma=gamma, beta=beta, eta=eta, tau_min=tau_min, tau_max=tau_max
    )
    device, dt = x.device, compute_dtype(x)
    V.check_scalar("tau_min", tau_min, positive=True, dtype=dt, reciprocal=True)
    size = _check_isogclr_state(log_u, tau, tau_momentum, seen, variant.sides)
    tracks_running_max = variant.log_u_floor_over_running_max is not None
    if tracks_running_max:
        if running_max is None:
            raise ValueError(f"isogclr_loss(mode={mode!r}, form={form!r}) needs the running_max state")
        _check_state_tensor("running_max", running_max, size, variant.sides, log_u)
    state_index, index_valid = _checked_index(index, n, size, log_u.device)
    if check_finite:
        V.check_all_finite(("features_a", features_a), ("features_b", features_b))

    def read(state: Tensor) -> Tensor:
        return state.index_select(0, state_index).to(device=device, dtype=dt)

    with torch.no_grad():
        rows = _StateRows(tau=read(tau), log_u=read(log_u), momentum=read(tau_momentum),
                          first=~seen.index_select(0, state_index).to(device),
                          running_max=read(running_max) if tracks_running_max else None)

    track = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    positive = rowwise_dot(x, y)                                  # sim⁺_i, shared by every anchor set
    anchor_sets, negatives = variant.anchor_sets(x, y)
    steps = [_anchor_set_step(variant, anchors, keys, side, rows, positive, negatives, gamma, rho, track, backend)
             for anchors, keys, side in anchor_sets]
    terms, new_log_u, grads_tau, new_max = zip(*steps)
    loss = variant.loss(terms)

    with torch.no_grad():
        log_u_state = variant.state_columns(new_log_u, log_space=True)
        grad_tau = variant.state_columns(grads_tau)
        momentum_new = (1.0 - beta) * rows.momentum + beta * grad_tau
        tau_new = torch.clamp(rows.tau - eta * momentum_new, tau_min, tau_max)
        per_sample = rows.tau * log_u_state + rows.tau * rho
        if not variant.relative_to_positive:                      # τ·log u_sim − sim⁺ = τ·log u_h
            per_sample = per_sample - positive.detach()[:, None]
        objective = per_sample.mean(dim=0).sum()
        if update_state:
            updates = {"log_u": (log_u, log_u_state), "tau": (tau, tau_new),
                       "tau_momentum": (tau_momentum, momentum_new)}
            if tracks_running_max:
                updates["running_max"] = (running_max, torch.stack(new_max, dim=1))
            _write_state(updates, seen, state_index, index_valid,
                         (("features_a", features_a), ("features_b", features_b)))
    return loss, objective


def _anchor_set_step(variant: ISogCLRVariant, anchors: Tensor, keys: Sequence[Tensor], side: int, rows: _StateRows,
                     positive: Tensor, negatives: int, gamma: float, rho: float, track: bool, backend: str):
    """One anchor set: its (N,) surrogate term, and the (N,) new log u, ∂/∂τ (G) and running
    max b (None unless the variant tracks it) of its state column."""
    tau_rows = rows.tau[:, side]
    scale = (1.0 / tau_rows).detach()
    positive_value = positive.detach()
    lse, mean_sim = _negatives_lse_and_mean(anchors, keys, scale, backend)
    shift = scale * positive_value if variant.relative_to_positive else 0.0
    log_g = lse - math.log(negatives) - shift                     # log g_i, of the size of the logits
    log_ratio = _log_g_over_new_u(log_g, rows.log_u[:, side], rows.first, gamma)
    log_u_new = log_g - log_ratio
    b_new = None
    if variant.log_u_floor_over_running_max is not None:
        # b ← max(b, max_j h_ij/τ_i) over every column (the diagonal's h = 0 included);
        # u ≥ ε·e^b, so g/u ≤ g·e^{−b}/ε.
        top, _ = similarity_topk(anchors, keys[0], 1)
        b_new = torch.maximum(rows.running_max[:, side], (top[:, 0] - positive_value) * scale)
        floor = variant.log_u_floor_over_running_max + b_new
        log_ratio = torch.minimum(log_ratio, log_g - floor)
        log_u_new = torch.maximum(log_u_new, floor)
    if variant.log_u_floor_in_weights is not None:                # weights use max(u, ε)
        log_ratio = torch.minimum(log_ratio, log_g - variant.log_u_floor_in_weights)
    ratio = torch.exp(log_ratio)                                  # g_i / u_i
    relative = mean_sim - positive_value if variant.relative_to_positive else mean_sim
    grad_tau = log_u_new + rho - ratio * relative * scale
    weight = negatives * ratio if variant.weights_times_negatives else ratio
    value = weight * mean_sim
    if track:
        live = merge_lse([similarity_lse(anchors, k, scale, exclude="diagonal", cols=False, backend=backend)[0]
                          for k in keys])
        value = value + weight * tau_rows * (live - live.detach())
    positive_weight = weight if variant.relative_to_positive else 1.0
    term = value - positive_weight * (positive if track else positive_value)
    return term, log_u_new, grad_tau, b_new


def _log_g_over_new_u(log_g: Tensor, log_u_old: Tensor, first: Tensor, gamma: float) -> Tensor:
    """log(g/u_new) for ``u_new = (1−γ)·u_old + γ·g`` (first visit: u = g, log ratio 0).

    Computed as ``−log(γ + (1−γ)·u_old/g)`` from the difference log u_old − log g, not as
    log g − log u_new: both are of the size of the logits (|h|/τ, thousands at τ = 0.005), and
    their difference rounded at that size would put an error of |h/τ|·2⁻²⁴ on every weight g/u.
    """
    dt, device = log_g.dtype, log_g.device
    log_keep = math.log1p(-gamma) if gamma < 1.0 else float("-inf")
    log_gamma = torch.full((), math.log(gamma), dtype=dt, device=device)
    return torch.where(first, torch.zeros((), dtype=dt, device=device),
                       -torch.logaddexp(log_gamma, log_keep + (log_u_old - log_g)))


def resolve_mode(caller: str, mode, bimodal) -> str:
    """``mode`` ("unimodal" | "bimodal"; None → "unimodal"), or the one its deprecated alias
    ``bimodal`` (a bool) names, with a DeprecationWarning. Both given: TypeError."""
    if bimodal is None:
        return "unimodal" if mode is None else V.check_choice("mode", mode, ISOGCLR_MODES)
    if mode is not None:
        raise TypeError(f"{caller}() got both mode= and its deprecated alias bimodal=; pass mode= only")
    V.check_bool("bimodal", bimodal)
    warnings.warn(f"{caller}(bimodal=...) is deprecated; pass mode=\"bimodal\" or mode=\"unimodal\"",
                  DeprecationWarning, stacklevel=3)
    return "bimodal" if bimodal else "unimodal"


def _require_autograd(loss: str) -> None:
    if torch.compiler.is_compiling():  # not traceable; compiled graphs run outside inference mode
        return
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{loss} obtains softmax-weighted sums from autograd through the fused primitive, which "
            "inference mode disables; evaluate it under torch.no_grad() instead of torch.inference_mode()"
        )


def _checked_index(index, n: int, size: int, state_device: torch.device) -> tuple[Tensor, Tensor]:
    """(int64 index on the state's device, 0-d bool "every entry is in [0, size)").

    Type and shape errors raise at once. The range is checked without a host synchronisation
    where that matters: eager CPU tensors raise ValueError here; elsewhere (accelerators,
    compiling) a device-side assert is queued and the returned flag gates the state write.
    Out-of-range entries are clamped for the reads, so nothing is indexed out of bounds.
    """
    V.check_tensor("index", index)
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"index must be an integer tensor (any integer dtype), got dtype {index.dtype}")
    if index.dim() != 1 or index.shape[0] != n:
        raise ValueError(f"index must have shape ({n},) like the features, got shape {tuple(index.shape)}")
    state_index = index.to(device=state_device, dtype=torch.int64)
    if V.value_checks_enabled(state_index):
        V.check_index_range("index", state_index, size)
        return state_index, torch.ones((), dtype=torch.bool, device=state_device)
    valid = ((state_index >= 0) & (state_index < size)).all()
    torch._assert_async(valid, "isogclr_loss: index must lie in [0, dataset_size)")
    return state_index.clamp(0, size - 1), valid


def first_occurrence(index: Tensor) -> Tensor:
    """(N,) int64: for each row, the position of the first row holding the same index.

    A stable sort groups equal indices in batch order; each group's first sorted position is
    carried forward with a running max. O(N log N), no host synchronisation.
    """
    n = index.shape[0]
    ordered, order = torch.sort(index, stable=True)
    starts = torch.ones(n, dtype=torch.bool, device=index.device)
    starts[1:] = ordered[1:] != ordered[:-1]
    positions = torch.arange(n, device=index.device)
    group_start = torch.where(starts, positions, torch.zeros_like(positions)).cummax(dim=0).values
    leader = torch.empty_like(order)
    leader.scatter_(0, order, order.index_select(0, group_start))
    return leader


def _write_state(updates: dict, seen: Tensor, state_index: Tensor, index_valid: Tensor, inputs) -> None:
    """Write each (state tensor, (N, sides) new rows) pair at ``state_index``, and mark ``seen``.

    Repeated indices all write their first occurrence's rows (identical values: the write is
    deterministic). Out-of-range indices and non-finite values are refused before any write
    (``isogclr_loss``'s docstring, "State writes").
    """
    leader = first_occurrence(state_index)
    # Cast first: a value that overflows the state's dtype is non-finite too.
    rows = {name: new.to(device=state.device, dtype=state.dtype).index_select(0, leader)
            for name, (state, new) in updates.items()}
    finite = torch.stack([torch.isfinite(r).all() for r in rows.values()]).all()
    if V.value_checks_enabled(finite):
        if not bool(finite):
            raise ValueError(_nonfinite_state_message(rows, inputs))
        ok = None
    else:
        torch._assert_async(finite, "isogclr_loss: features_a / features_b give a non-finite iSogCLR "
                                    "state update (NaN/Inf inputs or overflow); the state was not changed")
        ok = finite & index_valid
    for name, (state, _) in updates.items():
        new = rows[name]
        if ok is not None:  # device / compiled path: write the old rows back unless everything checks out
            new = torch.where(ok, new, state.index_select(0, state_index))
        state.index_put_((state_index,), new)
    if ok is None:
        seen.index_fill_(0, state_index, True)
    else:
        seen.index_put_((state_index,), seen.index_select(0, state_index) | ok)


def _nonfinite_state_message(rows: dict, inputs) -> str:
    bad_state = [name for name, r in rows.items() if not bool(torch.isfinite(r).all())]
    what = ", ".join(bad_state)
    for name, t in inputs:
        bad = ~torch.isfinite(t.detach())
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            return (f"{name} {tuple(t.shape)} has non-finite entries ({name}[{', '.join(map(str, where))}] = "
                    f"{float(t.detach()[where])}): iSogCLR refuses to write a non-finite state ({what}); "
                    "the state was not changed")
    return (f"features_a and features_b give a non-finite iSogCLR state update ({what}: overflow, or "
            "non-finite values already in the state rows they index); the state was not changed")


def isogclr_hyperparameters(mode: Optional[str] = None, *, rho=None, gamma=0.9, beta=0.9, eta=0.01, tau_min=None,
                            tau_max=None, bimodal: Optional[bool] = None):
    """Validated (rho, gamma, beta, eta, tau_min, tau_max), None → LibAUC's default for ``mode``
    ("unimodal" | "bimodal"; None → "unimodal"). ``bimodal`` is ``mode``'s deprecated alias, as
    in ``isogclr_loss`` (a bool passed in ``mode``'s place, the old positional form, counts as it)."""
    if isinstance(mode, bool):
        mode, bimodal = (None, mode) if bimodal is None else (mode, bimodal)
    defaults = ISOGCLR_DEFAULTS[resolve_mode("isogclr_hyperparameters", mode, bimodal)]
    rho = defaults["rho"] if rho is None else rho
    tau_min = defaults["tau_min"] if tau_min is None else tau_min
    tau_max = defaults["tau_max"] if tau_max is None else tau_max
    values = {"rho": rho, "gamma": gamma, "beta": beta, "eta": eta, "tau_min": tau_min, "tau_max": tau_max}
    for name, value in values.items():
        V.check_real(name, value)
        # (a compiled module's floats may be traced as symbolic: they were checked when built)
        if not torch.compiler.is_compiling() and not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    if eta < 0.0:
        raise ValueError(f"eta must be ≥ 0, got {eta}")
    if not 0.0 < tau_min <= tau_max:
        raise ValueError(f"need 0 < tau_min ≤ tau_max, got tau_min={tau_min}, tau_max={tau_max}")
    return float(rho), float(gamma), float(beta), float(eta), float(tau_min), float(tau_max)


def _check_isogclr_state(log_u, tau, tau_momentum, seen, sides: int) -> int:
    V.check_tensor("seen", seen)
    if seen.dtype != torch.bool:
        raise TypeError(f"seen must be a bool tensor, got dtype {seen.dtype}")
    size = seen.shape[0] if seen.dim() == 1 else -1
    if size < 1:
        raise ValueError(f"seen must have shape (dataset_size,), got {tuple(seen.shape)}")
    for name, t in (("log_u", log_u), ("tau", tau), ("tau_momentum", tau_momentum)):
        _check_state_tensor(name, t, size, sides, seen)
    return size


def _check_state_tensor(name: str, t, size: int, sides: int, like: Tensor) -> None:
    V.check_tensor(name, t)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if tuple(t.shape) != (size, sides):
        raise ValueError(f"{name} must have shape ({size}, {sides}), got {tuple(t.shape)}")
    V.check_same_device(("the iSogCLR state", like), (name, t))


def _negatives_lse_and_mean(anchors: Tensor, keys: Sequence[Tensor], scale: Tensor, backend: str):
    """(R, E): row LSE of ``scale_i·⟨a_i, k⟩`` over the keys minus each anchor's own row, and
    the softmax-weighted mean similarity ``E_i = Σ_z p_iz⟨a_i, k_z⟩ = ∂R_i/∂scale_i`` (no grad)."""
    with torch.enable_grad():
        leaf = scale.detach().requires_grad_()
        lse = merge_lse([similarity_lse(anchors.detach(), k.detach(), leaf, exclude="diagonal", cols=False,
                                        backend=backend)[0] for k in keys])
        (mean_sim,) = torch.autograd.grad(lse.sum(), leaf)
    return lse.detach(), mean_sim
