"""§9 Symile, §10 TCL and §11 iSogCLR (docs/losses.md).

Every function here composes the primitives of ``mmloss.ops`` with O(N·D) torch ops; no N×M
tensor (and, for Symile "n_squared", no N²×D candidate table) is ever built. Where a loss needs
more than a row log-sum-exp:

* iSogCLR's softmax-weighted mean similarity ``Σ_j p_ij·⟨x_i, y_j⟩`` is ``∂row_lse_i/∂scale_i``
  for a per-row scale, obtained by autograd through ``similarity_lse``;
* TCL's soft targets need ``Σ_j p̄_ij L_ij`` under the teacher's softmax: the cross-entropy
  primitive ``similarity_kl`` gives it per key set (``_teacher_weighted_logit``).

In eager mode, custom autograd functions recompute what they would otherwise save (Symile's
shuffled keys and candidate blocks), so saved memory stays O(N·D). Under ``torch.compile`` they
are replaced by plain autograd compositions the compiler can trace (inner ``autograd.grad``
calls are not traceable): Symile "n" saves its K shuffled key matrices, "n_squared" with K ≥ 3
loops over candidate blocks with ``torch._higher_order_ops.scan`` (a symbolic trip count, so
varying batch sizes do not recompile).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from functools import reduce as _fold
from typing import Optional

import torch

from .. import _validation as V
from ..ops import similarity_kl, similarity_lse, similarity_topk
from ._common import as_compute, compute_dtype, reduce, rowwise_dot, scale_as, softplus

try:  # loops with a symbolic trip count under torch.compile (Symile "n_squared", K ≥ 3)
    from torch._higher_order_ops.scan import scan as _scan
except ImportError:  # pragma: no cover - older torch
    _scan = None

Tensor = torch.Tensor

__all__ = ["isogclr_loss", "symile_loss", "tcl_loss"]

SYMILE_SAMPLING = ("n", "n_squared")
TCL_TERMS = ("i2t", "t2i", "i2i", "t2t", "lmi_v", "lmi_t")
ISOGCLR_FORMS = ("libauc", "paper")
# LibAUC defaults (GCLoss_v1 unimodal / GCLoss_v2 bimodal); tau_init is the modules' business.
ISOGCLR_DEFAULTS = {
    False: {"rho": 0.3, "tau_init": 0.1, "tau_min": 0.05, "tau_max": 0.7},
    True: {"rho": 6.0, "tau_init": 0.01, "tau_min": 0.005, "tau_max": 0.05},
}

# LibAUC's guards, part of its behaviour: GCLoss_v2 clamps its shifted normaliser u·e^{−b} at
# 1e-20 (and stores the clamped value); GCLoss_v1 clamps u at 1e-8 in the weights only.
_LOG_EPS_BIMODAL = math.log(1e-20)
_LOG_EPS_UNIMODAL = math.log(1e-8)

# Symile "n_squared": candidate prefixes per streamed block. A block holds
# _SYMILE_PREFIX_BLOCK·N rows of D features, so memory stays O(N·D) for every K.
_SYMILE_PREFIX_BLOCK = 8
# Element budget of one upcast chunk of TCL's local features (positive logits).
_LOCAL_CHUNK_ELEMENTS = 1 << 20


# ============================================================================ shared helpers


def _common_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """One dtype for several feature tensors: promotion, then autocast (as a matmul would)."""
    dtype = _fold(torch.promote_types, [t.dtype for t in tensors])
    cast = V.autocast_dtype(tensors[0].device)
    if cast is not None and dtype != torch.float64:
        dtype = cast
    return dtype


def _lse_merge(parts: Sequence[Tensor]) -> Tensor:
    """Elementwise log-sum-exp of several (N,) log-sum-exps over disjoint key sets.

    Entries that are −inf in every part stay −inf with a zero (not NaN) gradient; NaN propagates.
    """
    if len(parts) == 1:
        return parts[0]
    return _logsumexp0(torch.stack(list(parts)))


def _logsumexp0(stacked: Tensor) -> Tensor:
    """``logsumexp`` over dim 0 whose all-−inf entries give −inf with a zero gradient (torch's
    gives NaN gradients there) and whose NaN entries give NaN (the NaN policy)."""
    shift = stacked.detach().amax(dim=0)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros((), dtype=shift.dtype, device=shift.device))
    total = torch.exp(stacked - shift).sum(dim=0)
    empty = total == 0
    safe = torch.where(empty, torch.ones((), dtype=total.dtype, device=total.device), total)
    return torch.where(empty, torch.full((), float("-inf"), dtype=total.dtype, device=total.device),
                       shift + torch.log(safe))


def _product(factors: Sequence[Tensor]) -> Tensor:
    """Elementwise product of same-shape tensors: a fresh tensor for two or more factors (later
    factors multiply in place); a single factor is returned as is."""
    if len(factors) == 1:
        return factors[0]
    out = factors[0] * factors[1]
    for f in factors[2:]:
        out.mul_(f)
    return out


def _split_scale(logit_scale):
    """(tensor or None, Python value) for passing a scale through an autograd.Function."""
    if isinstance(logit_scale, Tensor):
        return logit_scale, 0.0
    return None, float(logit_scale)


def _require_autograd(loss: str) -> None:
    if torch.compiler.is_compiling():  # not traceable; compiled graphs run outside inference mode
        return
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{loss} obtains softmax-weighted sums from autograd through the fused primitive, which "
            "inference mode disables; evaluate it under torch.no_grad() instead of torch.inference_mode()"
        )


# ============================================================================ §9 Symile


def symile_loss(
    representations,
    logit_scale,
    negative_sampling: str = "n",
    generator: Optional[torch.Generator] = None,
    *,
    reduction: str = "mean",
    check_finite: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Symile loss of K ≥ 2 modalities with the multilinear inner product (docs/losses.md §9).

    For each anchor modality k (in order) and row i: cross-entropy over candidate tuples of the
    other modalities with target the all-i tuple, written ``softplus(LSE_negatives − s·MIP_i)``;
    the loss is the mean over k of the mean over i.

    Args:
        representations: list or tuple of K ≥ 2 (N, D) tensors, or one (K, N, D) tensor
            (fp16/bf16/fp32/fp64, any strides; promoted to one dtype), used as given (the model
            normalises them).
        logit_scale: the multiplier s (already exponentiated): positive float or 0-d tensor.
        negative_sampling: "n" — per anchor, one random permutation of each other modality
            (K·(K−1) ``torch.randperm(N, generator=generator)`` draws per call, anchors in order,
            then the other modalities in order); candidates are the shuffled rows' Hadamard
            products with the diagonal replaced by the true positive (N−1 negatives per row), as
            in the authors' code. "n_squared" — every tuple of the other modalities' rows
            (N^{K−1} candidates per row), streamed; ``generator`` is not used. K = 2 gives a
            one-directional InfoNCE per anchor.
        generator: None (the default generator of the inputs' device) or a torch.Generator on
            the CPU or on the inputs' device.
        reduction: "mean" | "sum" (N × mean) | "none" ((N,) per-row terms averaged over anchors).
        check_finite: raise ValueError naming the representation (or logit_scale) that holds NaN
            or Inf (a host synchronisation on GPUs; skipped while compiling). Otherwise NaN/Inf
            propagate to the result as in torch.

    Returns fp32 (fp64 for fp64 inputs). Gradients reach every modality and ``logit_scale``.
    Memory: O(K·N·D) plus the backend's workspace — shuffled keys and candidate blocks are
    rebuilt in backward, never saved; every modality's gradient accumulates in one buffer.
    Under ``torch.compile(fullgraph=True, dynamic=True)`` the negatives are plain autograd
    compositions ("n" saves its K shuffled key matrices; "n_squared" with K ≥ 3 runs its blocks
    in ``scan``) and batch sizes do not recompile; an explicit ``generator`` cannot be traced
    (pytorch/pytorch#88574): pass None (the default generator) when compiling.
    Compute: "n" ≈ 5 N×N GEMM-equivalents per anchor; "n_squared" O(N^K·D) for K ≥ 3 (blocks
    of 8·N candidate rows against the last modality, recomputed once in backward).
    """
    reps = _symile_inputs(representations)
    n, device = reps[0].shape[0], reps[0].device
    dt = compute_dtype(reps[0])
    logit_scale = V.check_scalar("logit_scale", logit_scale, device=device, positive=True, dtype=dt)
    V.check_choice("negative_sampling", negative_sampling, SYMILE_SAMPLING)
    V.check_reduction(reduction)
    if V.check_bool("check_finite", check_finite):
        V.check_all_finite(*((f"representations[{k}]", r) for k, r in enumerate(reps)),
                           ("logit_scale", logit_scale if isinstance(logit_scale, Tensor) else None))
    draw_device = _generator_device(generator, device)
    s = scale_as(logit_scale, dt, device)
    k_count = len(reps)

    # MIP(x_i, y_i, …) is the positive of every anchor modality: computed once.
    positive = s * _MultilinearDot.apply(*reps)
    if negative_sampling == "n_squared" and k_count == 2:
        # Candidates are the other modality's rows: the two anchors are the rows and columns of
        # one N×N problem (CLIP's layout).
        row, col = similarity_lse(reps[0], reps[1], logit_scale, exclude="diagonal", backend=backend)
        lses = torch.stack([row, col])
    else:
        if negative_sampling == "n":
            plans = []
            # generator=None is not passed on: under torch.compile an explicit generator=None
            # makes randperm specialise on N (a recompile per batch size).
            draw = {"device": draw_device} if generator is None else {"device": draw_device, "generator": generator}
            for _ in range(k_count):
                perms = tuple(torch.randperm(n, **draw).to(device) for _ in range(k_count - 1))
                plans.append(_ShuffledNegatives(perms, dt))
        else:
            plans = [_TupleNegatives(n, k_count - 2, dt, device) for _ in range(k_count)]
        if torch.compiler.is_compiling():
            # Inner autograd.grad calls (the custom Function's backward) are not traceable.
            lses = torch.stack([plan.traced(reps[k], reps[:k] + reps[k + 1:], logit_scale, backend)
                                for k, plan in enumerate(plans)])
        else:
            scale_t, scale_v = _split_scale(logit_scale)
            lses = _SymileNegatives.apply(tuple(plans), backend, scale_v, scale_t, *reps)
    terms = softplus(lses - positive[None, :]).mean(dim=0)
    return reduce(terms, reduction)


