"""Public fused primitives: validation, dtype handling, dispatch, torch.library registration.

Each primitive is a ``torch.library`` custom op (``mmloss::similarity_lse``,
``mmloss::pairwise_sigmoid``) with a fake kernel for symbolic shapes and an autograd formula that
calls a second custom op for the backward, so ``torch.compile(fullgraph=True)`` traces both
directions. The ``reference`` backend bypasses the ops: it is dense torch and autograd.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from .. import _validation as V
from .._device import no_autocast
from ._backends import deterministic_default, resolve_backend
from ._spec import MARKS, PairSpec

Tensor = torch.Tensor

_BACKEND_MODULES = {"torch": "mmloss.ops.torch_chunked", "triton": "mmloss.ops.triton"}


def backend_module(name: str):
    try:
        return importlib.import_module(_BACKEND_MODULES[name])
    except KeyError:  # pragma: no cover - resolve_backend refuses these first
        raise RuntimeError(f"mmloss backend {name!r} has no implementation of the primitives")


def _out_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _spec(x, y, scale, scale_value, bias, bias_value, marks, offset, x_labels, y_labels, chunk, deterministic):
    return PairSpec(x, y, scale, scale_value, bias, bias_value, marks, offset, x_labels, y_labels,
                    chunk, deterministic)


def _empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _none_if_empty(t: Tensor, wanted: bool) -> Optional[Tensor]:
    return t if wanted else None


def _double_backward_error(ctx, *grads):
    raise RuntimeError(
        "mmloss primitives do not support double backward (create_graph=True through "
        "similarity_lse / pairwise_sigmoid); compute higher-order terms with the reference backend"
    )


def _no_setup(ctx, inputs, output):
    return None


def _keep_needed(grads, needs):
    return tuple(g if n else None for g, n in zip(grads, needs))


# ----------------------------------------------------------------------------- similarity_lse


@torch.library.custom_op("mmloss::similarity_lse", mutates_args=())
def _similarity_lse_op(
    x: Tensor, y: Tensor, scale: Optional[Tensor], scale_value: float, bias: Optional[Tensor],
    bias_value: float, exclude: str, offset: int, x_labels: Optional[Tensor],
    y_labels: Optional[Tensor], rows: bool, cols: bool, backend: str, chunk_size: int,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row_lse, col_lse, row_stats, col_stats): the LSEs (empty where not asked) and the
    backend's unrounded statistics (2, N) / (2, M) (max and log-sum in the backend's own units),
    which only that backend's backward reads: recomputing ``exp(L − max − logsum)`` keeps the
    exponent exact at any logit magnitude, where one rounded fp32 LSE would lose |L|·2⁻²⁴."""
    spec = _spec(x, y, scale, scale_value, bias, bias_value, exclude, offset, x_labels, y_labels, chunk_size, deterministic)
    with no_autocast(x.device):
        return backend_module(backend).similarity_lse_forward(spec, rows, cols)


@_similarity_lse_op.register_fake
def _(x, y, scale, scale_value, bias, bias_value, exclude, offset, x_labels, y_labels, rows, cols, backend,
      chunk_size, deterministic):
    dt = _out_dtype(x)
    n, m = (x.shape[0] if rows else 0), (y.shape[0] if cols else 0)
    return (x.new_empty(n, dtype=dt), x.new_empty(m, dtype=dt), x.new_empty((2, n), dtype=dt),
            x.new_empty((2, m), dtype=dt))


