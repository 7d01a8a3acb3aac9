"""§13 similarity-matrix distillation, §15 score distillation (docs/losses.md); §14 CyCLIP lives
in ``cyclip.py`` and is re-exported here with the rest of the family."""
from __future__ import annotations


import torch

from .. import _validation as V
from .. import distributed as D
from ..ops import BACKEND_CHOICES, similarity_kl, similarity_topk
from ._common import as_compute, compute_dtype, paired_features, softplus
from .clip import clip_loss
from .cyclip import check_weight, cyclip_loss, row_chunks

Tensor = torch.Tensor


def _prepare_pair(name_x: str, x, name_y: str, y, n: int, m: int, who: str):
    """A second (teacher / old-model) feature pair with the same rows as the student's."""
    x, y = V.prepare_features(name_x, x, name_y, y)
    if x.shape[0] != n or y.shape[0] != m:
        raise ValueError(
            f"{who} features must cover the same batch as the student: {name_x} {tuple(x.shape)} and "
            f"{name_y} {tuple(y.shape)} need {n} and {m} rows"
        )
    return x, y


def _gather_pair(comm, names, x: Tensor, y: Tensor, *, constant: bool = False):
    """The global (rank-order) rows of a feature pair exchanged under ``names``; a constant pair
    (teacher, old model) is gathered detached, without a gradient path."""
    if constant:
        x, y = x.detach(), y.detach()
    return comm.gather(names[0], x), comm.gather(names[1], y)


def _kl_rows_and_columns(x, y, x_all, y_all, xt, yt, xt_all, yt_all, s, st, cross_entropy, backend):
    """Gathered ``similarity_kl``: (rows (N_local,), cols (M_local,)) — this rank's images against
    the global texts, and its texts against the global images (the columns of the global
    matrices are the rows of the transposed problem). No B_local × B_global matrix."""
    rows, _ = similarity_kl(x, y_all, xt, yt_all, s, st, cols=False, cross_entropy=cross_entropy, backend=backend)
    cols, _ = similarity_kl(y, x_all, yt, xt_all, s, st, cols=False, cross_entropy=cross_entropy, backend=backend)
    return rows, cols


# ----------------------------------------------------------------------------- §13


def contrastive_distill_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale,
    teacher_image_features: Tensor,
    teacher_text_features: Tensor,
    teacher_logit_scale,
    *,
    cross_entropy: bool = True,
    backend: str = "auto",
    check_finite: bool = False,
    distributed=None,
    group=None,
    uniform_shards: bool = False,
) -> Tensor:
    """Similarity-matrix distillation, open_clip ``DistillClipLoss``'s distillation term
    (docs/losses.md §13): ``½·[mean_i H(p^t_i, p^s_i) + mean_j H(p^t_{·j}, p^s_{·j})]`` with
    ``p^s = softmax(s·x·yᵀ)``, ``p^t = softmax(s_t·x_t·y_tᵀ)`` over rows (image → text) and
    down columns (text → image).

    Args:
        image_features (N, D), text_features (M, D): the student, used as given; N ≠ M is
            allowed (each direction averages over its own anchors).
        logit_scale: the student's scale s (positive float or 0-d tensor; gets a gradient).
        teacher_image_features (N, D_t), teacher_text_features (M, D_t): the teacher; D_t may
            differ from D. teacher_logit_scale: s_t. The teacher is a constant: no gradient
            reaches it (open_clip's trainer computes it under no_grad).
        cross_entropy: True (default, open_clip's code) gives the cross-entropy; False the KL
            divergence KL(p_t‖p_s) (the same gradient; the value is lower by the teacher's
            entropy, and 0 when teacher = student).
        backend: primitive backend ("auto", "torch", "reference", ...).
        check_finite: raise a ValueError naming the tensor when an input holds NaN/Inf (by
            default they propagate, as in torch; a host sync on GPUs).
        distributed: None (default: the loss of the given tensors) | "auto" (gather when a
            process group of world size > 1 is initialised; a collective call) | "gather" |
            "ring" (no ring form: ValueError). Gathered, the rows of every rank form the global
            batch (rank order; images and texts may have different per-rank counts); the
            student and the teacher features are gathered (the teacher without gradient) and
            this rank computes its image rows against the global texts and its texts against
            the global images (``similarity_kl`` rows only). The value is the global loss on
            every rank, the gradient W × this rank's share (``mmloss.distributed``); a tensor
            ``logit_scale`` gets the global gradient on every rank.
        group: the process group (default: the world). uniform_shards: every rank holds the same
            N and M (skips the exchange of sizes, D and dtype).

    Returns an fp32 scalar (fp64 for fp64 inputs). Memory O((N+M)·(D+D_t)) plus the
    ``similarity_kl`` workspace; no N×M tensor (gathered: N and M are the global counts).
    """
    return contrastive_distill_core(
        image_features, text_features, logit_scale, teacher_image_features, teacher_text_features,
        teacher_logit_scale, cross_entropy=cross_entropy, backend=backend, check_finite=check_finite,
        distributed=distributed, group=group, uniform_shards=uniform_shards)


