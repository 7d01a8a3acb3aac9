"""§10 TCL, the triple contrastive loss (docs/losses.md): CMA + IMC + LMI terms.

``tcl_loss`` composes the primitives with O((B+K)·D) torch ops; no B×(B+K) tensor is built.
The soft targets of CMA need ``Σ_j p̄_ij L_ij`` under the teacher's softmax: the cross-entropy
primitive ``similarity_kl`` gives it per key set, batch and queue (``_teacher_weighted_logit``),
without an autograd call inside the forward, so the loss also runs under ``torch.compile``
and inference mode.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Optional

import torch

from .. import _validation as V
from ..ops import similarity_kl, similarity_lse
from ._common import as_compute, compute_dtype, rowwise_dot, softplus
from .logsumexp import merge_lse

Tensor = torch.Tensor

__all__ = ["tcl_loss"]

TCL_TERMS = ("i2t", "t2i", "i2i", "t2t", "lmi_v", "lmi_t")

# Element budget of one upcast chunk of the local features (positive logits of LMI).
_LOCAL_CHUNK_ELEMENTS = 1 << 20


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
    No distributed form: the loss of the given (rank-local) tensors; ``TripleContrastiveLoss``
    refuses ``distributed`` modes other than None under a process group.
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
    term_weights = tcl_weights(weights)
    V.check_bool("return_terms", return_terms)

    everything = [v, t, image_features_m, text_features_m, *queues.values()]
    everything += [f for f, _ in local_sets.values()]
    dtype = V.common_dtype(*everything)
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


def tcl_weights(weights) -> dict:
    """Every term name → its weight: ``weights`` (a mapping of finite floats, checked) over the
    default 1/6 each. Shared with TripleContrastiveLoss, which checks its weights once when built."""
    out = {name: 1.0 / 6.0 for name in TCL_TERMS}
    if weights is None:
        return out
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping from term names to floats, got {type(weights).__name__}")
    for name, value in weights.items():
        if name not in out:
            raise ValueError(f"weights has an unknown term {name!r}; terms are {list(TCL_TERMS)}")
        V.check_real(f"weights[{name!r}]", value)
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
    return merge_lse(parts), parts


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
