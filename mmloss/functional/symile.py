"""§9 Symile (docs/losses.md): the multilinear inner product of K ≥ 2 modalities.

``symile_loss`` composes ``similarity_lse`` with O(K·N·D) torch ops; no N×N tensor and, for
"n_squared", no N^{K−1}×D candidate table is ever built. In eager mode the custom autograd
function ``_SymileNegatives`` recomputes what it would otherwise save (the shuffled keys and
candidate blocks), so saved memory stays O(K·N·D). Under ``torch.compile`` it is replaced by
plain autograd compositions the compiler can trace (inner ``autograd.grad`` calls are not
traceable): "n" saves its K shuffled key matrices, "n_squared" with K ≥ 3 loops over candidate
blocks with ``torch._higher_order_ops.scan`` (a symbolic trip count, so varying batch sizes do
not recompile).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from .. import _validation as V
from .. import distributed as D
from ..ops import similarity_lse
from ._common import as_compute, compute_dtype, reduce, scale_as, softplus
from .logsumexp import merge_lse, stacked_logsumexp

try:  # loops with a symbolic trip count under torch.compile (Symile "n_squared", K ≥ 3)
    from torch._higher_order_ops.scan import scan as _scan
except ImportError:  # pragma: no cover - older torch
    _scan = None

Tensor = torch.Tensor

__all__ = ["symile_loss"]

SYMILE_SAMPLING = ("n", "n_squared")

# "n_squared": candidate prefixes per streamed block. A block holds _PREFIX_BLOCK·N rows of D
# features, so memory stays O(N·D) for every K.
_PREFIX_BLOCK = 8


def symile_loss(
    representations,
    logit_scale,
    negative_sampling: str = "n",
    generator: Optional[torch.Generator] = None,
    *,
    reduction: str = "mean",
    check_finite: bool = False,
    backend: str = "auto",
    distributed=None,
    group=None,
    uniform_shards: bool = False,
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
        distributed: None (default: the loss of the given tensors) | "auto" (gather when a
            process group of world size > 1 is initialised; a collective call) | "gather" |
            "ring" (no ring form: ValueError). Gathered, the rows of every rank form the global
            batch (rank order; every modality shares the row layout) and each rank scores its
            local anchors against candidates built from the gathered modalities, so both
            samplings are exact: "n" draws its K·(K−1) permutations of the global N on every
            rank and uses those of the group's first rank (one broadcast of K·(K−1)·N integers),
            hence the loss of a single process on the global batch whose generator is in rank
            0's state; "n_squared" streams all N_global^{K−1} tuples (this rank's share of the
            work: N_local·N_global^{K−1}·D). The value is the global loss on every rank, the
            gradient W × this rank's share (``mmloss.distributed``); a tensor ``logit_scale``
            gets the global gradient on every rank. "sum": the global sum; "none": this rank's
            (N_local,) terms, gradient × W.
        group: the process group (default: the world). uniform_shards: every rank holds the same
            N (skips the exchange of sizes, D and dtype).

    Returns fp32 (fp64 for fp64 inputs). Gradients reach every modality and ``logit_scale``.
    Memory: O(K·N·D) plus the backend's workspace — shuffled keys and candidate blocks are
    rebuilt in backward, never saved; every modality's gradient accumulates in one buffer
    (gathered: the K gathered modalities and their gradient buffers, O(K·N_global·D)).
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
    k_count = len(reps)
    # Anchors are this rank's rows; candidates are built from the global modalities (the
    # anchors themselves in a single process). Row i's positive tuple is candidate offset + i.
    candidates, offset = reps, 0
    comm = None
    uniform_shards = V.check_bool("uniform_shards", uniform_shards)
    if D.resolve_mode("symile_loss", distributed, group) == "gather":
        comm = D.Exchange.open("symile_loss", group, uniform_shards,
                               **{f"representations[{k}]": r for k, r in enumerate(reps)})
        offset = comm.shards["representations[0]"].offset
        logit_scale = comm.scalar(logit_scale)
        candidates = [comm.gather(f"representations[{k}]", r) for k, r in enumerate(reps)]
    n_keys = candidates[0].shape[0]
    s = scale_as(logit_scale, dt, device)

    # MIP(x_i, y_i, …) is the positive of every anchor modality: computed once.
    positive = s * _MultilinearDot.apply(*reps)
    if negative_sampling == "n_squared" and k_count == 2:
        # Candidates are the other modality's rows: the two anchors are the rows and columns of
        # one N×N problem (CLIP's layout); gathered, each anchor's rows against the other side.
        if comm is None:
            row, col = similarity_lse(reps[0], reps[1], logit_scale, exclude="diagonal", backend=backend)
        else:
            row, col = (similarity_lse(reps[k], candidates[1 - k], logit_scale, exclude="diagonal", offset=offset,
                                       cols=False, backend=backend)[0] for k in (0, 1))
        lses = torch.stack([row, col])
    else:
        if negative_sampling == "n":
            perms = _draw_permutations(k_count, n_keys, generator, draw_device, device)
            if comm is not None:
                perms = _shared_draws(perms, comm.group)
            plans = [_ShuffledNegatives(tuple(p), dt, offset) for p in perms]
        else:
            plans = [_TupleNegatives(n, n_keys, None if comm is None else offset, k_count - 2, dt, device)
                     for _ in range(k_count)]
        if torch.compiler.is_compiling():
            # Inner autograd.grad calls (the custom Function's backward) are not traceable.
            lses = torch.stack([plan.traced(reps[k], candidates[:k] + candidates[k + 1:], logit_scale, backend)
                                for k, plan in enumerate(plans)])
        else:
            scale_t, scale_v = _split_scale(logit_scale)
            distinct = () if comm is None else tuple(candidates)
            lses = _SymileNegatives.apply(tuple(plans), backend, scale_v, scale_t, k_count, *reps, *distinct)
    terms = softplus(lses - positive[None, :]).mean(dim=0)
    if comm is not None:
        return comm.finish(terms, reduction, anchors="representations[0]")
    return reduce(terms, reduction)


def _draw_permutations(k_count: int, n: int, generator, draw_device, device) -> Tensor:
    """(K, K−1, n) int64: per anchor (in order), one ``randperm(n)`` per other modality (in order)."""
    # generator=None is not passed on: under torch.compile an explicit generator=None makes
    # randperm specialise on N (a recompile per batch size).
    draw = {"device": draw_device} if generator is None else {"device": draw_device, "generator": generator}
    return torch.stack([torch.stack([torch.randperm(n, **draw).to(device) for _ in range(k_count - 1)])
                        for _ in range(k_count)])


def _shared_draws(perms: Tensor, group) -> Tensor:
    """The permutations drawn by the group's first rank, on every rank (one broadcast): the
    global batch's negatives must be the same tuples whichever rank scores the anchor."""
    dist = torch.distributed
    source = 0 if group is None else dist.get_global_rank(group, 0)
    perms = perms.contiguous()
    dist.broadcast(perms, src=source, group=group)
    return perms


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
    dtype = V.common_dtype(*reps)
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
    ``tensors``: the K anchor modalities, followed (gathered) by the K modalities candidates
    are built from; without them the anchors are the candidates and share their buffers.
    """

    @staticmethod
    def forward(ctx, plans, backend, scale_value, scale, k_count, *tensors):
        anchors, candidates = _anchors_and_candidates(tensors, k_count)
        scale_arg = scale if scale is not None else scale_value
        lses = torch.stack([plan.forward(anchors[k], candidates[:k] + candidates[k + 1:], scale_arg, backend)
                            for k, plan in enumerate(plans)])
        ctx.plans, ctx.backend, ctx.scale_value, ctx.k_count = plans, backend, scale_value, k_count
        ctx.save_for_backward(scale, lses, *tensors)
        return lses

    @staticmethod
    def backward(ctx, grad):
        scale, lses, *tensors = ctx.saved_tensors
        need_scale, needs = ctx.needs_input_grad[3], ctx.needs_input_grad[5:]
        dt = lses.dtype
        acc = [torch.zeros(t.shape, dtype=dt, device=t.device) if need else None for t, need in zip(tensors, needs)]
        anchors, candidates = _anchors_and_candidates(tensors, ctx.k_count)
        acc_anchors, acc_candidates = _anchors_and_candidates(acc, ctx.k_count)
        if scale is None:
            scale_arg = ctx.scale_value
        else:
            scale_arg = scale.detach().requires_grad_(need_scale)
        dscale = None
        for k, plan in enumerate(ctx.plans):
            rest = [m for m in range(ctx.k_count) if m != k]
            ds = plan.backward(anchors[k], [candidates[m] for m in rest], grad[k], lses[k], acc_anchors[k],
                               [acc_candidates[m] for m in rest], scale_arg, ctx.backend)
            if ds is not None:
                dscale = ds if dscale is None else dscale + ds
        grads = [None if a is None else a.to(t.dtype) for a, t in zip(acc, tensors)]
        return (None, None, None, dscale, None, *grads)


def _anchors_and_candidates(items, k_count: int):
    """(anchors, candidates) of ``_SymileNegatives``'s tensor list (or of its buffers)."""
    items = list(items)
    return items[:k_count], (items[k_count:] if len(items) > k_count else items[:k_count])


