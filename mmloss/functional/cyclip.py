"""§14 CyCLIP (docs/losses.md): CLIP plus the cyclic consistency terms, exact through D×D Grams."""
from __future__ import annotations

import torch

from .. import _validation as V
from .. import distributed as D
from ._common import paired_features
from .clip import clip_loss

Tensor = torch.Tensor


def check_weight(name: str, value) -> float:
    """A finite, non-negative Python number (loss weights such as α, λ)."""
    value = float(V.check_real(name, value))
    if not (value >= 0.0 and value != float("inf")):
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value}")
    return value


# Row chunks of the O(N·D) passes below and of score distillation's O(B·C) passes (distill.py):
# 2^16 elements (512 KiB in fp64) at a time.
_CHUNK_ELEMENTS = 1 << 16


def row_chunks(rows: int, cols: int):
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

    Gathered (``comm``, an open ``mmloss.distributed.Exchange``): A, B and C are sums over the
    rows of every rank, so one all-reduce of this rank's (3, D, D) Grams gives the global sums;
    the formulas above then give this rank's rows of the global gradient, passed on × W (the
    convention of ``mmloss.distributed``: DDP's average gives the single-process gradient).
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, comm=None) -> Tensor:
        n, d = x.shape
        f64 = torch.float64
        grams = torch.zeros(3, d, d, dtype=f64, device=x.device)
        a, b, c = grams.unbind()
        for i0, i1 in row_chunks(n, d):
            xc, yc = x[i0:i1].to(f64), y[i0:i1].to(f64)
            a.addmm_(xc.T, xc)
            b.addmm_(yc.T, yc)
            c.addmm_(xc.T, yc)
        ctx.factor = 1.0
        if comm is not None:
            torch.distributed.all_reduce(grams, group=comm.group)
            ctx.factor = float(comm.size)
        ctx.save_for_backward(x, y, a, b, c)
        s_in = a.square().sum() + b.square().sum() - 2.0 * c.square().sum()
        s_cross = 2.0 * (a * b).sum() - 2.0 * (c * c.T).sum()  # tr(AB), tr(CC) for symmetric A, B
        return torch.stack((s_in, s_cross))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, y, a, b, c = ctx.saved_tensors
        w_in, w_cross = (grad.to(torch.float64) * ctx.factor).unbind()
        p_x = 4.0 * (w_in * a + w_cross * b)
        q_x = 4.0 * (w_in * c.T + w_cross * c)
        p_y = 4.0 * (w_in * b + w_cross * a)
        q_y = 4.0 * (w_in * c + w_cross * c.T)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format) if ctx.needs_input_grad[0] else None
        dy = torch.empty_like(y, memory_format=torch.contiguous_format) if ctx.needs_input_grad[1] else None
        for i0, i1 in row_chunks(x.shape[0], x.shape[1]):
            xc, yc = x[i0:i1].to(torch.float64), y[i0:i1].to(torch.float64)
            if dx is not None:
                dx[i0:i1] = (xc @ p_x).sub_(yc @ q_x)
            if dy is not None:
                dy[i0:i1] = (yc @ p_y).sub_(xc @ q_y)
        return dx, dy, None


def cyclip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale,
    lambda_in: float = 0.25,
    lambda_cross: float = 0.25,
    *,
    backend: str = "auto",
    check_finite: bool = False,
    distributed=None,
    group=None,
    uniform_shards: bool = False,
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
        distributed: None (default: the loss of the given tensors) | "auto" (gather when a
            process group of world size > 1 is initialised; a collective call) | "gather" |
            "ring" (no ring form: ValueError). Gathered, the rows of every rank form the global
            batch (rank order): the CLIP term is ``clip_loss(..., distributed="gather")`` and the
            cyclic terms need only the global D×D Grams XᵀX, YᵀY, XᵀY — one all-reduce of
            3·D² float64 values (no feature is gathered for them, no N×N matrix). The value is
            the global loss on every rank, the gradient W × this rank's share
            (``mmloss.distributed``); a tensor ``logit_scale`` gets the global gradient.
        group: the process group (default: the world). uniform_shards: every rank holds the same
            N (skips the exchange of sizes, D and dtype).

    Returns an fp32 scalar (fp64 for fp64 inputs). Memory O(N·D + D²) plus the CLIP
    primitive's workspace (gathered: plus CLIP's gathered features).
    """
    x, y = paired_features("cyclip_loss", image_features, text_features)
    n = x.shape[0]
    lambda_in = check_weight("lambda_in", lambda_in)
    lambda_cross = check_weight("lambda_cross", lambda_cross)
    if V.check_bool("check_finite", check_finite):
        V.check_all_finite(("image_features", x), ("text_features", y), ("logit_scale", logit_scale))
    mode = D.resolve_mode("cyclip_loss", distributed, group)
    uniform_shards = V.check_bool("uniform_shards", uniform_shards)
    if lambda_in == 0.0 and lambda_cross == 0.0:
        return clip_loss(x, y, logit_scale, backend=backend, distributed=mode, group=group,
                         uniform_shards=uniform_shards)
    comm = None
    if mode == "gather":
        # Sizes, D and dtype checked on every rank before the Grams' all-reduce.
        comm = D.Exchange.open("cyclip_loss", group, uniform_shards, image_features=x, text_features=y)
        n = comm.shards["image_features"].total
    # Formed before the CLIP term so that its backward runs after CLIP's (newest node first):
    # CLIP's workspace is then never live beside these partial gradients.
    sums = _CyclicSums.apply(x, y, comm)
    loss = clip_loss(x, y, logit_scale, backend=backend, distributed=mode, group=group,
                     uniform_shards=uniform_shards)
    cyclic = (lambda_in * sums[0] + lambda_cross * sums[1]) / n
    return loss + cyclic.to(loss.dtype)


__all__ = ["cyclip_loss"]