def contrastive_distill_core(image_features, text_features, logit_scale, teacher_image_features,
                             teacher_text_features, teacher_logit_scale, *, cross_entropy=True, backend="auto",
                             check_finite=False, distributed=None, group=None, uniform_shards=False,
                             local_share=False, configured_world_size=1, loss_name="contrastive_distill_loss"):
    """``contrastive_distill_loss`` plus the options only ``DistillClipLoss`` sets (as
    ``clip_loss_core``): ``local_share=True`` is open_clip's ``local_loss=True`` under gathering —
    ½·(mean of this rank's rows + mean of its columns) with its own gradient, no scalar
    all-reduces; ``configured_world_size`` is open_clip's ``world_size`` argument."""
    x, y = V.prepare_features("image_features", image_features, "text_features", text_features)
    xt, yt = _prepare_pair("teacher_image_features", teacher_image_features, "teacher_text_features",
                           teacher_text_features, x.shape[0], y.shape[0], "teacher")
    V.check_same_device(("image_features", x), ("teacher_image_features", xt))
    dt = compute_dtype(x)
    logit_scale = V.check_scalar("logit_scale", logit_scale, device=x.device, positive=True, dtype=dt)
    teacher_logit_scale = V.check_scalar("teacher_logit_scale", teacher_logit_scale, device=x.device,
                                         positive=True, dtype=dt)
    V.check_bool("cross_entropy", cross_entropy)
    if V.check_bool("check_finite", check_finite):
        V.check_all_finite(("image_features", x), ("text_features", y), ("logit_scale", logit_scale),
                           ("teacher_image_features", xt), ("teacher_text_features", yt),
                           ("teacher_logit_scale", teacher_logit_scale))
    uniform_shards = V.check_bool("uniform_shards", uniform_shards)
    if D.resolve_mode(loss_name, distributed, group, configured_world_size) == "gather":
        comm = D.Exchange.open(loss_name, group, uniform_shards,
                               image_features=x, text_features=y, teacher_image_features=xt,
                               teacher_text_features=yt)
        if not local_share:
            logit_scale = comm.scalar(logit_scale)
        x_all, y_all = _gather_pair(comm, ("image_features", "text_features"), x, y)
        xt_all, yt_all = _gather_pair(comm, ("teacher_image_features", "teacher_text_features"), xt, yt,
                                      constant=True)
        rows, cols = _kl_rows_and_columns(x, y, x_all, y_all, xt, yt, xt_all, yt_all, logit_scale,
                                          teacher_logit_scale, cross_entropy, backend)
        if local_share:
            return 0.5 * (rows.mean() + cols.mean())
        share = 0.5 * (rows.sum() / comm.shards["image_features"].total
                       + cols.sum() / comm.shards["text_features"].total)
        return comm.finish(share, "sum", anchors="image_features")
    rows, cols = similarity_kl(x, y, xt, yt, logit_scale, teacher_logit_scale, cross_entropy=cross_entropy,
                               backend=backend)
    return 0.5 * (rows.mean() + cols.mean())


def _diagonal_is_argmax(x: Tensor, y: Tensor, offset: int = 0) -> Tensor:
    """(N,) bool, no grad: row i of x·yᵀ has its first maximum at column offset + i (chunked
    argmax, ties to the lower index as ``torch.max`` in the authors' code)."""
    _, index = similarity_topk(x, y, 1)
    return index[:, 0] == torch.arange(offset, offset + x.shape[0], device=x.device)