def _symile_inputs(representations) -> list[Tensor]:
    if isinstance(representations, Tensor):
        if representations.dim() != 3:
            raise ValueError(
                "representations given as one tensor must be (K, N, D), got shape "
                f"{tuple(representations.shape)}"
            )
        representations = representations.unbind(0)
    if not isinstance(representations, Sequence):
        raise TypeError(
            "representations must be a list or tuple of K ≥ 2 (N, D) tensors (or a (K, N, D) "
            f"tensor), got {type(representations).__name__}"
        )
    reps = list(representations)
    if len(reps) < 2:
        raise ValueError(f"representations needs at least 2 modalities, got {len(reps)}")
    for k, r in enumerate(reps):
        V.check_features(f"representations[{k}]", r)
    for k, r in enumerate(reps[1:], start=1):
        V.check_same_device(("representations[0]", reps[0]), (f"representations[{k}]", r))
        V.check_same_shape("representations[0]", reps[0], f"representations[{k}]", r)
    dtype = _common_dtype(reps)
    return [r.to(dtype) for r in reps]


def _generator_device(generator, device: torch.device) -> torch.device:
    if generator is None:
        return device
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    gen_device = torch.device(generator.device)
    if gen_device.type != "cpu" and gen_device != device:
        raise ValueError(
            f"generator is on {gen_device} but the representations are on {device}; "
            "use a CPU generator or one on the inputs' device"
        )
    return gen_device


class _MultilinearDot(torch.autograd.Function):
    """(N,) ``Σ_d Π_k r_k[i, d]`` in the compute dtype; saves only its inputs."""

    @staticmethod
    def forward(ctx, *reps):
        ctx.save_for_backward(*reps)
        dt = compute_dtype(reps[0])
        return _product([as_compute(r, dt) for r in reps]).sum(dim=1)

    @staticmethod
    def backward(ctx, grad):
        reps = ctx.saved_tensors
        out = []
        for k, r in enumerate(reps):
            if not ctx.needs_input_grad[k]:
                out.append(None)
                continue
            rest = [as_compute(o, grad.dtype) for m, o in enumerate(reps) if m != k]
            acc = grad[:, None] * rest[0]
            for factor in rest[1:]:
                acc.mul_(factor)
            out.append(acc.to(r.dtype))
        return tuple(out)