def _upstream(grad: Tensor, total: Tensor) -> Tensor:
    """The upstream gradient of a row LSE, zero where the row has no negative (LSE = −inf)."""
    return torch.where(torch.isfinite(total), grad.to(total.dtype), torch.zeros((), dtype=total.dtype,
                                                                                device=total.device))


def _wanted(*leaves):
    return [t for t in leaves if isinstance(t, Tensor) and t.requires_grad]


class _ShuffledNegatives:
    """Symile "n" for one anchor: keys ``S = Π_m r_m[π_m]`` (N, D); row i's negatives are S_j, j ≠ i
    (gathered: the anchor's row i is global row ``offset + i`` of the N_global keys)."""

    def __init__(self, perms, dtype, offset: int = 0):
        self.perms, self.dtype, self.offset = perms, dtype, offset

    def forward(self, anchor, others, scale_arg, backend):
        keys = _gathered_product(others, self.perms, self.dtype)
        return similarity_lse(anchor, keys, scale_arg, exclude="diagonal", offset=self.offset, cols=False,
                              backend=backend)[0]

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
                lse, _ = similarity_lse(rows, keys, scale_arg, exclude="diagonal", offset=self.offset + r0,
                                        cols=False, backend=backend)
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
    primitive, in blocks of _PREFIX_BLOCK prefixes merged online. Only the positive
    tuple is excluded: row i of prefix q drops key i when every digit of q is i, i.e.
    ``q == i·(1 + N + … + N^{K−3})``. Backward rebuilds each block under autograd and weights
    its row LSEs by ``g_i·exp(lse_block − lse_i)`` (the chain rule through the merge).
    Gathered, the anchor holds ``n`` local rows (global rows ``offset + i``) and the other
    modalities ``n_keys`` global rows: digits and keys run over ``n_keys`` (``offset=None``:
    one process, anchor rows = key rows).
    """

    def __init__(self, n: int, n_keys: int, offset: Optional[int], prefix_modalities: int, dtype, device):
        self.n, self.n_keys, self.depth, self.dtype, self.device = n, n_keys, prefix_modalities, dtype, device
        self.count = n_keys ** prefix_modalities
        self.diagonal_step = sum(n_keys ** t for t in range(prefix_modalities))
        self.key_labels = torch.arange(n_keys, device=device)
        # offset None: the anchor's rows are the keys' rows (one process).
        self.anchor_ids = self.key_labels if offset is None else torch.arange(offset, offset + n, device=device)

    def _marks(self, q: Tensor) -> Tensor:
        """(b·n,) label of each row of prefixes ``q``: the anchor's global id where the prefix is
        all that id's digits (its positive tuple is then key ``id``), else −1 (nothing excluded)."""
        own = self.anchor_ids[None, :]
        return torch.where(q[:, None] == own * self.diagonal_step, own, torch.full_like(own, -1)).reshape(-1)

    def blocks(self):
        for q0 in range(0, self.count, _PREFIX_BLOCK):
            yield q0, min(self.count, q0 + _PREFIX_BLOCK)

    def rows(self, anchor, prefix_mods, q0: int, q1: int):
        """(rows ((q1−q0)·N, D), exclusion kwargs) of prefixes [q0, q1)."""
        n_keys, dt = self.n_keys, self.dtype
        q = torch.arange(q0, q1, device=self.device)
        factors = []
        for m in range(self.depth):
            digit = torch.div(q, n_keys ** (self.depth - 1 - m), rounding_mode="floor") % n_keys
            factors.append(prefix_mods[m].index_select(0, digit).to(dt))
        prefix = _product(factors)                                               # (b, D)
        rows = (anchor.to(dt)[None, :, :] * prefix[:, None, :]).reshape(-1, anchor.shape[1])
        return rows, {"exclude": "same_label", "x_labels": self._marks(q), "y_labels": self.key_labels}

    def forward(self, anchor, others, scale_arg, backend):
        total = None
        for q0, q1 in self.blocks():
            rows, marks = self.rows(anchor, others[:-1], q0, q1)
            lse, _ = similarity_lse(rows, others[-1], scale_arg, cols=False, backend=backend, **marks)
            part = torch.logsumexp(lse.view(q1 - q0, self.n), dim=0)
            total = part if total is None else merge_lse([total, part])
        return total

    def traced(self, anchor, others, scale, backend):
        """The same LSE as plain autograd operations (torch.compile).

        A Python loop over ``ceil(N^{K−2}/8)`` blocks would make dynamo specialise on N (a
        recompile per batch size), so the blocks run in ``torch._higher_order_ops.scan``, whose
        trip count may be symbolic; the last block is padded with prefixes masked to −inf.
        What scan's autograd saves per block is the compiler's choice (not covered by the memory
        bound, which holds for eager mode).
        """
        n, n_keys, depth, step = self.n, self.n_keys, self.depth, _PREFIX_BLOCK
        count = n_keys ** depth
        blocks = (count + step - 1) // step
        prefixes = torch.arange(blocks * step, device=anchor.device).view(blocks, step)
        last = others[-1]
        neg_inf = torch.full((), float("-inf"), dtype=self.dtype, device=anchor.device)

        def block(total, q):
            valid = q < count
            q_real = torch.clamp(q, max=count - 1)
            digits = [torch.div(q_real, n_keys ** (depth - 1 - m), rounding_mode="floor") % n_keys
                      for m in range(depth)]
            prefix = _product([others[m].index_select(0, digit).to(self.dtype) for m, digit in enumerate(digits)])
            rows = (anchor.to(self.dtype)[None, :, :] * prefix[:, None, :]).reshape(-1, anchor.shape[1])
            lse, _ = similarity_lse(rows, last, scale, exclude="same_label", x_labels=self._marks(q),
                                    y_labels=self.key_labels, cols=False, backend=backend)
            lse = torch.where(valid[:, None], lse.view(step, n), neg_inf)
            total = stacked_logsumexp(torch.cat([total[None, :], lse]))
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