def modx_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale,
    old_image_features: Tensor,
    old_text_features: Tensor,
    alpha: float = 20.0,
    *,
    backend: str = "auto",
    check_finite: bool = False,
    distributed=None,
    group=None,
    uniform_shards: bool = False,
) -> Tensor:
    """ModX off-diagonal alignment for continual CLIP training (docs/losses.md §13), as the
    authors' script computes it:

        CLIP(x, y; s) + α·½·[Σ_{i kept} KL(p^old_i‖p^new_i) + Σ_{j kept} KL(p^old_{·j}‖p^new_{·j})]

    on unscaled cosine matrices ``x·yᵀ`` (new model) and ``x_old·y_oldᵀ`` (old model, s = 1 for
    both); row i is kept when the old model's row i has its maximum on the diagonal (the
    authors replace the other rows of the old matrix by the new model's, which makes their KL
    and its gradient exactly 0); columns likewise with the old model's text → image argmax.
    The argmax is computed chunked (``similarity_topk(k=1)``): ties go to the lower index, as
    ``torch.max`` in the authors' code; the KL terms are summed, not averaged (their
    ``reduction='sum'``).

    Args:
        image_features, text_features: (N, D) each, the model being trained (as given:
            normalise in the model); N ≠ M is a ValueError.
        logit_scale: positive float or 0-d tensor, used by the CLIP term only.
        old_image_features, old_text_features: (N, D_old) each, the previous model (constant:
            no gradient reaches it).
        alpha: weight of the distillation term (≥ 0; the authors' script passes 20).
        check_finite: raise a ValueError naming the tensor when an input holds NaN/Inf (by
            default they propagate, as in torch; a host sync on GPUs).
        distributed: None (default: the loss of the given tensors) | "auto" (gather when a
            process group of world size > 1 is initialised; a collective call) | "gather" |
            "ring" (no ring form: ValueError). Gathered, the rows of every rank form the global
            batch (rank order): the old model's features are gathered without gradient (each
            local row's and column's argmax runs over the global batch), the new model's with
            it; this rank computes the KL of its rows and columns against the global batch and
            the CLIP term is ``clip_loss(..., distributed="gather")``. The value is the global
            loss on every rank, the gradient W × this rank's share (``mmloss.distributed``).
        group: the process group (default: the world). uniform_shards: every rank holds the same
            N (skips the exchange of sizes, D and dtype).

    Returns an fp32 scalar (fp64 for fp64 inputs). Memory O(N·(D+D_old)) plus the primitives'
    workspaces; no N×N tensor (gathered: N is the global batch, and the new model's features
    are gathered twice, by the KL and by the CLIP term).
    """
    x, y = paired_features("modx_loss", image_features, text_features)
    n = x.shape[0]
    xo, yo = _prepare_pair("old_image_features", old_image_features, "old_text_features", old_text_features,
                           n, n, "old-model")
    V.check_same_device(("image_features", x), ("old_image_features", xo))
    logit_scale = V.check_scalar("logit_scale", logit_scale, device=x.device, positive=True,
                                 dtype=compute_dtype(x))
    alpha = check_weight("alpha", alpha)
    if V.check_bool("check_finite", check_finite):
        V.check_all_finite(("image_features", x), ("text_features", y), ("logit_scale", logit_scale),
                           ("old_image_features", xo), ("old_text_features", yo))
    mode = D.resolve_mode("modx_loss", distributed, group)
    uniform_shards = V.check_bool("uniform_shards", uniform_shards)
    comm = None
    if mode == "gather":
        comm = D.Exchange.open("modx_loss", group, uniform_shards, image_features=x, text_features=y,
                               old_image_features=xo, old_text_features=yo)
        offset = comm.shards["image_features"].offset
        xo_all, yo_all = _gather_pair(comm, ("old_image_features", "old_text_features"), xo, yo, constant=True)
        keep_rows = _diagonal_is_argmax(xo, yo_all, offset)
        keep_cols = _diagonal_is_argmax(yo, xo_all, offset)
    else:
        keep_rows = _diagonal_is_argmax(xo, yo)
        keep_cols = _diagonal_is_argmax(yo, xo)
    # The KL term is formed before the CLIP term on purpose: autograd runs the newest node first,
    # so CLIP's backward (full workspace) runs while no partial gradient is held, and the KL's
    # backward (half a workspace) runs beside CLIP's finished dx, dy.
    if comm is None:
        rows, cols = similarity_kl(x, y, xo, yo, 1.0, 1.0, backend=backend)
    else:
        x_all, y_all = _gather_pair(comm, ("image_features", "text_features"), x, y)
        rows, cols = _kl_rows_and_columns(x, y, x_all, y_all, xo, yo, xo_all, yo_all, 1.0, 1.0, False, backend)
    distill = torch.where(keep_rows, rows, 0.0).sum() + torch.where(keep_cols, cols, 0.0).sum()
    if comm is not None:
        distill = comm.finish(distill, "sum", anchors="image_features")
    contrastive = clip_loss(x, y, logit_scale, backend=backend, distributed=mode, group=group,
                            uniform_shards=uniform_shards)
    return contrastive + (alpha * 0.5) * distill


