"""§13 similarity-matrix distillation, §14 CyCLIP, §15 score distillation (docs/losses.md)."""
from __future__ import annotations


import torch

from .. import _validation as V
from ..ops import BACKEND_CHOICES, similarity_kl, similarity_topk
from ._common import as_compute, compute_dtype, paired_features, softplus
from .clip import clip_loss

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


def check_weight(name: str, value) -> float:
    """A finite, non-negative Python number (loss weights such as α, λ)."""
    value = float(V.check_real(name, value))
    if not (value >= 0.0 and value != float("inf")):
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value}")
    return value


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

    Returns an fp32 scalar (fp64 for fp64 inputs). Memory O((N+M)·(D+D_t)) plus the
    ``similarity_kl`` workspace; no N×M tensor.
    """
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
    rows, cols = similarity_kl(x, y, xt, yt, logit_scale, teacher_logit_scale, cross_entropy=cross_entropy,
                               backend=backend)
    return 0.5 * (rows.mean() + cols.mean())


def _diagonal_is_argmax(x: Tensor, y: Tensor) -> Tensor:
    """(N,) bool, no grad: row i of x·yᵀ has its first maximum at column i (chunked argmax,
    ties to the lower index as ``torch.max`` in the authors' code)."""
    _, index = similarity_topk(x, y, 1)
    return index[:, 0] == torch.arange(x.shape[0], device=x.device)


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

    Returns an fp32 scalar (fp64 for fp64 inputs). Memory O(N·(D+D_old)) plus the primitives'
    workspaces; no N×N tensor.
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
    keep_rows = _diagonal_is_argmax(xo, yo)
    keep_cols = _diagonal_is_argmax(yo, xo)
    # The KL term is formed before the CLIP term on purpose: autograd runs the newest node first,
    # so CLIP's backward (full workspace) runs while no partial gradient is held, and the KL's
    # backward (half a workspace) runs beside CLIP's finished dx, dy.
    rows, cols = similarity_kl(x, y, xo, yo, 1.0, 1.0, backend=backend)
    distill = torch.where(keep_rows, rows, 0.0).sum() + torch.where(keep_cols, cols, 0.0).sum()
    contrastive = clip_loss(x, y, logit_scale, backend=backend)
    return contrastive + (alpha * 0.5) * distill


# ----------------------------------------------------------------------------- §14

# Row chunks of the O(N·D) / O(B·C) passes below: 2^16 elements (512 KiB in fp64) at a time.
_CHUNK_ELEMENTS = 1 << 16


def _row_chunks(rows: int, cols: int):
    """Row ranges of at most ``_CHUNK_ELEMENTS`` elements (at least one row each).

    While compiling, one range covers every row: a loop over a symbolic row count would
    specialise the graph on the batch size (a recompile per size); the compiled graph's
    temporaries are then O(rows·cols), still within the losses' O(N·D) memory."""
    if torch.compiler.is_compiling():
        yield 0, rows
        return
    step = max(1, _CHUNK_ELEMENTS // cols)
    for i0 in range(0, rows, step):
        yield i0, min(rows, i0 + step)


class _CyclicSums(torch.autograd.Function):
    """``[Σ_ij (x_i·x_j − y_i·y_j)², Σ_ij (x_i·y_j − x_j·y_i)²]`` (float64, shape (2,)) from
    D×D Grams accumulated in float64 over row chunks (docs/losses.md §14):

        S_in = ‖A‖² + ‖B‖² − 2‖C‖²,   S_cross = 2·tr(A·B) − 2·tr(C·C),
        A = XᵀX, B = YᵀY, C = XᵀY.

    Gradients (upstream a for S_in, b for S_cross):
        dX = 4·[X·(aA + bB) − Y·(aCᵀ + bC)],   dY = 4·[Y·(aB + bA) − X·(aC + bCᵀ)],
    formed chunk by chunk in float64 and cast to the input dtype. Memory O(D²) plus one chunk.
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:
        n, d = x.shape
        f64 = torch.float64
        a = torch.zeros(d, d, dtype=f64, device=x.device)
        b = torch.zeros_like(a)
        c = torch.zeros_like(a)
        for i0, i1 in _row_chunks(n, d):
            xc, yc = x[i0:i1].to(f64), y[i0:i1].to(f64)
            a.addmm_(xc.T, xc)
            b.addmm_(yc.T, yc)
            c.addmm_(xc.T, yc)
        ctx.save_for_backward(x, y, a, b, c)
        s_in = a.square().sum() + b.square().sum() - 2.0 * c.square().sum()
        s_cross = 2.0 * (a * b).sum() - 2.0 * (c * c.T).sum()  # tr(AB), tr(CC) for symmetric A, B
        return torch.stack((s_in, s_cross))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, y, a, b, c = ctx.saved_tensors
        w_in, w_cross = grad.to(torch.float64).unbind()
        p_x = 4.0 * (w_in * a + w_cross * b)
        q_x = 4.0 * (w_in * c.T + w_cross * c)
        p_y = 4.0 * (w_in * b + w_cross * a)
        q_y = 4.0 * (w_in * c + w_cross * c.T)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format) if ctx.needs_input_grad[0] else None
        dy = torch.empty_like(y, memory_format=torch.contiguous_format) if ctx.needs_input_grad[1] else None
        for i0, i1 in _row_chunks(x.shape[0], x.shape[1]):
            xc, yc = x[i0:i1].to(torch.float64), y[i0:i1].to(torch.float64)
            if dx is not None:
                dx[i0:i1] = (xc @ p_x).sub_(yc @ q_x)
            if dy is not None:
                dy[i0:i1] = (yc @ p_y).sub_(xc @ q_y)
        return dx, dy


def cyclip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale,
    lambda_in: float = 0.25,
    lambda_cross: float = 0.25,
    *,
    backend: str = "auto",
    check_finite: bool = False,
) -> Tensor:
    """CyCLIP (docs/losses.md §14): ``CLIP + λ_in·L_in + λ_cross·L_cross`` with, on the raw cosines,
    ``L_in = (1/N) Σ_ij (x_i·x_j − y_i·y_j)²`` and ``L_cross = (1/N) Σ_ij (x_i·y_j − x_j·y_i)²``
    (the paper's and the authors' code's form: their ``mean()/s²·N`` of the scaled matrices).

    The cyclic terms use the exact O(N·D²) Gram identities accumulated in float64 (they cancel
    when X ≈ Y): no N×N matrix at all.

    Args:
        image_features, text_features: (N, D) each, used as given; N ≠ M is a ValueError.
        logit_scale: positive float or 0-d tensor (CLIP term only).
        lambda_in, lambda_cross: finite weights ≥ 0 (default 0.25 each).
        check_finite: raise a ValueError naming the tensor when an input holds NaN/Inf (by
            default they propagate, as in torch; a host sync on GPUs).

    Returns an fp32 scalar (fp64 for fp64 inputs). Memory O(N·D + D²) plus the CLIP
    primitive's workspace.
    """
    x, y = paired_features("cyclip_loss", image_features, text_features)
    n = x.shape[0]
    lambda_in = check_weight("lambda_in", lambda_in)
    lambda_cross = check_weight("lambda_cross", lambda_cross)
    if V.check_bool("check_finite", check_finite):
        V.check_all_finite(("image_features", x), ("text_features", y), ("logit_scale", logit_scale))
    if lambda_in == 0.0 and lambda_cross == 0.0:
        return clip_loss(x, y, logit_scale, backend=backend)
    # Formed before the CLIP term so that its backward runs after CLIP's (newest node first):
    # CLIP's workspace is then never live beside these partial gradients.
    sums = _CyclicSums.apply(x, y)
    loss = clip_loss(x, y, logit_scale, backend=backend)
    cyclic = (lambda_in * sums[0] + lambda_cross * sums[1]) / n
    return loss + cyclic.to(loss.dtype)


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
    return _ScoreDistill.apply(u, t.detach(), target, alpha)


class _ScoreDistill(torch.autograd.Function):
    """§15 in passes over row chunks (compute dtype fp32, fp64 for fp64 inputs):

        w = H(softmax(t_i)) / Σ H      (forward pass 1; uniform 1/B when Σ H = 0)
        L = α/(B·C)·Σ (t − u)² + (1−α)·Σ_i w_i·[mean_c softplus(u_ic) − u_{i,pos}/C]   (pass 2)
        ∂L/∂u_ic = 2α/(B·C)·(u_ic − t_ic) + (1−α)·w_i/C·(sigmoid(u_ic) − y_ic)      (backward)

    Backward recomputes per chunk and multiplies by the upstream gradient before rounding to
    the input dtype (safe under AMP loss scaling). Temporaries: one chunk of ≤ 2^16 elements
    and the (B,) weights; the teacher is a constant.
    """

    @staticmethod
    def forward(ctx, u: Tensor, t: Tensor, target: Tensor, alpha: float) -> Tensor:
        b, c = u.shape
        dt = torch.float64 if torch.float64 in (u.dtype, t.dtype) else torch.float32
        entropy = torch.empty(b, dtype=dt, device=u.device)
        for i0, i1 in _row_chunks(b, c):
            log_p = torch.log_softmax(as_compute(t[i0:i1], dt), dim=1)
            entropy[i0:i1] = -(log_p.exp() * log_p).sum(dim=1)
        total = entropy.sum()
        weights = torch.where(total > 0, entropy / torch.where(total > 0, total, 1.0),
                              torch.full_like(entropy, 1.0 / b))
        squares = torch.zeros((), dtype=dt, device=u.device)
        weighted_bce = torch.zeros((), dtype=dt, device=u.device)
        for i0, i1 in _row_chunks(b, c):
            uc, tc = as_compute(u[i0:i1], dt), as_compute(t[i0:i1], dt)
            squares += (uc - tc).square().sum()
            # BCEWithLogits(u, y) = softplus(u) − y·u: row mean = mean_c softplus(u_ic) − u_i,pos / C.
            bce = softplus(uc).mean(dim=1) - uc.gather(1, target[i0:i1, None]).squeeze(1) / c
            weighted_bce += (weights[i0:i1] * bce).sum()
        ctx.save_for_backward(u, t, target, weights)
        ctx.alpha = alpha
        return alpha / (b * c) * squares + (1.0 - alpha) * weighted_bce

    @staticmethod
    def backward(ctx, grad: Tensor):
        u, t, target, weights = ctx.saved_tensors
        if grad is None or not ctx.needs_input_grad[0]:
            return None, None, None, None
        alpha = ctx.alpha
        b, c = u.shape
        dt = weights.dtype
        g = grad.to(dt)
        du = torch.empty_like(u, memory_format=torch.contiguous_format)
        for i0, i1 in _row_chunks(b, c):
            uc, tc = as_compute(u[i0:i1], dt), as_compute(t[i0:i1], dt)
            pos = target[i0:i1, None]
            tile = torch.sigmoid(uc).scatter_add_(1, pos, torch.full(pos.shape, -1.0, dtype=dt, device=u.device))
            tile.mul_(((1.0 - alpha) / c) * weights[i0:i1, None])
            tile.add_(uc - tc, alpha=2.0 * alpha / (b * c)).mul_(g)
            du[i0:i1] = tile
        return du, None, None, None


__all__ = ["contrastive_distill_loss", "cyclip_loss", "modx_loss", "score_distill_loss"]