@torch.library.custom_op("mmloss::similarity_lse_backward", mutates_args=())
def _similarity_lse_backward_op(
    grad_row: Optional[Tensor], grad_col: Optional[Tensor], x: Tensor, y: Tensor,
    scale: Optional[Tensor], scale_value: float, bias: Optional[Tensor], bias_value: float,
    row_stats: Tensor, col_stats: Tensor, exclude: str, offset: int, x_labels: Optional[Tensor],
    y_labels: Optional[Tensor], backend: str, chunk_size: int, deterministic: bool,
    need_x: bool, need_y: bool, need_scale: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    spec = _spec(x, y, scale, scale_value, bias, bias_value, exclude, offset, x_labels, y_labels, chunk_size,
                 deterministic)
    with no_autocast(x.device):
        grads = backend_module(backend).similarity_lse_backward(
            spec, grad_row, grad_col, row_stats, col_stats, (need_x, need_y, need_scale, need_bias)
        )
    return tuple(_empty_if_none(g, x) for g in grads)


def _fake_feature_grads(x, y, scale, bias, need_x, need_y, need_scale, need_bias, dtype=None):
    """Shapes of (dx, dy, dscale, dbias): each input's dtype, or ``dtype`` when given."""
    def like(t, needed):
        return t.new_empty(t.shape, dtype=dtype or t.dtype) if needed else x.new_empty(0)

    return like(x, need_x), like(y, need_y), like(scale, need_scale), like(bias, need_bias)


@_similarity_lse_backward_op.register_fake
def _(grad_row, grad_col, x, y, scale, scale_value, bias, bias_value, row_stats, col_stats, exclude,
      offset, x_labels, y_labels, backend, chunk_size, deterministic, need_x, need_y, need_scale,
      need_bias):
    return _fake_feature_grads(x, y, scale, bias, need_x, need_y, need_scale, need_bias)


def _lse_setup(ctx, inputs, output):
    (x, y, scale, scale_value, bias, bias_value, exclude, offset, x_labels, y_labels, rows, cols,
     backend, chunk_size, deterministic) = inputs
    _, _, row_stats, col_stats = output
    ctx.mark_non_differentiable(row_stats, col_stats)
    ctx.save_for_backward(x, y, scale, bias, x_labels, y_labels, row_stats, col_stats)
    ctx.args = (scale_value, bias_value, exclude, offset, backend, chunk_size, deterministic, rows, cols)
    ctx.set_materialize_grads(False)


def _lse_backward(ctx, grad_row, grad_col, _grad_row_stats, _grad_col_stats):
    x, y, scale, bias, x_labels, y_labels, row_stats, col_stats = ctx.saved_tensors
    scale_value, bias_value, exclude, offset, backend, chunk_size, deterministic, rows, cols = ctx.args
    grad_row = grad_row if rows else None
    grad_col = grad_col if cols else None
    need = ctx.needs_input_grad
    need_x, need_y, need_scale, need_bias = need[0], need[1], need[2], need[4]
    dx = dy = ds = db = None
    if (grad_row is not None or grad_col is not None) and any((need_x, need_y, need_scale, need_bias)):
        dx, dy, ds, db = _similarity_lse_backward_op(
            grad_row, grad_col, x, y, scale, scale_value, bias, bias_value, row_stats, col_stats, exclude,
            offset, x_labels, y_labels, backend, chunk_size, deterministic, need_x, need_y, need_scale,
            need_bias,
        )
        dx, dy, ds, db = _keep_needed((dx, dy, ds, db), (need_x, need_y, need_scale, need_bias))
    return (dx, dy, ds, None, db) + (None,) * 10


_similarity_lse_op.register_autograd(_lse_backward, setup_context=_lse_setup)
_similarity_lse_backward_op.register_autograd(_double_backward_error, setup_context=_no_setup)


# ----------------------------------------------------------------------------- pairwise_sigmoid


@torch.library.custom_op("mmloss::pairwise_sigmoid", mutates_args=())
def _pairwise_sigmoid_op(
    x: Tensor, y: Tensor, scale: Optional[Tensor], scale_value: float, bias: Optional[Tensor],
    bias_value: float, positives: str, offset: int, x_labels: Optional[Tensor],
    y_labels: Optional[Tensor], backend: str, chunk_size: int, deterministic: bool,
) -> Tensor:
    spec = _spec(x, y, scale, scale_value, bias, bias_value, positives, offset, x_labels, y_labels, chunk_size,
                 deterministic)
    with no_autocast(x.device):
        return backend_module(backend).pairwise_sigmoid_forward(spec)


@_pairwise_sigmoid_op.register_fake
def _(x, y, scale, scale_value, bias, bias_value, positives, offset, x_labels, y_labels, backend, chunk_size,
      deterministic):
    return x.new_empty(x.shape[0], dtype=_out_dtype(x))


@torch.library.custom_op("mmloss::pairwise_sigmoid_backward", mutates_args=())
def _pairwise_sigmoid_backward_op(
    grad: Tensor, x: Tensor, y: Tensor, scale: Optional[Tensor], scale_value: float,
    bias: Optional[Tensor], bias_value: float, positives: str, offset: int,
    x_labels: Optional[Tensor], y_labels: Optional[Tensor], backend: str, chunk_size: int,
    deterministic: bool, need_x: bool, need_y: bool, need_scale: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    spec = _spec(x, y, scale, scale_value, bias, bias_value, positives, offset, x_labels, y_labels, chunk_size,
                 deterministic)
    with no_autocast(x.device):
        grads = backend_module(backend).pairwise_sigmoid_backward(
            spec, grad, (need_x, need_y, need_scale, need_bias)
        )
    return tuple(_empty_if_none(g, x) for g in grads)


@_pairwise_sigmoid_backward_op.register_fake
def _(grad, x, y, scale, scale_value, bias, bias_value, positives, offset, x_labels, y_labels,
      backend, chunk_size, deterministic, need_x, need_y, need_scale, need_bias):
    return _fake_feature_grads(x, y, scale, bias, need_x, need_y, need_scale, need_bias)


def _sigmoid_setup(ctx, inputs, output):
    (x, y, scale, scale_value, bias, bias_value, positives, offset, x_labels, y_labels, backend,
     chunk_size, deterministic) = inputs
    ctx.save_for_backward(x, y, scale, bias, x_labels, y_labels)
    ctx.args = (scale_value, bias_value, positives, offset, backend, chunk_size, deterministic)
    ctx.set_materialize_grads(False)


def _sigmoid_backward(ctx, grad):
    x, y, scale, bias, x_labels, y_labels = ctx.saved_tensors
    scale_value, bias_value, positives, offset, backend, chunk_size, deterministic = ctx.args
    need = ctx.needs_input_grad
    need_x, need_y, need_scale, need_bias = need[0], need[1], need[2], need[4]
    dx = dy = ds = db = None
    if grad is not None and any((need_x, need_y, need_scale, need_bias)):
        dx, dy, ds, db = _pairwise_sigmoid_backward_op(
            grad, x, y, scale, scale_value, bias, bias_value, positives, offset, x_labels,
            y_labels, backend, chunk_size, deterministic, need_x, need_y, need_scale, need_bias,
        )
        dx, dy, ds, db = _keep_needed((dx, dy, ds, db), (need_x, need_y, need_scale, need_bias))
    return (dx, dy, ds, None, db) + (None,) * 8


_pairwise_sigmoid_op.register_autograd(_sigmoid_backward, setup_context=_sigmoid_setup)
_pairwise_sigmoid_backward_op.register_autograd(_double_backward_error, setup_context=_no_setup)


# ------------------------------------------------------------- pairwise_sigmoid, summed over rows


@torch.library.custom_op("mmloss::pairwise_sigmoid_sum", mutates_args=())
def _pairwise_sigmoid_sum_op(
    x: Tensor, y: Tensor, scale: Optional[Tensor], scale_value: float, bias: Optional[Tensor],
    bias_value: float, positives: str, offset: int, x_labels: Optional[Tensor],
    y_labels: Optional[Tensor], backend: str, chunk_size: int, deterministic: bool,
    need_x: bool, need_y: bool, need_scale: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(Σ_i σ_i, dx, dy, dscale, dbias): the gradients of the total are formed in the forward
    pass (every row's upstream gradient is the same scalar), so backward only rescales them.
    They are held in fp32 (fp64 for fp64 inputs) and cast to the inputs' dtypes after scaling."""
    spec = _spec(x, y, scale, scale_value, bias, bias_value, positives, offset, x_labels, y_labels, chunk_size,
                 deterministic)
    with no_autocast(x.device):
        total, *grads = backend_module(backend).pairwise_sigmoid_sum(
            spec, (need_x, need_y, need_scale, need_bias)
        )
    return (total,) + tuple(_empty_if_none(g, x) for g in grads)


@_pairwise_sigmoid_sum_op.register_fake
def _(x, y, scale, scale_value, bias, bias_value, positives, offset, x_labels, y_labels, backend, chunk_size,
      deterministic, need_x, need_y, need_scale, need_bias):
    total = x.new_empty((), dtype=_out_dtype(x))
    return (total,) + _fake_feature_grads(x, y, scale, bias, need_x, need_y, need_scale, need_bias,
                                          dtype=_out_dtype(x))


def _sigmoid_sum_setup(ctx, inputs, output):
    x, y, scale, _, bias = inputs[:5]
    ctx.needs = inputs[-4:]
    ctx.dtypes = (x.dtype, y.dtype, None if scale is None else scale.dtype, None if bias is None else bias.dtype)
    ctx.save_for_backward(*output[1:])
    ctx.set_materialize_grads(False)


def _sigmoid_sum_backward(ctx, grad_total, *unused):
    if torch.is_grad_enabled():
        _double_backward_error(ctx)
    dx, dy, ds, db = ctx.saved_tensors
    out = [None] * 17
    if grad_total is not None:
        slots = (0, 1, 2, 4)
        for slot, g, needed, dtype in zip(slots, (dx, dy, ds, db), ctx.needs, ctx.dtypes):
            if needed:
                out[slot] = (g * grad_total).to(dtype)
    return tuple(out)


_pairwise_sigmoid_sum_op.register_autograd(_sigmoid_sum_backward, setup_context=_sigmoid_sum_setup)


# ----------------------------------------------------------------------------- public wrappers


def _split_scalar(value, x: Tensor) -> tuple[Optional[Tensor], float]:
    if isinstance(value, Tensor):
        if value.device != x.device:
            value = value.to(x.device)  # a 0-d CPU scalar (validated) follows the features
        return value, 0.0
    return None, float(value)


def _check_marks(kind: str, marks: str, offset, x_labels, y_labels, n: int, m: int, device):
    """Validated (x_labels, y_labels), as int64 when given."""
    V.check_choice(kind, marks, MARKS)
    V.check_int("offset", offset)
    if marks == "same_label":
        if x_labels is None or y_labels is None:
            raise ValueError(f"{kind}='same_label' needs both x_labels and y_labels")
        return V.check_labels("x_labels", x_labels, n, device), V.check_labels("y_labels", y_labels, m, device)
    if x_labels is not None or y_labels is not None:
        raise ValueError(f"x_labels / y_labels are only used with {kind}='same_label', got {kind}={marks!r}")
    return None, None


def _check_chunk(chunk_size) -> int:
    if chunk_size is None:
        return 0
    chunk_size = V.check_int("chunk_size", chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    return chunk_size


def _resolve_deterministic(deterministic) -> bool:
    """Deterministic kernels by default (``MMLOSS_DETERMINISTIC=0`` changes the default) and
    always under ``torch.use_deterministic_algorithms(True)``."""
    if torch.are_deterministic_algorithms_enabled():
        return True
    if deterministic is None:
        return _deterministic_default()
    return V.check_bool("deterministic", deterministic)


@torch.compiler.assume_constant_result
def _deterministic_default() -> bool:
    return deterministic_default()


def _common(x, y, scale, bias, backend, chunk_size):
    """Validated (x, y, scale, bias, backend name, chunk rows); numpy scalars become floats."""
    x, y = V.prepare_features("x", x, "y", y)
    dt = _out_dtype(x)
    scale = V.check_scalar("scale", scale, rows=x.shape[0], device=x.device, dtype=dt)
    if bias is not None:
        bias = V.check_scalar("bias", bias, device=x.device, dtype=dt)
    return x, y, scale, bias, resolve_backend(backend, x.device, x.dtype), _check_chunk(chunk_size)


def _scalar_args(x: Tensor, scale, bias):
    scale_t, scale_v = _split_scalar(scale, x)
    bias_t, bias_v = _split_scalar(0.0 if bias is None else bias, x)
    return scale_t, scale_v, bias_t, bias_v


def _requires(t) -> bool:
    return isinstance(t, Tensor) and t.requires_grad and torch.is_grad_enabled()


def similarity_lse(
    x: Tensor, y: Tensor, scale, bias=None, *, exclude: str = "none", offset: int = 0,
    x_labels: Optional[Tensor] = None, y_labels: Optional[Tensor] = None, rows: bool = True,
    cols: bool = True, backend: str = "auto", chunk_size: Optional[int] = None,
    deterministic: Optional[bool] = None,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Row and column log-sum-exp of ``L = s·x·yᵀ + b`` over allowed pairs (docs/losses.md, primitives).

    Args:
        x: (N, D) fp16/bf16/fp32/fp64, any strides. y: (M, D), same device; dtypes are promoted
            (and autocast is honoured) as a matmul would.
        scale: float, 0-d tensor, or (N,) tensor (per-row scale); any finite value.
        bias: None, float or 0-d tensor.
        exclude: "none" | "diagonal" (pairs ``j == i + offset``) | "same_label"
            (``x_labels[i] == y_labels[j]``; both (N,) / (M,) integer tensors).
        rows / cols: which statistics to return; the other is None.
        backend: "auto" | "reference" | "torch" | "triton" | ...; chunk_size: rows per chunk for
            the torch backend (default from the workspace budget, see ``MMLOSS_CHUNK_BYTES``).
        deterministic: True runs bit-reproducible kernels; False lets a backend use atomics
            where faster (ignored under ``torch.use_deterministic_algorithms(True)``); None means
            True unless the environment sets ``MMLOSS_DETERMINISTIC=0``.

    Returns:
        ``(row_lse (N,) | None, col_lse (M,) | None)`` in fp32 (fp64 for fp64 inputs). A row or
        column whose every pair is excluded gives −inf and a zero gradient. Gradients reach x, y,
        scale and bias. Memory O((N+M)·D) plus the backend's bounded workspace.
    """
    x, y, scale, bias, name, chunk = _common(x, y, scale, bias, backend, chunk_size)
    x_labels, y_labels = _check_marks("exclude", exclude, offset, x_labels, y_labels, x.shape[0], y.shape[0],
                                      x.device)
    V.check_bool("rows", rows)
    V.check_bool("cols", cols)
    if not (rows or cols):
        raise ValueError("similarity_lse needs rows=True or cols=True")
    if name == "reference":
        from .. import reference

        return reference.similarity_lse(
            x, y, scale, bias, exclude=exclude, offset=offset, x_labels=x_labels,
            y_labels=y_labels, rows=rows, cols=cols,
        )
    row, col, _, _ = _similarity_lse_op(
        x, y, *_scalar_args(x, scale, bias), exclude, offset, x_labels, y_labels, rows, cols,
        name, chunk, _resolve_deterministic(deterministic),
    )
    return _none_if_empty(row, rows), _none_if_empty(col, cols)


def pairwise_sigmoid(
    x: Tensor, y: Tensor, scale, bias=None, *, positives: str = "diagonal", offset: int = 0,
    x_labels: Optional[Tensor] = None, y_labels: Optional[Tensor] = None,
    backend: str = "auto", chunk_size: Optional[int] = None, deterministic: Optional[bool] = None,
    reduction: str = "none",
) -> Tensor:
    """Per-row sums ``Σ_j softplus(−z_ij·L_ij)`` with ``z = +1`` on positives, −1 elsewhere.

    ``L = s·x·yᵀ + b`` (see ``similarity_lse`` for x, y, scale, bias, backend, chunk_size,
    deterministic). ``positives``: "diagonal" (``j == i + offset``) | "same_label" | "none"
    (all negatives, e.g. a remote shard). Returns (N,) fp32 (fp64 for fp64 inputs), or with
    ``reduction="sum"`` the 0-d total Σ_i, whose gradients are formed during the forward pass
    (one recompute fewer). Gradients reach x, y, scale and bias. Memory O((N+M)·D) plus the
    backend's bounded workspace. docs/losses.md, primitives.
    """
    x, y, scale, bias, name, chunk = _common(x, y, scale, bias, backend, chunk_size)
    x_labels, y_labels = _check_marks("positives", positives, offset, x_labels, y_labels, x.shape[0],
                                      y.shape[0], x.device)
    V.check_choice("reduction", reduction, ("none", "sum"))
    if name == "reference":
        from .. import reference

        rows = reference.pairwise_sigmoid(
            x, y, scale, bias, positives=positives, offset=offset, x_labels=x_labels,
            y_labels=y_labels,
        )
        return rows.sum() if reduction == "sum" else rows
    args = (x, y, *_scalar_args(x, scale, bias), positives, offset, x_labels, y_labels, name, chunk,
            _resolve_deterministic(deterministic))
    if reduction == "none":
        return _pairwise_sigmoid_op(*args)
    needs = (_requires(x), _requires(y), _requires(scale), _requires(bias))
    return _pairwise_sigmoid_sum_op(*args, *needs)[0]
