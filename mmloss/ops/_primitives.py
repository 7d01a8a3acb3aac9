"""Public fused primitives ``similarity_lse`` and ``pairwise_sigmoid``: their declarations
(``Primitive`` tables, from which ``_schema.register`` builds the ``torch.library`` ops
``mmloss::similarity_lse``, ``mmloss::pairwise_sigmoid``, ``mmloss::pairwise_sigmoid_sum`` and
their backward ops), then the validating wrappers users call.

The ops have fake kernels for symbolic shapes and an autograd formula that calls the backward
op, so ``torch.compile(fullgraph=True)`` traces both directions. The ``reference`` backend
bypasses the ops: it is dense torch and autograd.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from ._args import check_chunk_size, check_marks, requires_grad, resolve_deterministic, scale_and_bias
from ._backends import resolve_backend
from ._budget import current_logit_budget
from ._schema import Arg, Out, Primitive, register, row_col_backward, row_col_fake
from ._spec import PairSpec, keeps_logits

Tensor = torch.Tensor

# Backend name → module defining similarity_lse_forward/_backward and pairwise_sigmoid_*.
PAIR_MODULES = {"torch": "mmloss.ops.torch_chunked", "triton": "mmloss.ops.triton"}


def _pair_args(marks: str, *middle: Arg, extra: tuple[Arg, ...] = ()) -> tuple[Arg, ...]:
    """The arguments every pair primitive takes; ``marks`` names the mark-kind argument
    ("exclude" or "positives"), ``middle`` comes before the backend selection."""
    return (
        Arg("x", "Tensor", grad=True), Arg("y", "Tensor", grad=True),
        Arg("scale", "Tensor?", grad=True), Arg("scale_value", "float"),
        Arg("bias", "Tensor?", grad=True), Arg("bias_value", "float"),
        Arg(marks, "str"), Arg("offset", "int"), Arg("x_labels", "Tensor?"), Arg("y_labels", "Tensor?"),
        *middle,
        Arg("backend", "str"), Arg("chunk_size", "int"), Arg("deterministic", "bool"),
        *extra,
    )


def _pair_spec(marks: str):
    def spec(p) -> PairSpec:
        # Only similarity_lse declares logit_budget; the other pair primitives keep nothing.
        return PairSpec(p.x, p.y, p.scale, p.scale_value, p.bias, p.bias_value, getattr(p, marks), p.offset,
                        p.x_labels, p.y_labels, p.chunk_size, p.deterministic, getattr(p, "logit_budget", 0))
    return spec


# ----------------------------------------------------------------------------- similarity_lse


def _similarity_lse_fake(p):
    dt = V.compute_dtype(p.x)
    n, m = p.x.shape[0], p.y.shape[0]
    logits = p.x.new_empty((n, m), dtype=dt) if keeps_logits(n, m, dt, p.logit_budget) else p.x.new_empty(0, dtype=dt)
    return (*row_col_fake(p.x, p.y, p.rows, p.cols, stat_fields=2), logits)


SIMILARITY_LSE = register(Primitive(
    name="similarity_lse",
    # logit_budget: bytes the call may keep its logits in (``_spec.keeps_logits``; 0 = never).
    args=_pair_args("exclude", Arg("rows", "bool"), Arg("cols", "bool"), extra=(Arg("logit_budget", "int"),)),
    # The LSEs (empty where not asked) and the backend's unrounded statistics (2, N) / (2, M)
    # (max and log-sum in the backend's own units), which only that backend's backward reads:
    # recomputing exp(L − max − logsum) keeps the exponent exact at any logit magnitude, where
    # one rounded fp32 LSE would lose |L|·2⁻²⁴. ``logits``: the (N, M) compute-dtype matrix
    # S = s·x·yᵀ (excluded pairs −inf, bias not added) when it fits ``logit_budget``, else an
    # empty (0,) tensor; a backward given it forms the gradient from it instead of recomputing.
    outputs=(Out("row_lse"), Out("col_lse"), Out("row_stats", saved=True), Out("col_stats", saved=True),
             Out("logits", saved=True)),
    modules=PAIR_MODULES,
    spec=_pair_spec("exclude"),
    forward=lambda module, spec, p: module.similarity_lse_forward(spec, p.rows, p.cols),
    fake=_similarity_lse_fake,
    backward=row_col_backward("similarity_lse_backward"),
))


# ----------------------------------------------------------------------------- pairwise_sigmoid


PAIRWISE_SIGMOID = register(Primitive(
    name="pairwise_sigmoid",
    args=_pair_args("positives"),
    outputs=(Out("rows"),),
    modules=PAIR_MODULES,
    spec=_pair_spec("positives"),
    forward=lambda module, spec, p: module.pairwise_sigmoid_forward(spec),
    fake=lambda p: p.x.new_empty(p.x.shape[0], dtype=V.compute_dtype(p.x)),
    backward=lambda module, spec, p, grads, saved, needs: module.pairwise_sigmoid_backward(spec, grads.rows, needs),
))


def _sigmoid_sum_fake(p):
    dt = V.compute_dtype(p.x)

    def grad(t, needed):
        return t.new_empty(t.shape, dtype=dt) if needed else p.x.new_empty(0)

    return (p.x.new_empty((), dtype=dt), grad(p.x, p.need_x), grad(p.y, p.need_y), grad(p.scale, p.need_scale),
            grad(p.bias, p.need_bias))


# Σ_i σ_i with the gradients of the total formed in the forward pass (every row's upstream
# gradient is the same scalar), so backward only rescales them. They are held in fp32 (fp64 for
# fp64 inputs) and cast to the inputs' dtypes after scaling.
PAIRWISE_SIGMOID_SUM = register(Primitive(
    name="pairwise_sigmoid_sum",
    args=_pair_args("positives", extra=tuple(Arg(f"need_{n}", "bool") for n in ("x", "y", "scale", "bias"))),
    outputs=(Out("total"), Out("grad_x", grad_of="x"), Out("grad_y", grad_of="y"),
             Out("grad_scale", grad_of="scale"), Out("grad_bias", grad_of="bias")),
    modules=PAIR_MODULES,
    spec=_pair_spec("positives"),
    forward=lambda module, spec, p: module.pairwise_sigmoid_sum(spec, (p.need_x, p.need_y, p.need_scale,
                                                                        p.need_bias)),
    fake=_sigmoid_sum_fake,
))


# ----------------------------------------------------------------------------- public wrappers


def _common(x, y, scale, bias, backend, chunk_size):
    """Validated (x, y, scale, bias, backend name, chunk rows); numpy scalars become floats."""
    x, y = V.prepare_features("x", x, "y", y)
    dt = V.compute_dtype(x)
    scale = V.check_scalar("scale", scale, rows=x.shape[0], device=x.device, dtype=dt)
    if bias is not None:
        bias = V.check_scalar("bias", bias, device=x.device, dtype=dt)
    return x, y, scale, bias, resolve_backend(backend, x.device, x.dtype), check_chunk_size(chunk_size)


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
        scale and bias. Memory O((N+M)·D) plus the backend's bounded workspace — unless a
        logit budget (``mmloss.logit_budget`` / ``MMLOSS_LOGIT_BUDGET``, default 0) admits the
        call's N×M compute-dtype logits: the torch backend then keeps them from the forward
        (N·M·4 bytes, held until the backward) and its backward skips the recompute GEMM.
    """
    x, y, scale, bias, name, chunk = _common(x, y, scale, bias, backend, chunk_size)
    return _similarity_lse(x, y, scale, bias, exclude, offset, x_labels, y_labels, rows, cols, name, chunk,
                           deterministic)