# ----------------------------------------------------------------------------- §15


def _check_scores(name: str, t) -> Tensor:
    V.check_tensor(name, t)
    if t.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty (B, C) matrix, got shape {tuple(t.shape)}")
    return t


def _positive_targets(positive_index, b: int, c: int, device) -> Tensor:
    """(B,) int64 column of each row's positive."""
    if isinstance(positive_index, Tensor):
        positive_index = V.check_labels("positive_index", positive_index, b, device)
        V.check_index_range("positive_index", positive_index, c)
        return positive_index
    index = V.check_int("positive_index", positive_index)
    if not 0 <= index < c:
        raise ValueError(f"positive_index must lie in [0, {c}) (the C candidates), got {index}")
    return torch.full((b,), index, dtype=torch.long, device=device)


def score_distill_loss(
    student_scores: Tensor,
    teacher_scores: Tensor,
    positive_index=0,
    alpha: float = 0.2,
    *,
    backend: str = "auto",
    check_finite: bool = False,
    distributed=None,
    group=None,
    uniform_shards: bool = False,
) -> Tensor:
    """Score distillation (DCD, docs/losses.md §15) over a small candidate set per query:

        α·mean_ic (t_ic − u_ic)² + (1−α)·Σ_i w_i·mean_c BCEWithLogits(u_ic, y_ic),

    y one-hot at the positive column, ``w_i = H(softmax(t_i)) / Σ_i' H(softmax(t_i'))`` (row
    i's share of the teacher's entropy; uniform 1/B when every teacher row has zero entropy,
    e.g. C = 1). The authors' ``T²·mean(t/T − u/T)²`` equals the first term for every T.

    Args:
        student_scores u, teacher_scores t: (B, C) logits over the same candidates in the same
            order (fp16/bf16/fp32/fp64, one device). The teacher is a target: no gradient.
        positive_index: int in [0, C) (default 0) or a (B,) integer tensor.
        alpha: in [0, 1] (default 0.2).
        backend: accepted for a uniform call style; this loss is O(B·C) plain torch (no N×M
            similarity, no fused kernel).
        check_finite: raise a ValueError naming the tensor when an input holds NaN/Inf (by
            default they propagate, as in torch; a host sync on GPUs).
        distributed: None (default: the loss of the given rows) | "auto" (the global batch when
            a process group of world size > 1 is initialised; a collective call) | "gather" |
            "ring" (no ring form: ValueError). Rows are independent but for the batch's
            normalisers (the mean over B·C and the entropy total Σ_i H_i): distributed, the rows
            of every rank form the global batch (rank order), B is the global row count and the
            entropy total one scalar all-reduce; nothing is gathered. The value is the global
            loss on every rank, the gradient W × this rank's share (``mmloss.distributed``).
        group: the process group (default: the world). uniform_shards: every rank holds the same
            B (skips the exchange of sizes, C and dtype).

    Returns an fp32 scalar (fp64 for fp64 inputs). Memory: O(B) plus chunk temporaries of
    ≤ 2^16 elements beyond the inputs and the student's gradient.
    """
    u = _check_scores("student_scores", student_scores)
    t = _check_scores("teacher_scores", teacher_scores)
    V.check_same_shape("student_scores", u, "teacher_scores", t)
    V.check_same_device(("student_scores", u), ("teacher_scores", t))
    alpha = V.check_fraction("alpha", alpha, upper_open=False)
    V.check_choice("backend", backend, BACKEND_CHOICES)
    b, c = u.shape
    target = _positive_targets(positive_index, b, c, u.device)
    if V.check_bool("check_finite", check_finite):
        V.check_all_finite(("student_scores", u), ("teacher_scores", t))
    uniform_shards = V.check_bool("uniform_shards", uniform_shards)
    if D.resolve_mode("score_distill_loss", distributed, group) != "gather":
        return _ScoreDistill.apply(u, t.detach(), target, alpha)
    comm = D.Exchange.open("score_distill_loss", group, uniform_shards, student_scores=u, teacher_scores=t)
    share = _ScoreDistill.apply(u, t.detach(), target, alpha, comm)
    return comm.finish(share, "sum", anchors="student_scores")