def _gathered_product(mods, perms, dtype) -> Tensor:
    """``Π_m mods[m][perm_m]`` (row gathers, then a Hadamard product) in ``dtype``."""
    return _product([m.index_select(0, p).to(dtype) for m, p in zip(mods, perms)])


def _row_halves(n: int):
    """Two row blocks: each primitive call then takes half the default workspace, which leaves
    room for the rebuilt keys and their gradient within the memory budget."""
    half = (n + 1) // 2
    return [(0, half), (half, n)] if n > 1 else [(0, n)]


class _SymileNegatives(torch.autograd.Function):
    """(K, N) row LSEs over every anchor's negatives, all K anchors in one autograd node.

    One node lets backward accumulate each modality's gradient in a single compute-dtype
    buffer (which becomes its ``.grad``) instead of K partial gradients added one after the
    other. ``plans[k]`` computes anchor k's LSE and, in backward, rebuilds its candidates
    (nothing N×D is saved besides the inputs) and adds its gradients into the buffers.
    """

    @staticmethod
    def forward(ctx, plans, backend, scale_value, scale, *reps):
        scale_arg = scale if scale is not None else scale_value
        lses = torch.stack([plan.forward(reps[k], reps[:k] + reps[k + 1:], scale_arg, backend)
                            for k, plan in enumerate(plans)])
        ctx.plans, ctx.backend, ctx.scale_value = plans, backend, scale_value
        ctx.save_for_backward(scale, lses, *reps)
        return lses

    @staticmethod
    def backward(ctx, grad):
        scale, lses, *reps = ctx.saved_tensors
        need_scale, needs = ctx.needs_input_grad[3], ctx.needs_input_grad[4:]
        dt = lses.dtype
        acc = [torch.zeros(r.shape, dtype=dt, device=r.device) if need else None for r, need in zip(reps, needs)]
        if scale is None:
            scale_arg = ctx.scale_value
        else:
            scale_arg = scale.detach().requires_grad_(need_scale)
        dscale = None
        for k, plan in enumerate(ctx.plans):
            rest = [m for m in range(len(reps)) if m != k]
            ds = plan.backward(reps[k], [reps[m] for m in rest], grad[k], lses[k], acc[k], [acc[m] for m in rest],
                               scale_arg, ctx.backend)
            if ds is not None:
                dscale = ds if dscale is None else dscale + ds
        grads = [None if a is None else a.to(r.dtype) for a, r in zip(acc, reps)]
        return (None, None, None, dscale, *grads)


def _upstream(grad: Tensor, total: Tensor) -> Tensor:
    """The upstream gradient of a row LSE, zero where the row has no negative (LSE = −inf)."""
    return torch.where(torch.isfinite(total), grad.to(total.dtype), torch.zeros((), dtype=total.dtype,
                                                                                device=total.device))


def _wanted(*leaves):
    return [t for t in leaves if isinstance(t, Tensor) and t.requires_grad]


class _ShuffledNegatives:
    """Symile "n" for one anchor: keys ``S = Π_m r_m[π_m]`` (N, D); row i's negatives are S_j, j ≠ i."""

    def __init__(self, perms, dtype):
        self.perms, self.dtype = perms, dtype

    def forward(self, anchor, others, scale_arg, backend):
        keys = _gathered_product(others, self.perms, self.dtype)
        return similarity_lse(anchor, keys, scale_arg, exclude="diagonal", cols=False, backend=backend)[0]

    def traced(self, anchor, others, scale, backend):
        """The same LSE as plain autograd operations (torch.compile): the keys are saved."""
        return self.forward(anchor, others, scale, backend)

    def backward(self, anchor, others, grad, total, acc_anchor, acc_others, scale_arg, backend):
        dt = self.dtype
        g = _upstream(grad, total)
        need_keys = any(a is not None for a in acc_others)
        keys = _gathered_product(others, self.perms, dt).requires_grad_(need_keys)
        dkeys = dscale = None
        for r0, r1 in _row_halves(anchor.shape[0]):
            with torch.enable_grad():
                rows = anchor[r0:r1].detach().to(dt).requires_grad_(acc_anchor is not None)
                lse, _ = similarity_lse(rows, keys, scale_arg, exclude="diagonal", offset=r0, cols=False,
                                        backend=backend)
                got = list(torch.autograd.grad(lse, _wanted(rows, keys, scale_arg), g[r0:r1]))
            del lse
            if rows.requires_grad:
                acc_anchor[r0:r1] += got.pop(0)
            if need_keys:
                d = got.pop(0)
                dkeys = d if dkeys is None else dkeys.add_(d)
                del d  # the block's gradients must not outlive it
            if got:
                dscale = got[0] if dscale is None else dscale + got[0]
        del keys
        if dkeys is not None:
            # S_j = Π_m r_m[π_m(j)]: row π_m(j) of r_m receives dS_j·Π_{m'≠m} r_m'[π_m'(j)].
            for m, (perm, acc_m) in enumerate(zip(self.perms, acc_others)):
                if acc_m is None:
                    continue
                factors = [o.index_select(0, p).to(dt) for j, (o, p) in enumerate(zip(others, self.perms)) if j != m]
                contribution = dkeys
                for f in factors:
                    contribution = contribution * f
                acc_m.index_add_(0, perm, contribution)
        return dscale


