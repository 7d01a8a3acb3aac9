"""``similarity_kl``: row/column KL (or cross-entropy) between a teacher's and a student's
softmax over the same N×M pairs, without storing either matrix (docs/losses.md, "The three fused
primitives"; docs/design.md, "The primitives").

The primitive is the ``torch.library`` custom op ``mmloss::similarity_kl`` with a fake kernel
for symbolic shapes; its autograd formula calls the custom op ``mmloss::similarity_kl_backward``
(whose own backward raises: no double backward). The ``reference`` backend bypasses the ops: it
is dense torch and autograd (``mmloss.reference.similarity_kl``).

Backends implement ``similarity_kl_forward`` / ``similarity_kl_backward`` (signatures in the
docstring of ``mmloss.ops.torch_kl``) on a ``KLSpec``. Dispatch looks them up in the backend
module: ``mmloss.ops.torch_kl`` for "torch", ``mmloss.ops.triton`` for "triton".
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from .. import _validation as V
from .._device import no_autocast
from ._backends import resolve_backend
from ._primitives import (
    _check_chunk,
    _empty_if_none,
    _keep_needed,
    _no_setup,
    _resolve_deterministic,
    _split_scalar,
)
from ._spec import KLSpec

Tensor = torch.Tensor

# Backend name → module that may define similarity_kl_forward / similarity_kl_backward.
_KL_MODULES = {"torch": "mmloss.ops.torch_kl", "triton": "mmloss.ops.triton"}
_KL_FUNCTIONS = ("similarity_kl_forward", "similarity_kl_backward")


def _out_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _module_with_kl(name: str):
    """The backend module of ``name`` if it implements similarity_kl, else None."""
    module_name = _KL_MODULES.get(name)
    if module_name is None:
        return None
    module = importlib.import_module(module_name)
    if all(hasattr(module, f) for f in _KL_FUNCTIONS):
        return module
    return None


@torch.compiler.assume_constant_result
def _kl_backend(backend: str, device: torch.device) -> str:
    """The backend that runs similarity_kl for this call.

    ``resolve_backend`` first (unknown / unavailable backends raise there). An explicitly
    requested backend without a similarity_kl kernel raises ``RuntimeError``; "auto" falls back
    to the chunked torch backend in that case, so the losses work wherever the other
    primitives do.
    """
    name = resolve_backend(backend, device)
    if name == "reference" or _module_with_kl(name) is not None:
        return name
    if backend == "auto":
        return "torch"
    if name == "triton":
        raise RuntimeError(
            "mmloss backend 'triton' has no similarity_kl kernel yet (mmloss.ops.triton defines no "
            "similarity_kl_forward / similarity_kl_backward); use backend='torch' or 'auto'"
        )
    raise RuntimeError(f"mmloss backend {name!r} has no similarity_kl kernel; use backend='torch' or 'auto'")


def _kl_module(name: str):
    module = _module_with_kl(name)
    if module is None:  # pragma: no cover - _kl_backend refuses these first
        raise RuntimeError(f"mmloss backend {name!r} has no similarity_kl kernel")
    return module


def _spec(x_s, y_s, x_t, y_t, scale_s, scale_s_value, scale_t, scale_t_value, chunk_size, deterministic):
    return KLSpec(x_s, y_s, x_t, y_t, scale_s, scale_s_value, scale_t, scale_t_value, chunk_size, deterministic)


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("mmloss::similarity_kl", mutates_args=())
def _similarity_kl_op(
    x_s: Tensor, y_s: Tensor, x_t: Tensor, y_t: Tensor, scale_s: Optional[Tensor], scale_s_value: float,
    scale_t: Optional[Tensor], scale_t_value: float, rows: bool, cols: bool, cross_entropy: bool,
    backend: str, chunk_size: int, deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row (N,) | (0,), col (M,) | (0,), row_stats (4, N|0), col_stats (4, M|0)).

    The statistics are the backend's unrounded record of the student's and the teacher's
    softmax per row / column (max and sum, in the backend's units), saved for its backward."""
    spec = _spec(x_s, y_s, x_t, y_t, scale_s, scale_s_value, scale_t, scale_t_value, chunk_size, deterministic)
    with no_autocast(x_s.device):
        return _kl_module(backend).similarity_kl_forward(spec, rows, cols, cross_entropy)


@_similarity_kl_op.register_fake
def _(x_s, y_s, x_t, y_t, scale_s, scale_s_value, scale_t, scale_t_value, rows, cols, cross_entropy, backend,
      chunk_size, deterministic):
    dt = _out_dtype(x_s)
    n = x_s.shape[0] if rows else 0
    m = y_s.shape[0] if cols else 0
    return (x_s.new_empty(n, dtype=dt), x_s.new_empty(m, dtype=dt), x_s.new_empty((4, n), dtype=dt),
            x_s.new_empty((4, m), dtype=dt))