def similarity_lse_prevalidated(
    x: Tensor, y: Tensor, scale, bias=None, *, exclude: str = "none", offset: int = 0,
    x_labels: Optional[Tensor] = None, y_labels: Optional[Tensor] = None, rows: bool = True,
    cols: bool = True, backend: str = "auto", chunk_size: Optional[int] = None,
    deterministic: Optional[bool] = None,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``similarity_lse`` for a loss that has validated its arguments the way ``_common`` does:
    x, y from ``V.prepare_features`` (one dtype, same device and D), scale / bias from
    ``V.check_scalar`` with x's device and compute dtype (0-d or float here). The checks that
    would only repeat those are skipped (they cost more host time than a small call's GEMMs);
    the backend, chunk size, marks and flags are validated as in ``similarity_lse``."""
    name = resolve_backend(backend, x.device, x.dtype)
    return _similarity_lse(x, y, scale, bias, exclude, offset, x_labels, y_labels, rows, cols, name,
                           check_chunk_size(chunk_size), deterministic)


def _similarity_lse(x, y, scale, bias, exclude, offset, x_labels, y_labels, rows, cols, name, chunk,
                    deterministic):
    """``similarity_lse`` after ``_common``: marks and flags, then the backend."""
    x_labels, y_labels = check_marks("exclude", exclude, offset, x_labels, y_labels, x.shape[0], y.shape[0],
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
    scale_t, scale_value, bias_t, bias_value = scale_and_bias(x, scale, bias)
    # Kept logits only pay off when a backward will read them.
    wants_grad = torch.is_grad_enabled() and (
        x.requires_grad or y.requires_grad or requires_grad(scale) or requires_grad(bias))
    row, col, _, _, _ = SIMILARITY_LSE(
        x=x, y=y, scale=scale_t, scale_value=scale_value, bias=bias_t, bias_value=bias_value,
        exclude=exclude, offset=offset, x_labels=x_labels, y_labels=y_labels, rows=rows, cols=cols,
        backend=name, chunk_size=chunk, deterministic=resolve_deterministic(deterministic),
        logit_budget=current_logit_budget() if wants_grad else 0,
    )
    return (row if rows else None), (col if cols else None)


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
    x_labels, y_labels = check_marks("positives", positives, offset, x_labels, y_labels, x.shape[0],
                                      y.shape[0], x.device)
    V.check_choice("reduction", reduction, ("none", "sum"))
    if name == "reference":
        from .. import reference

        rows = reference.pairwise_sigmoid(
            x, y, scale, bias, positives=positives, offset=offset, x_labels=x_labels,
            y_labels=y_labels,
        )
        return rows.sum() if reduction == "sum" else rows
    scale_t, scale_value, bias_t, bias_value = scale_and_bias(x, scale, bias)
    args = dict(x=x, y=y, scale=scale_t, scale_value=scale_value, bias=bias_t, bias_value=bias_value,
                positives=positives, offset=offset, x_labels=x_labels, y_labels=y_labels, backend=name,
                chunk_size=chunk, deterministic=resolve_deterministic(deterministic))
    if reduction == "none":
        return PAIRWISE_SIGMOID(**args)
    return PAIRWISE_SIGMOID_SUM(**args, need_x=requires_grad(x), need_y=requires_grad(y),
                                need_scale=requires_grad(scale), need_bias=requires_grad(bias))[0]