class _ScoreDistill(torch.autograd.Function):
    """§15 in passes over row chunks (compute dtype fp32, fp64 for fp64 inputs):

        w = H(softmax(t_i)) / Σ H      (forward pass 1; uniform 1/B when Σ H = 0)
        L = α/(B·C)·Σ (t − u)² + (1−α)·Σ_i w_i·[mean_c softplus(u_ic) − u_{i,pos}/C]   (pass 2)
        ∂L/∂u_ic = 2α/(B·C)·(u_ic − t_ic) + (1−α)·w_i/C·(sigmoid(u_ic) − y_ic)      (backward)

    Backward recomputes per chunk and multiplies by the upstream gradient before rounding to
    the input dtype (safe under AMP loss scaling). Temporaries: one chunk of ≤ 2^16 elements
    and the (B,) weights; the teacher is a constant.

    Distributed (``comm``, an open ``mmloss.distributed.Exchange``): B is the global row count
    and Σ H the all-reduced entropy total; L is then this rank's share of the global loss.
    """

    @staticmethod
    def forward(ctx, u: Tensor, t: Tensor, target: Tensor, alpha: float, comm=None) -> Tensor:
        b_local, c = u.shape
        dt = torch.float64 if torch.float64 in (u.dtype, t.dtype) else torch.float32
        entropy = torch.empty(b_local, dtype=dt, device=u.device)
        for i0, i1 in row_chunks(b_local, c):
            log_p = torch.log_softmax(as_compute(t[i0:i1], dt), dim=1)
            entropy[i0:i1] = -(log_p.exp() * log_p).sum(dim=1)
        total = entropy.sum()
        b = b_local
        if comm is not None:
            torch.distributed.all_reduce(total, group=comm.group)
            b = comm.shards["student_scores"].total
        weights = torch.where(total > 0, entropy / torch.where(total > 0, total, 1.0),
                              torch.full_like(entropy, 1.0 / b))
        squares = torch.zeros((), dtype=dt, device=u.device)
        weighted_bce = torch.zeros((), dtype=dt, device=u.device)
        for i0, i1 in row_chunks(b_local, c):
            uc, tc = as_compute(u[i0:i1], dt), as_compute(t[i0:i1], dt)
            squares += (uc - tc).square().sum()
            # BCEWithLogits(u, y) = softplus(u) − y·u: row mean = mean_c softplus(u_ic) − u_i,pos / C.
            bce = softplus(uc).mean(dim=1) - uc.gather(1, target[i0:i1, None]).squeeze(1) / c
            weighted_bce += (weights[i0:i1] * bce).sum()
        ctx.save_for_backward(u, t, target, weights)
        ctx.alpha, ctx.global_rows = alpha, (None if comm is None else b)
        return alpha / (b * c) * squares + (1.0 - alpha) * weighted_bce

    @staticmethod
    def backward(ctx, grad: Tensor):
        u, t, target, weights = ctx.saved_tensors
        if grad is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        b_local, c = u.shape
        alpha, b = ctx.alpha, (b_local if ctx.global_rows is None else ctx.global_rows)
        dt = weights.dtype
        g = grad.to(dt)
        du = torch.empty_like(u, memory_format=torch.contiguous_format)
        for i0, i1 in row_chunks(b_local, c):
            uc, tc = as_compute(u[i0:i1], dt), as_compute(t[i0:i1], dt)
            pos = target[i0:i1, None]
            tile = torch.sigmoid(uc).scatter_add_(1, pos, torch.full(pos.shape, -1.0, dtype=dt, device=u.device))
            tile.mul_(((1.0 - alpha) / c) * weights[i0:i1, None])
            tile.add_(uc - tc, alpha=2.0 * alpha / (b * c)).mul_(g)
            du[i0:i1] = tile
        return du, None, None, None, None


__all__ = ["contrastive_distill_loss", "cyclip_loss", "modx_loss", "score_distill_loss"]