@torch.library.custom_op("mmloss::similarity_kl_backward", mutates_args=())
def _similarity_kl_backward_op(
    grad_row: Optional[Tensor], grad_col: Optional[Tensor], x_s: Tensor, y_s: Tensor, x_t: Tensor,
    y_t: Tensor, scale_s: Optional[Tensor], scale_s_value: float, scale_t: Optional[Tensor],
    scale_t_value: float, row_stats: Tensor, col_stats: Tensor, backend: str, chunk_size: int,
    deterministic: bool, need_x: bool, need_y: bool, need_scale: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    spec = _spec(x_s, y_s, x_t, y_t, scale_s, scale_s_value, scale_t, scale_t_value, chunk_size, deterministic)
    with no_autocast(x_s.device):
        grads = _kl_module(backend).similarity_kl_backward(
            spec, grad_row, grad_col, row_stats, col_stats, (need_x, need_y, need_scale)
        )
    return tuple(_empty_if_none(g, x_s) for g in grads)


@_similarity_kl_backward_op.register_fake
def _(grad_row, grad_col, x_s, y_s, x_t, y_t, scale_s, scale_s_value, scale_t, scale_t_value, row_stats,
      col_stats, backend, chunk_size, deterministic, need_x, need_y, need_scale):
    empty = x_s.new_empty(0)
    return (
        x_s.new_empty(x_s.shape) if need_x else empty,
        y_s.new_empty(y_s.shape) if need_y else x_s.new_empty(0),
        scale_s.new_empty(scale_s.shape) if need_scale else x_s.new_empty(0),
    )


def _kl_setup(ctx, inputs, output):
    (x_s, y_s, x_t, y_t, scale_s, scale_s_value, scale_t, scale_t_value, rows, cols, cross_entropy,
     backend, chunk_size, deterministic) = inputs
    _, _, row_stats, col_stats = output
    ctx.mark_non_differentiable(row_stats, col_stats)
    ctx.save_for_backward(x_s, y_s, x_t, y_t, scale_s, scale_t, row_stats, col_stats)
    ctx.args = (scale_s_value, scale_t_value, rows, cols, backend, chunk_size, deterministic)
    ctx.set_materialize_grads(False)


def _kl_backward(ctx, grad_row, grad_col, grad_row_stats, grad_col_stats):
    x_s, y_s, x_t, y_t, scale_s, scale_t, row_stats, col_stats = ctx.saved_tensors
    scale_s_value, scale_t_value, rows, cols, backend, chunk_size, deterministic = ctx.args
    grad_row = grad_row if rows else None
    grad_col = grad_col if cols else None
    need = ctx.needs_input_grad
    need_x, need_y, need_scale = need[0], need[1], need[4]
    dx = dy = ds = None
    if (grad_row is not None or grad_col is not None) and any((need_x, need_y, need_scale)):
        dx, dy, ds = _similarity_kl_backward_op(
            grad_row, grad_col, x_s, y_s, x_t, y_t, scale_s, scale_s_value, scale_t, scale_t_value,
            row_stats, col_stats, backend, chunk_size, deterministic, need_x, need_y, need_scale,
        )
        dx, dy, ds = _keep_needed((dx, dy, ds), (need_x, need_y, need_scale))
    # The teacher (x_t, y_t, scale_t) never receives a gradient.
    return (dx, dy, None, None, ds) + (None,) * 9


def _kl_double_backward_error(ctx, *grads):
    raise RuntimeError(
        "similarity_kl does not support double backward (create_graph=True through the fused "
        "primitive); compute higher-order terms with backend='reference'"
    )


_similarity_kl_op.register_autograd(_kl_backward, setup_context=_kl_setup)
_similarity_kl_backward_op.register_autograd(_kl_double_backward_error, setup_context=_no_setup)


# ----------------------------------------------------------------------------- public wrapper


def _prepare(x_s, y_s, x_t, y_t):
    """Validate the four feature matrices; bring each pair to one dtype (and all four to fp64
    when any is fp64, so the statistics and the output are fp64)."""
    x_s, y_s = V.prepare_features("x_s", x_s, "y_s", y_s)
    x_t, y_t = V.prepare_features("x_t", x_t, "y_t", y_t)
    V.check_same_device(("x_s", x_s), ("x_t", x_t))
    if x_t.shape[0] != x_s.shape[0]:
        raise ValueError(
            f"x_t must have as many rows as x_s: got x_s {tuple(x_s.shape)}, x_t {tuple(x_t.shape)}"
        )
    if y_t.shape[0] != y_s.shape[0]:
        raise ValueError(
            f"y_t must have as many rows as y_s: got y_s {tuple(y_s.shape)}, y_t {tuple(y_t.shape)}"
        )
    if torch.float64 in (x_s.dtype, x_t.dtype):
        x_s, y_s, x_t, y_t = (t.to(torch.float64) for t in (x_s, y_s, x_t, y_t))
    return x_s, y_s, x_t, y_t


def _detached_scalar(value):
    return value.detach() if isinstance(value, Tensor) else value


def similarity_kl(
    x_s: Tensor, y_s: Tensor, x_t: Tensor, y_t: Tensor, scale_s, scale_t, *, rows: bool = True,
    cols: bool = True, cross_entropy: bool = False, backend: str = "auto",
    chunk_size: Optional[int] = None, deterministic: Optional[bool] = None,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Per-row and per-column KL(p_t‖p_s) between teacher and student softmaxes (docs/losses.md,
    "The three fused primitives").

    ``L^s = s_s·x_s·y_sᵀ``, ``L^t = s_t·x_t·y_tᵀ``; for row i, ``p^t = softmax_j(L^t_i)`` and

        KL_i = Σ_j p^t_ij (L^t_ij − L^s_ij) − LSE_j(L^t_i) + LSE_j(L^s_i),

    or, with ``cross_entropy=True``, ``H_i(p_t, p_s) = LSE_j(L^s_i) − Σ_j p^t_ij L^s_ij``
    (= KL_i + entropy(p^t_i); same gradient). Columns: the same with the softmax over i for
    fixed j.

    Args:
        x_s: (N, D_s), y_s: (M, D_s) student features; x_t: (N, D_t), y_t: (M, D_t) teacher
            features (D_t may differ from D_s). fp16/bf16/fp32/fp64, any strides, one device;
            each pair is promoted to one dtype (autocast honoured); an fp64 input makes all fp64.
        scale_s, scale_t: scalar logit scales (float or 0-d tensor; any finite value).
        rows / cols: which directions to return (at least one); the other is None.
        cross_entropy: return H(p_t, p_s) instead of KL(p_t‖p_s).
        backend: "auto" | "reference" | "torch" | "triton" | ...; "auto" uses the torch
            backend where the chosen backend has no similarity_kl kernel, an explicit backend
            without one raises RuntimeError. chunk_size: rows per chunk (torch backend; default
            from the workspace budget, see ``MMLOSS_CHUNK_BYTES``). deterministic: as in
            ``similarity_lse``.

    Returns:
        ``(row (N,) | None, col (M,) | None)`` in fp32 (fp64 for fp64 inputs), each ≥ 0.

    Gradients reach only the student: ``∂/∂L^s_ij = g_i·(softmax(L^s_i)_j − p^t_ij) +
    h_j·(softmax(L^s_{·j})_i − p^t_{·j,i})`` → x_s, y_s and scale_s. The teacher (x_t, y_t,
    scale_t) is treated as a constant: it gets no gradient even when it requires one.
    Memory: O((N+M)·(D_s+D_t)) plus the backend's bounded workspace (torch: four C×M fp32
    chunk buffers within the workspace budget). Double backward raises.
    """
    x_s, y_s, x_t, y_t = _prepare(x_s, y_s, x_t, y_t)
    scale_s = V.check_scalar("scale_s", scale_s, device=x_s.device, dtype=_out_dtype(x_s))
    scale_t = V.check_scalar("scale_t", scale_t, device=x_s.device, dtype=_out_dtype(x_s))
    V.check_bool("rows", rows)
    V.check_bool("cols", cols)
    V.check_bool("cross_entropy", cross_entropy)
    if not (rows or cols):
        raise ValueError("similarity_kl needs rows=True or cols=True")
    chunk = _check_chunk(chunk_size)
    name = _kl_backend(backend, x_s.device)
    x_t, y_t, scale_t = x_t.detach(), y_t.detach(), _detached_scalar(scale_t)
    if name == "reference":
        from .. import reference

        return reference.similarity_kl(x_s, y_s, x_t, y_t, scale_s, scale_t, rows=rows, cols=cols,
                                       cross_entropy=cross_entropy)
    scale_s_t, scale_s_v = _split_scalar(scale_s, x_s)
    scale_t_t, scale_t_v = _split_scalar(scale_t, x_s)
    row, col, _, _ = _similarity_kl_op(
        x_s, y_s, x_t, y_t, scale_s_t, scale_s_v, scale_t_t, scale_t_v, rows, cols, cross_entropy,
        name, chunk, _resolve_deterministic(deterministic),
    )
    return (row if rows else None), (col if cols else None)


__all__ = ["similarity_kl"]