class _TupleNegatives:
    """Symile "n_squared" for one anchor (K ≥ 3): candidates ``(j_1, …, j_{K−1})``, streamed.

    ``MIP(x_i, r_1[j_1], …, r_{K−1}[j_{K−1}])
    = ⟨x_i ⊙ r_1[j_1] ⊙ … ⊙ r_{K−2}[j_{K−2}], r_{K−1}[j_{K−1}]⟩``:
    each prefix ``q = (j_1, …, j_{K−2})`` (lexicographic, the first other modality most
    significant) contributes N rows ``x ⊙ P_q`` scored against the last modality by the
    primitive, in blocks of _SYMILE_PREFIX_BLOCK prefixes merged online. Only the positive
    tuple is excluded: row i of prefix q drops key i when every digit of q is i, i.e.
    ``q == i·(1 + N + … + N^{K−3})``. Backward rebuilds each block under autograd and weights
    its row LSEs by ``g_i·exp(lse_block − lse_i)`` (the chain rule through the merge).
    """

    def __init__(self, n: int, prefix_modalities: int, dtype, device):
        self.n, self.depth, self.dtype, self.device = n, prefix_modalities, dtype, device
        self.count = n ** prefix_modalities
        self.diagonal_step = sum(n ** t for t in range(prefix_modalities))
        self.key_labels = torch.arange(n, device=device)

    def blocks(self):
        for q0 in range(0, self.count, _SYMILE_PREFIX_BLOCK):
            yield q0, min(self.count, q0 + _SYMILE_PREFIX_BLOCK)

    def rows(self, anchor, prefix_mods, q0: int, q1: int):
        """(rows ((q1−q0)·N, D), exclusion kwargs) of prefixes [q0, q1)."""
        n, dt = self.n, self.dtype
        q = torch.arange(q0, q1, device=self.device)
        factors = []
        for m in range(self.depth):
            digit = torch.div(q, n ** (self.depth - 1 - m), rounding_mode="floor") % n
            factors.append(prefix_mods[m].index_select(0, digit).to(dt))
        prefix = _product(factors)                                               # (b, D)
        rows = (anchor.to(dt)[None, :, :] * prefix[:, None, :]).reshape(-1, anchor.shape[1])
        own = self.key_labels[None, :]
        labels = torch.where(q[:, None] == own * self.diagonal_step, own, torch.full_like(own, -1)).reshape(-1)
        return rows, {"exclude": "same_label", "x_labels": labels, "y_labels": self.key_labels}

    def forward(self, anchor, others, scale_arg, backend):
        total = None
        for q0, q1 in self.blocks():
            rows, marks = self.rows(anchor, others[:-1], q0, q1)
            lse, _ = similarity_lse(rows, others[-1], scale_arg, cols=False, backend=backend, **marks)
            part = torch.logsumexp(lse.view(q1 - q0, self.n), dim=0)
            total = part if total is None else _lse_merge([total, part])
        return total

    def traced(self, anchor, others, scale, backend):
        """The same LSE as plain autograd operations (torch.compile).

        A Python loop over ``ceil(N^{K−2}/8)`` blocks would make dynamo specialise on N (a
        recompile per batch size), so the blocks run in ``torch._higher_order_ops.scan``, whose
        trip count may be symbolic; the last block is padded with prefixes masked to −inf.
        What scan's autograd saves per block is the compiler's choice (not covered by the memory
        bound, which holds for eager mode).
        """
        n, depth, step = self.n, self.depth, _SYMILE_PREFIX_BLOCK
        count = n ** depth
        blocks = (count + step - 1) // step
        prefixes = torch.arange(blocks * step, device=anchor.device).view(blocks, step)
        last = others[-1]
        neg_inf = torch.full((), float("-inf"), dtype=self.dtype, device=anchor.device)

        def block(total, q):
            valid = q < count
            q_real = torch.clamp(q, max=count - 1)
            digits = [torch.div(q_real, n ** (depth - 1 - m), rounding_mode="floor") % n for m in range(depth)]
            prefix = _product([others[m].index_select(0, digit).to(self.dtype) for m, digit in enumerate(digits)])
            rows = (anchor.to(self.dtype)[None, :, :] * prefix[:, None, :]).reshape(-1, anchor.shape[1])
            own = self.key_labels[None, :]
            labels = torch.where(q[:, None] == own * self.diagonal_step, own, torch.full_like(own, -1)).reshape(-1)
            lse, _ = similarity_lse(rows, last, scale, exclude="same_label", x_labels=labels,
                                    y_labels=self.key_labels, cols=False, backend=backend)
            lse = torch.where(valid[:, None], lse.view(step, n), neg_inf)
            total = _logsumexp0(torch.cat([total[None, :], lse]))
            return total, total.new_zeros(())

        if _scan is None:  # pragma: no cover - torch without scan: a Python loop (recompiles per N)
            total = neg_inf.expand(n)
            for b in range(blocks):
                total, _ = block(total, prefixes[b])
            return total
        total, _ = _scan(block, neg_inf.expand(n).contiguous(), prefixes)
        return total

    def backward(self, anchor, others, grad, total, acc_anchor, acc_others, scale_arg, backend):
        dt, n = self.dtype, self.n
        g = _upstream(grad, total)
        finite_total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
        accs = [acc_anchor, *acc_others]
        with torch.enable_grad():
            leaves = [t.detach().to(dt).requires_grad_(a is not None) for t, a in zip([anchor, *others], accs)]
        dscale = None
        for q0, q1 in self.blocks():
            with torch.enable_grad():
                rows, marks = self.rows(leaves[0], leaves[1:-1], q0, q1)
                lse, _ = similarity_lse(rows, leaves[-1], scale_arg, cols=False, backend=backend, **marks)
                with torch.no_grad():
                    block = lse.view(q1 - q0, n)
                    weight = torch.exp(block - finite_total) * g
                    weight = torch.where(torch.isfinite(block), weight, torch.zeros_like(weight))
                got = iter(torch.autograd.grad(lse, _wanted(*leaves, scale_arg), weight.reshape(-1),
                                               allow_unused=True))
            for leaf, acc in zip(leaves, accs):
                if leaf.requires_grad:
                    d = next(got)
                    if d is not None:
                        acc += d
            if isinstance(scale_arg, Tensor) and scale_arg.requires_grad:
                d = next(got)
                dscale = d if dscale is None else dscale + d
        return dscale


# ============================================================================ §10 TCL


