"""``similarity_kl``: row/column KL (or cross-entropy) between a teacher's and a student's
softmax over the same N×M pairs, without storing either matrix (docs/losses.md, "The three fused
primitives"; docs/design.md, "The primitives").

The primitive is the ``torch.library`` custom op ``mmloss::similarity_kl``, generated with its
fake kernel and autograd formula from the ``SIMILARITY_KL`` declaration (``_schema.py``); the
formula calls the op ``mmloss::similarity_kl_backward`` (whose own backward raises: no double
backward). The ``reference`` backend bypasses the ops: it
is dense torch and autograd (``mmloss.reference.similarity_kl``).

Backends implement ``similarity_kl_forward`` / ``similarity_kl_backward`` (signatures in the
docstring of ``mmloss.ops.torch_kl``) on a ``KLSpec``: ``mmloss.ops.torch_kl`` for "torch",
``mmloss.ops.triton`` for "triton" (the ``SIMILARITY_KL`` declaration below).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from ._args import check_chunk_size, resolve_deterministic, split_scalar
from ._backends import resolve_backend
from ._schema import Arg, Out, Primitive, register, row_col_backward, row_col_fake
from ._spec import KLSpec

Tensor = torch.Tensor


SIMILARITY_KL = register(Primitive(
    name="similarity_kl",
    # Only the student (x_s, y_s, scale_s) receives gradients; the teacher arrives detached.
    args=(
        Arg("x_s", "Tensor", grad=True), Arg("y_s", "Tensor", grad=True),
        Arg("x_t", "Tensor"), Arg("y_t", "Tensor"),
        Arg("scale_s", "Tensor?", grad=True), Arg("scale_s_value", "float"),
        Arg("scale_t", "Tensor?"), Arg("scale_t_value", "float"),
        Arg("rows", "bool"), Arg("cols", "bool"), Arg("cross_entropy", "bool"),
        Arg("backend", "str"), Arg("chunk_size", "int"), Arg("deterministic", "bool"),
    ),
    # (row (N,) | (0,), col (M,) | (0,), row_stats (4, N|0), col_stats (4, M|0)): the statistics
    # are the backend's unrounded record of the student's and the teacher's softmax per row /
    # column (max and sum, in the backend's units), saved for its backward.
    outputs=(Out("row"), Out("col"), Out("row_stats", saved=True), Out("col_stats", saved=True)),
    modules={"torch": "mmloss.ops.torch_kl", "triton": "mmloss.ops.triton"},
    spec=lambda p: KLSpec(p.x_s, p.y_s, p.x_t, p.y_t, p.scale_s, p.scale_s_value, p.scale_t, p.scale_t_value,
                          p.chunk_size, p.deterministic),
    forward=lambda module, spec, p: module.similarity_kl_forward(spec, p.rows, p.cols, p.cross_entropy),
    fake=lambda p: row_col_fake(p.x_s, p.y_s, p.rows, p.cols, stat_fields=4),
    backward=row_col_backward("similarity_kl_backward"),
))


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
    scale_s = V.check_scalar("scale_s", scale_s, device=x_s.device, dtype=V.compute_dtype(x_s))
    scale_t = V.check_scalar("scale_t", scale_t, device=x_s.device, dtype=V.compute_dtype(x_s))
    V.check_bool("rows", rows)
    V.check_bool("cols", cols)
    V.check_bool("cross_entropy", cross_entropy)
    if not (rows or cols):
        raise ValueError("similarity_kl needs rows=True or cols=True")
    chunk = check_chunk_size(chunk_size)
    name = resolve_backend(backend, x_s.device)
    x_t, y_t, scale_t = x_t.detach(), y_t.detach(), _detached_scalar(scale_t)
    if name == "reference":
        from .. import reference

        return reference.similarity_kl(x_s, y_s, x_t, y_t, scale_s, scale_t, rows=rows, cols=cols,
                                       cross_entropy=cross_entropy)
    scale_s, scale_s_value = split_scalar(scale_s, x_s)
    scale_t, scale_t_value = split_scalar(scale_t, x_s)
    row, col, _, _ = SIMILARITY_KL(
        x_s=x_s, y_s=y_s, x_t=x_t, y_t=y_t, scale_s=scale_s, scale_s_value=scale_s_value, scale_t=scale_t,
        scale_t_value=scale_t_value, rows=rows, cols=cols, cross_entropy=cross_entropy, backend=name,
        chunk_size=chunk, deterministic=resolve_deterministic(deterministic),
    )
    return (row if rows else None), (col if cols else None)


__all__ = ["similarity_kl"]