def tcl_loss(
    image_features: Tensor,
    text_features: Tensor,
    image_features_m: Tensor,
    text_features_m: Tensor,
    temperature,
    *,
    image_queue: Optional[Tensor] = None,
    text_queue: Optional[Tensor] = None,
    image_locals_m: Optional[Tensor] = None,
    text_locals_m: Optional[Tensor] = None,
    image_local_mask: Optional[Tensor] = None,
    text_local_mask: Optional[Tensor] = None,
    alpha: float = 0.4,
    weights: Optional[Mapping] = None,
    return_terms: bool = False,
    check_finite: bool = False,
    backend: str = "auto",
):
    """Triple contrastive loss (TCL, CVPR 2022) of one step (docs/losses.md §10).

    Inputs (all used as given; TCL L2-normalises global and local features in the model):
        image_features v, text_features t: (B, D) online global features (receive gradients).
        image_features_m v̄, text_features_m t̄: (B, D) momentum global features (no gradient).
        temperature: τ (a divisor), positive float or 0-d tensor (gradient flows when it requires
            grad; the TripleContrastiveLoss module holds it as a parameter clamped to [0.001, 0.5]).
        image_queue Q_v, text_queue Q_t: optional (K, D) key queues (no gradient); keys are
            ``V̄ = [v̄; Q_v]``, ``T̄ = [t̄; Q_t]`` (never concatenated: batch and queue are scored
            separately and merged). Do not modify them in place before backward.
        image_locals_m, text_locals_m: optional (B, P, D) momentum local features (TCL: pooled
            patch embeddings; text token embeddings after CLS; no gradient). Each enables its
            LMI term.
        image_local_mask, text_local_mask: optional (B, P) bool/integer masks, nonzero = a real
            local (TCL: ``attention_mask[:, 1:]`` for text); padding is excluded everywhere.
        alpha: α in [0, 1], the soft-target weight of CMA (TCL: 0.4; the module lets forward
            override it for warm-up, as TCL's ``alpha`` argument).
        weights: optional mapping from term names ("i2t", "t2i", "i2i", "t2t", "lmi_v",
            "lmi_t") to floats; unnamed terms keep 1/6 (TCL: the plain average of six terms).
            Terms whose inputs are absent (no locals) contribute nothing.
        return_terms: also return a dict of the unweighted terms present.
        check_finite: raise ValueError naming the first input (features, queues, locals,
            temperature) that holds NaN or Inf (a host synchronisation on GPUs; skipped while
            compiling). Otherwise NaN/Inf propagate to the loss as in torch.

    Terms (each a mean over the B anchors):
        CMA i2t: ``−Σ_j q_ij·log softmax_j(v_i·T̄ᵀ/τ)`` with
            ``q = α·softmax(v̄_i·T̄ᵀ/τ) + (1−α)·onehot(i)``; t2i the mirror (t against V̄,
            teacher t̄). Computed as ``softplus(LSE_{j≠i} L_ij − L_ii) + α·(L_ii − Σ_j p̄_ij L_ij)``
            with ``p̄_i = softmax(v̄_i·T̄ᵀ/τ)``; ``Σ_j p̄_ij L_ij`` comes from the cross-entropy
            primitive (``similarity_kl``) per key set, batch and queue, merged by the teacher's
            mass on each (no N×M soft-target matrix, no autograd call inside the forward).
        IMC i2i: InfoNCE of v against V̄ with positive v̄_i; t2t: t against T̄ with positive t̄_i.
        LMI (per modality): for local k of sample i, ``softplus(Λ_i − ⟨g_i, l̄_ik⟩/τ)`` with
            ``Λ_i = LSE`` of g_i against every real local of the other samples; mean over the
            real locals of a sample, then over samples that have one.

    Returns the fp32 (fp64 for fp64 inputs) loss, or ``(loss, terms)``. Memory O((B+K)·D) plus
    the backend's workspace (plus one copy of the real locals when a mask is given; with a mask
    the number of real locals is read on the host). Compute ≈ 12 B×(B+K) GEMM-equivalents for
    the four hard terms (3 each), ≈ 6 more per direction for the soft targets (the teacher's
    LSE and the cross-entropy primitive, forward and backward), 3 more per LMI term.
    Works under ``torch.no_grad()``, ``torch.inference_mode()`` and ``torch.compile(fullgraph=True)``
    (except with a local mask: the number of real locals is a data-dependent shape).
    """
    v, t = V.prepare_features("image_features", image_features, "text_features", text_features)
    V.check_same_shape("image_features", v, "text_features", t)
    b, d = v.shape
    device = v.device
    named = {"image_features_m": image_features_m, "text_features_m": text_features_m}
    for name, feat in named.items():
        V.check_features(name, feat)
        V.check_same_device(("image_features", v), (name, feat))
        if tuple(feat.shape) != (b, d):
            raise ValueError(f"{name} must have shape ({b}, {d}) like image_features, got {tuple(feat.shape)}")
    queues = {}
    for name, queue in (("image_queue", image_queue), ("text_queue", text_queue)):
        if queue is None:
            continue
        V.check_features(name, queue, min_rows=0)
        V.check_same_device(("image_features", v), (name, queue))
        V.check_same_dim("image_features", v, name, queue)
        if queue.shape[0] > 0:
            queues[name] = queue
    local_sets = {}
    for tag, feats, mask, fname, mname in (
        ("v", image_locals_m, image_local_mask, "image_locals_m", "image_local_mask"),
        ("t", text_locals_m, text_local_mask, "text_locals_m", "text_local_mask"),
    ):
        if feats is None:
            if mask is not None:
                raise ValueError(f"{mname} is given without {fname}")
            continue
        V.check_features(fname, feats, ndim=3)
        V.check_same_device(("image_features", v), (fname, feats))
        if feats.shape[0] != b or feats.shape[2] != d:
            raise ValueError(f"{fname} must have shape ({b}, P, {d}), got {tuple(feats.shape)}")
        if mask is not None:
            _check_local_mask(mname, mask, feats.shape[:2], device)
        local_sets[tag] = (feats, mask)
    alpha = V.check_fraction("alpha", alpha, upper_open=False)
    term_weights = _tcl_weights(weights)
    V.check_bool("return_terms", return_terms)

    everything = [v, t, image_features_m, text_features_m, *queues.values()]
    everything += [f for f, _ in local_sets.values()]
    dtype = _common_dtype(everything)
    v, t = v.to(dtype), t.to(dtype)
    v_m, t_m = image_features_m.detach().to(dtype), text_features_m.detach().to(dtype)
    q_v = queues["image_queue"].detach().to(dtype) if "image_queue" in queues else None
    q_t = queues["text_queue"].detach().to(dtype) if "text_queue" in queues else None
    dt = compute_dtype(v)
    # τ divides the logits: τ and 1/τ must be finite and nonzero in the compute dtype (τ = 1e-39
    # is a valid double, but in fp32 a subnormal whose reciprocal overflows to inf).
    temperature = V.check_scalar("temperature", temperature, device=device, positive=True, dtype=dt,
                                 reciprocal=True)
    if V.check_bool("check_finite", check_finite):
        V.check_all_finite(("image_features", image_features), ("text_features", text_features),
                           ("image_features_m", image_features_m), ("text_features_m", text_features_m),
                           ("image_queue", image_queue), ("text_queue", text_queue),
                           ("image_locals_m", image_locals_m), ("text_locals_m", text_locals_m),
                           ("temperature", temperature if isinstance(temperature, Tensor) else None))

    if isinstance(temperature, Tensor):
        tau = temperature.to(device=device, dtype=dt)
        s = 1.0 / tau
        s_det = s.detach()
    else:
        s = s_det = 1.0 / float(temperature)

    # Row LSEs over the negatives of each anchor (positive excluded: softplus form), and their
    # batch / queue parts.
    neg_i2t, parts_i2t = _negatives_lse(v, t_m, q_t, s, backend)
    neg_t2i, parts_t2i = _negatives_lse(t, v_m, q_v, s, backend)
    neg_i2i, _ = _negatives_lse(v, v_m, q_v, s, backend)
    neg_t2t, _ = _negatives_lse(t, t_m, q_t, s, backend)
    lmi_inputs = {}
    for tag, (feats, mask) in local_sets.items():
        g, locals_m = (v if tag == "v" else t), feats.detach().to(dtype)
        lmi_inputs[tag] = (g, locals_m, mask, _lmi_negatives(g, locals_m, mask, s, backend))

    pos_vt = s * rowwise_dot(v, t_m)
    pos_tv = s * rowwise_dot(t, v_m)
    i2t = softplus(neg_i2t - pos_vt)
    t2i = softplus(neg_t2i - pos_tv)
    if alpha > 0:
        # Soft targets: −Σ_j q_ij log p_ij = (1−α)·CE(onehot) + α·CE(teacher), and
        # CE(teacher) − CE(onehot) = L_ii − Σ_j p̄_ij L_ij.
        i2t = i2t + alpha * (pos_vt - _teacher_weighted_logit(v, v_m, t_m, q_t, s, s_det, pos_vt, parts_i2t, backend))
        t2i = t2i + alpha * (pos_tv - _teacher_weighted_logit(t, t_m, v_m, q_v, s, s_det, pos_tv, parts_t2i, backend))
    terms = {
        "i2t": i2t.mean(),
        "t2i": t2i.mean(),
        "i2i": softplus(neg_i2i - s * rowwise_dot(v, v_m)).mean(),
        "t2t": softplus(neg_t2t - s * rowwise_dot(t, t_m)).mean(),
    }
    for tag, (g, locals_m, mask, lam) in lmi_inputs.items():
        terms[f"lmi_{tag}"] = _lmi_term(g, locals_m, mask, lam, s)
    loss = None
    for name, value in terms.items():
        part = term_weights[name] * value
        loss = part if loss is None else loss + part
    return (loss, terms) if return_terms else loss


def _tcl_weights(weights) -> dict:
    out = {name: 1.0 / 6.0 for name in TCL_TERMS}
    if weights is None:
        return out
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping from term names to floats, got {type(weights).__name__}")
    for name, value in weights.items():
        if name not in out:
            raise ValueError(f"weights has an unknown term {name!r}; terms are {list(TCL_TERMS)}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"weights[{name!r}] must be a float, got {type(value).__name__}")
        # (compiled modules pass floats dynamo may trace as symbolic: checked when built)
        if not torch.compiler.is_compiling() and not math.isfinite(value):
            raise ValueError(f"weights[{name!r}] must be finite, got {value}")
        out[name] = value if torch.compiler.is_compiling() else float(value)
    return out


def _check_local_mask(name: str, mask, shape, device) -> None:
    V.check_tensor(name, mask)
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{name} must be a bool or integer tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the features are on {device}")


def _negatives_lse(anchors: Tensor, batch_keys: Tensor, queue: Optional[Tensor], s, backend: str):
    """(B,) LSE over [batch_keys; queue] without the positive batch_keys[i], and its parts:
    [batch without the positive, queue (when given)]."""
    parts = [similarity_lse(anchors, batch_keys, s, exclude="diagonal", cols=False, backend=backend)[0]]
    if queue is not None:
        parts.append(similarity_lse(anchors, queue, s, cols=False, backend=backend)[0])
    return _lse_merge(parts), parts


def _teacher_weighted_logit(anchors: Tensor, teachers: Tensor, batch_keys: Tensor, queue: Optional[Tensor], s,
                            s_det, positive: Tensor, negative_parts: Sequence[Tensor], backend: str) -> Tensor:
    """(B,) ``Σ_j p̄_ij L_ij``: the student logits ``L_ij = s·⟨a_i, k_j⟩`` averaged under the
    teacher's softmax ``p̄_i = softmax_j(s̄·⟨ā_i, k_j⟩)`` over the keys [batch_keys; queue].

    Per key set S (batch, queue) the cross-entropy primitive gives
    ``H_S(p̄^S, p^S) = LSE_S(L_i) − Σ_{j∈S} p̄^S_ij L_ij`` (p̄^S, p^S: softmaxes within S), and
    the teacher's mass on S is ``w_S = softmax over sets of LSE_S(L̄_i)`` (a sigmoid of the
    difference for two sets, which stays exact when one set dominates). So
    ``Σ_j p̄_ij L_ij = Σ_S w_S·(LSE_S(L_i) − H_S)``, with gradient ``s·Σ_j p̄_ij k_j`` (the
    teacher's key average) from the primitives' own backward: no autograd call inside the
    forward, so it also runs under torch.compile and inference mode. The student LSEs are the
    negatives' parts already computed (the batch part without the positive, merged with it).
    """
    keys = [batch_keys] + ([queue] if queue is not None else [])
    student = [torch.logaddexp(negative_parts[0], positive)] + list(negative_parts[1:])
    averaged = [lse - similarity_kl(anchors, k, teachers, k, s, s_det, cols=False, cross_entropy=True,
                                    backend=backend)[0] for lse, k in zip(student, keys)]
    if len(keys) == 1:
        return averaged[0]
    with torch.no_grad():
        t_batch, t_queue = (similarity_lse(teachers, k, s_det, cols=False, backend=backend)[0] for k in keys)
        w_batch = torch.sigmoid(t_batch - t_queue)
        w_queue = torch.sigmoid(t_queue - t_batch)
    return w_batch * averaged[0] + w_queue * averaged[1]


def _lmi_negatives(g: Tensor, locals_m: Tensor, mask: Optional[Tensor], s, backend: str) -> Tensor:
    """(B,) Λ_i: LSE of g_i against the real locals of every other sample."""
    b, p, d = locals_m.shape
    flat = locals_m.reshape(b * p, d)
    owner = torch.arange(b, device=g.device).repeat_interleave(p)
    if mask is not None:
        keep = mask.reshape(-1) != 0
        flat, owner = flat[keep], owner[keep]
        if flat.shape[0] == 0:  # only padding: no sample has a negative (nor a term)
            return torch.full((b,), float("-inf"), dtype=compute_dtype(g), device=g.device)
    lse, _ = similarity_lse(g, flat, s, exclude="same_label", x_labels=torch.arange(b, device=g.device),
                            y_labels=owner, cols=False, backend=backend)
    return lse


def _lmi_term(g: Tensor, locals_m: Tensor, mask: Optional[Tensor], lam: Tensor, s) -> Tensor:
    """Mean over samples (with a real local) of the mean over real locals of softplus(Λ_i − a_ik)."""
    positive = s * _LocalDots.apply(g, locals_m)                     # (B, P)
    per_local = softplus(lam[:, None] - positive)
    if mask is None:
        return per_local.mean()
    real = (mask != 0).to(per_local.dtype)
    count = real.sum(dim=1)
    has = count > 0
    per_sample = (per_local * real).sum(dim=1) / torch.where(has, count, torch.ones_like(count))
    samples = has.to(per_local.dtype).sum()
    return per_sample.sum() / torch.clamp(samples, min=1.0)


class _LocalDots(torch.autograd.Function):
    """(B, P) ``⟨g_i, l_ik⟩`` in the compute dtype, upcasting bounded chunks of samples.

    The locals are momentum features: only ``g`` receives a gradient.
    """

    @staticmethod
    def forward(ctx, g, locals_m):
        ctx.save_for_backward(g, locals_m)
        dt = compute_dtype(g)
        b, p, d = locals_m.shape
        out = torch.empty(b, p, dtype=dt, device=g.device)
        for i0, i1 in _sample_chunks(b, p * d):
            out[i0:i1] = torch.bmm(as_compute(locals_m[i0:i1], dt), as_compute(g[i0:i1], dt)[:, :, None])[:, :, 0]
        return out

    @staticmethod
    def backward(ctx, grad):
        g, locals_m = ctx.saved_tensors
        dt = grad.dtype
        b, p, d = locals_m.shape
        if not ctx.needs_input_grad[0]:
            return None, None
        dg = torch.empty(b, d, dtype=dt, device=g.device)
        for i0, i1 in _sample_chunks(b, p * d):
            dg[i0:i1] = torch.bmm(grad[i0:i1, None, :], as_compute(locals_m[i0:i1], dt))[:, 0, :]
        return dg.to(g.dtype), None


def _sample_chunks(rows: int, per_row: int):
    if torch.compiler.is_compiling():
        # A loop over N-dependent chunks would specialise on the batch size (a recompile per
        # size); compiled code upcasts all samples at once (the compiler may fuse the cast).
        yield 0, rows
        return
    step = max(1, _LOCAL_CHUNK_ELEMENTS // max(1, per_row))
    for i0 in range(0, rows, step):
        yield i0, min(rows, i0 + step)


# ============================================================================ §11 iSogCLR


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
    bimodal: bool = False,
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
        bimodal: False → unimodal (2N−2 negatives per anchor: both views minus self and
            positive; one state per sample shared by both views, u averaged over the views as
            LibAUC does); True → bimodal (N−1 negatives, each side its own τ, u).
        rho, tau_min, tau_max: None → LibAUC defaults (unimodal 0.3, [0.05, 0.7]; bimodal 6.0,
            [0.005, 0.05]). gamma, beta, eta: moving-average, momentum and τ step (0.9, 0.9, 0.01).
            ``1/tau_min`` must be finite in the compute dtype (temperatures divide the logits).
        form: "libauc" (default, the code) or "paper" (docs/losses.md's formulas):
            - unimodal "libauc": u tracks mean_z exp(sim/τ) (GCLoss_v1), surrogate gradient
              ``Σ_z exp(ℓ_z/τ)/(max(u, 1e-8)·|Z|)·∇ℓ_z − ∇ℓ⁺``;
            - bimodal "libauc": u tracks mean_z exp(h/τ) with ``h = sim − sim⁺``, clamped at
              ``1e-20·e^b``; surrogate gradient ``Σ_z exp(h_z/τ)/u·∇h_z`` (GCLoss_v2: no 1/|Z|);
            - "paper": h-based u, no clamps, ``Σ_z exp(h_z/τ)/(u·|Z|)·∇h_z`` for both.
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
    """
    _require_autograd("isogclr_loss")
    x, y = V.prepare_features("features_a", features_a, "features_b", features_b)
    V.check_same_shape("features_a", x, "features_b", y)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"isogclr_loss needs at least 2 rows (negatives), got features of shape {tuple(x.shape)}")
    V.check_bool("bimodal", bimodal)
    V.check_choice("form", form, ISOGCLR_FORMS)
    V.check_bool("update_state", update_state)
    V.check_bool("check_finite", check_finite)
    rho, gamma, beta, eta, tau_min, tau_max = isogclr_hyperparameters(
        bimodal, rho=rho, gamma=gamma, beta=beta, eta=eta, tau_min=tau_min, tau_max=tau_max
    )
    device, dt = x.device, compute_dtype(x)
    V.check_scalar("tau_min", tau_min, positive=True, dtype=dt, reciprocal=True)
    sides = 2 if bimodal else 1
    size = _check_isogclr_state(log_u, tau, tau_momentum, seen, sides)
    clamp_state = form == "libauc" and bimodal
    clamp_weights = form == "libauc" and not bimodal
    if clamp_state:
        if running_max is None:
            raise ValueError("isogclr_loss(bimodal=True, form='libauc') needs the running_max state")
        _check_state_tensor("running_max", running_max, size, sides, log_u)
    state_index, index_valid = _checked_index(index, n, size, log_u.device)
    if check_finite:
        V.check_all_finite(("features_a", features_a), ("features_b", features_b))

    with torch.no_grad():
        tau_rows = tau.index_select(0, state_index).to(device=device, dtype=dt)          # (N, sides)
        log_u_old = log_u.index_select(0, state_index).to(device=device, dtype=dt)
        momentum_old = tau_momentum.index_select(0, state_index).to(device=device, dtype=dt)
        first = ~seen.index_select(0, state_index).to(device)
        max_old = running_max.index_select(0, state_index).to(device=device, dtype=dt) if clamp_state else None

    if bimodal:
        groups = [(x, [y], 0), (y, [x], 1)]
        negatives = n - 1
    else:
        groups = [(x, [y, x], 0), (y, [x, y], 0)]
        negatives = 2 * (n - 1)
    h_based = bimodal or form == "paper"
    track = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    positive = rowwise_dot(x, y)                                  # sim⁺_i, shared by every group
    positive_value = positive.detach()
    log_neg = math.log(negatives)
    log_keep = math.log1p(-gamma) if gamma < 1.0 else float("-inf")
    log_gamma = math.log(gamma)
    zero = torch.zeros((), dtype=dt, device=device)

    terms, new_log_u, grads_tau, new_max = [], [], [], []
    for anchors, keys, side in groups:
        tau_g = tau_rows[:, side]
        scale = (1.0 / tau_g).detach()
        lse, mean_sim = _negatives_lse_and_mean(anchors, keys, scale, backend)
        shift = scale * positive_value if h_based else 0.0
        log_g = lse - log_neg - shift                             # log g_i, of the size of the logits
        # log(g/u_new) from the difference log u_old − log g, not as log g − log u_new: both are
        # of the size of the logits (|h|/τ, thousands at τ = 0.005), and their difference rounded
        # at that size would put an error of |h/τ|·2⁻²⁴ on every weight g/u.
        # u_new = (1−γ)·u_old + γ·g  ⇒  g/u_new = 1 / (γ + (1−γ)·u_old/g); first visit: u = g.
        log_ratio = torch.where(first, zero, -torch.logaddexp(
            torch.full((), log_gamma, dtype=dt, device=device), log_keep + (log_u_old[:, side] - log_g)))
        log_u_new = log_g - log_ratio
        if clamp_state:
            # b ← max(b, max_j h_ij/τ_i) over every column (the diagonal's h = 0 included);
            # u ≥ 1e-20·e^b, so g/u ≤ g·e^{−b}/1e-20.
            top, _ = similarity_topk(anchors, keys[0], 1)
            b_new = torch.maximum(max_old[:, side], (top[:, 0] - positive_value) * scale)
            floor = _LOG_EPS_BIMODAL + b_new
            log_ratio = torch.minimum(log_ratio, log_g - floor)
            log_u_new = torch.maximum(log_u_new, floor)
            new_max.append(b_new)
        if clamp_weights:
            log_ratio = torch.minimum(log_ratio, log_g - _LOG_EPS_UNIMODAL)  # weights use max(u, 1e-8)
        ratio = torch.exp(log_ratio)                              # g_i / u_i
        relative = mean_sim - positive_value if h_based else mean_sim
        grads_tau.append(log_u_new + rho - ratio * relative * scale)
        new_log_u.append(log_u_new)
        if form == "libauc" and not bimodal:
            coef_lse, coef_pos = ratio, 1.0
        elif form == "libauc":
            coef_lse = coef_pos = negatives * ratio
        else:
            coef_lse = coef_pos = ratio
        value = coef_lse * mean_sim
        if track:
            live = _lse_merge([similarity_lse(anchors, k, scale, exclude="diagonal", cols=False, backend=backend)[0]
                               for k in keys])
            value = value + coef_lse * tau_g * (live - live.detach())
        terms.append(value - coef_pos * (positive if track else positive_value))

    loss = (terms[0] + terms[1]).mean() if not bimodal else 0.5 * (terms[0].mean() + terms[1].mean())

    with torch.no_grad():
        if bimodal:
            log_u_state = torch.stack(new_log_u, dim=1)
            grad_tau = torch.stack(grads_tau, dim=1)
        else:
            log_u_state = (torch.logaddexp(new_log_u[0], new_log_u[1]) - math.log(2.0))[:, None]
            grad_tau = (0.5 * (grads_tau[0] + grads_tau[1]))[:, None]
        momentum_new = (1.0 - beta) * momentum_old + beta * grad_tau
        tau_new = torch.clamp(tau_rows - eta * momentum_new, tau_min, tau_max)
        per_sample = tau_rows * log_u_state + tau_rows * rho
        if not bimodal and form == "libauc":
            per_sample = per_sample - positive_value[:, None]
        objective = per_sample.mean(dim=0).sum()
        if update_state:
            updates = {"log_u": (log_u, log_u_state), "tau": (tau, tau_new),
                       "tau_momentum": (tau_momentum, momentum_new)}
            if clamp_state:
                updates["running_max"] = (running_max, torch.stack(new_max, dim=1))
            _write_state(updates, seen, state_index, index_valid,
                         (("features_a", features_a), ("features_b", features_b)))
    return loss, objective


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


def _first_occurrence(index: Tensor) -> Tensor:
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
    leader = _first_occurrence(state_index)
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


def isogclr_hyperparameters(bimodal: bool, *, rho=None, gamma=0.9, beta=0.9, eta=0.01, tau_min=None, tau_max=None):
    """Validated (rho, gamma, beta, eta, tau_min, tau_max), None → LibAUC's default for the mode."""
    defaults = ISOGCLR_DEFAULTS[bool(bimodal)]
    rho = defaults["rho"] if rho is None else rho
    tau_min = defaults["tau_min"] if tau_min is None else tau_min
    tau_max = defaults["tau_max"] if tau_max is None else tau_max
    values = {"rho": rho, "gamma": gamma, "beta": beta, "eta": eta, "tau_min": tau_min, "tau_max": tau_max}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
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
        lse = _lse_merge([similarity_lse(anchors.detach(), k.detach(), leaf, exclude="diagonal", cols=False,
                                         backend=backend)[0] for k in keys])
        (mean_sim,) = torch.autograd.grad(lse.sum(), leaf)
    return lse.detach(), mean_sim
