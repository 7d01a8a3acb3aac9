"""One fused-primitive call with every option spelled out: the unit of the randomized agreement
suites (tests/test_agreement.py and its Triton-interpreter twin).

``build_primitive_case`` turns a ``PrimitiveCase`` into what ``agree`` needs;
``run_primitive_case`` runs it on a backend against the float64 reference.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

import mmloss

from .. import _validation as V
from .agree import agree
from .cases import on_device, prescaled
from .compare import DTYPES, Comparison

Tensor = torch.Tensor


@dataclasses.dataclass(frozen=True)
class PrimitiveCase:
    """One call of a fused primitive with every option spelled out (randomized agreement suites).

    primitive: "lse" (``similarity_lse``), "sigmoid" (``pairwise_sigmoid``), "sigmoid_sum"
    (``pairwise_sigmoid(..., reduction="sum")``) or "kl" (``similarity_kl``). Features: N×D and
    M×D Gaussian rows of typical norm ``radius`` (row norms vary), drawn from ``seed`` in float64
    and rounded to ``dtype``. scale_kind: "float" | "tensor" (0-d, receives a gradient) |
    "per_row" ((N,), receives a gradient; row i gets ``scale``·(0.5 + i/N)) | "frozen" (0-d,
    no gradient). bias: None or a value; bias_kind "float" | "tensor" (0-d, receives a
    gradient). mode: ``exclude`` of "lse" / ``positives`` of the sigmoid ("none" | "diagonal" |
    "same_label", labels drawn among ``classes``), with ``offset`` for "diagonal". rows / cols:
    the outputs asked of "lse" and "kl". noncontiguous: x is a strided column slice and y
    column-major. KL: the teacher has ``teacher_d`` columns (default D) and scale
    ``teacher_scale``; ``cross_entropy`` as in ``similarity_kl``.
    """

    primitive: str
    n: int
    m: int
    d: int
    dtype: str = "fp32"
    seed: int = 0
    radius: float = 1.0
    scale: float = 1.0
    scale_kind: str = "float"
    bias: Optional[float] = None
    bias_kind: str = "float"
    mode: str = "none"
    offset: int = 0
    classes: int = 2
    rows: bool = True
    cols: bool = True
    noncontiguous: bool = False
    chunk_size: Optional[int] = None
    teacher_d: Optional[int] = None
    teacher_scale: float = 1.0
    cross_entropy: bool = False


def _case_rows(gen: torch.Generator, n: int, d: int, radius: float) -> Tensor:
    """(n, d) float64 rows of norms about ``radius`` (each row's norm varies by up to ×2)."""
    t = torch.randn(n, d, generator=gen, dtype=torch.float64)
    t = torch.nn.functional.normalize(t, dim=1)
    return t * radius * (0.5 + torch.rand(n, 1, generator=gen, dtype=torch.float64))


def _feature_leaf(t64: Tensor, dtype: torch.dtype, device, layout: str) -> Tensor:
    """A leaf with ``t64``'s values in ``dtype``: contiguous, "slice" (every other column of a
    wider buffer) or "column_major" (transposed storage)."""
    t = t64.to(dtype)
    if layout == "slice":
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=dtype)
        wide[:, ::2] = t
        t = wide.to(device)[:, ::2]
    elif layout == "column_major":
        t = t.t().contiguous().to(device).t()
    else:
        t = t.to(device)
    return t.detach().requires_grad_(True)


def case_logit_bound(x: Tensor, y: Tensor, scale, bias=None) -> float:
    """L = max_i |s_i|·‖x_i‖ · max_j ‖y_j‖ + |b| for ``s·x·yᵀ + b`` (a number, 0-d or (N,) scale)."""
    x_norms = torch.linalg.vector_norm(x.detach().double(), dim=1)
    y_max = float(torch.linalg.vector_norm(y.detach().double(), dim=1).max()) if y.shape[0] else 0.0
    s = scale.detach().double().abs().cpu() if isinstance(scale, Tensor) else torch.tensor(abs(float(scale)))
    x_scaled = float((s * x_norms.cpu()).max()) if x.shape[0] else 0.0
    b = 0.0 if bias is None else abs(float(bias))
    return x_scaled * y_max + b


# ----------------------------------------------------------------------------- the arguments of a case


def _case_scale(case: PrimitiveCase, param_dtype: torch.dtype, device: torch.device):
    """The scale argument ``case.scale_kind`` asks for (a float, a 0-d or an (N,) tensor)."""
    if case.scale_kind == "float":
        return float(case.scale)
    if case.scale_kind == "per_row":
        ramp = 0.5 + torch.arange(case.n, dtype=torch.float64) / max(case.n, 1)
        return (case.scale * ramp).to(device=device, dtype=param_dtype).requires_grad_(True)
    if case.scale_kind in ("tensor", "frozen"):
        return torch.tensor(case.scale, dtype=param_dtype, device=device,
                            requires_grad=case.scale_kind == "tensor")
    raise ValueError(f"scale_kind must be float, tensor, per_row or frozen, got {case.scale_kind!r}")


def _case_bias(case: PrimitiveCase, param_dtype: torch.dtype, device: torch.device):
    if case.bias is None:
        return None
    if case.bias_kind == "float":
        return float(case.bias)
    return torch.tensor(case.bias, dtype=param_dtype, device=device, requires_grad=True)


def _case_marks(case: PrimitiveCase, gen: torch.Generator, device: torch.device) -> dict:
    """The keywords that mark positive / excluded pairs for ``case.mode`` (labels drawn from ``gen``)."""
    marks = {}
    if case.mode == "same_label":
        marks["x_labels"] = torch.randint(0, case.classes, (case.n,), generator=gen).to(device)
        marks["y_labels"] = torch.randint(0, case.classes, (case.m,), generator=gen).to(device)
    elif case.mode == "diagonal":
        marks["offset"] = case.offset
    return marks


# ----------------------------------------------------------------------------- one builder per primitive


def _kl_case(case: PrimitiveCase, backend: str, gen: torch.Generator, x: Tensor, y: Tensor, scale,
             dtype: torch.dtype, device: torch.device):
    """What ``build_primitive_case`` returns for a "kl" case: the student is (x, y, scale), the
    teacher (no gradient) is drawn next from ``gen``."""
    d_t = case.teacher_d or case.d
    x_t = _feature_leaf(_case_rows(gen, case.n, d_t, case.radius), dtype, device, "contiguous").detach()
    y_t = _feature_leaf(_case_rows(gen, case.m, d_t, case.radius), dtype, device, "contiguous").detach()
    options = dict(rows=case.rows, cols=case.cols, cross_entropy=case.cross_entropy)

    def fast(xs, ys, xt, yt, ss, st):
        return mmloss.ops.similarity_kl(xs, ys, xt, yt, ss, st, backend=backend,
                                        chunk_size=case.chunk_size, **options)

    def ref(xs, ys, xt, yt, ss, st):
        return mmloss.reference.similarity_kl(xs, ys, xt, yt, ss, st, **options)

    logit = max(case_logit_bound(x, y, scale), case_logit_bound(x_t, y_t, case.teacher_scale))
    return (fast, ref, [x, y, x_t, y_t, scale, case.teacher_scale],
            ["x_s", "y_s", "x_t", "y_t", "scale_s", "scale_t"], ["row", "col"], logit,
            [prescaled(ref, [(0, 4), (2, 5)])])


def _lse_calls(case: PrimitiveCase, backend: str, marks: dict):
    """(fast, reference, output names) of an "lse" case."""
    options = dict(exclude=case.mode, rows=case.rows, cols=case.cols, **marks)

    def fast(x_, y_, s_, b_):
        return mmloss.ops.similarity_lse(x_, y_, s_, b_, backend=backend, chunk_size=case.chunk_size, **options)

    def ref(x_, y_, s_, b_):
        return mmloss.reference.similarity_lse(x_, y_, s_, b_, **on_device(options, x_.device))

    return fast, ref, ["row_lse", "col_lse"]


def _sigmoid_calls(case: PrimitiveCase, backend: str, marks: dict):
    """(fast, reference, output names) of a "sigmoid" or "sigmoid_sum" case."""
    reduction = "sum" if case.primitive == "sigmoid_sum" else "none"
    options = dict(positives=case.mode, **marks)

    def fast(x_, y_, s_, b_):
        return mmloss.ops.pairwise_sigmoid(x_, y_, s_, b_, backend=backend, chunk_size=case.chunk_size,
                                           reduction=reduction, **options)

    def ref(x_, y_, s_, b_):
        rows = mmloss.reference.pairwise_sigmoid(x_, y_, s_, b_, **on_device(options, x_.device))
        return rows.sum() if reduction == "sum" else rows

    return fast, ref, ["total" if reduction == "sum" else "rows"]


def build_primitive_case(case: PrimitiveCase, backend: str, device="cpu"):
    """(fast, reference, inputs, names, output_names, logit_bound, dense_variants) of ``case``
    for ``agree``."""
    device = torch.device(device)
    dtype = DTYPES[case.dtype]
    param_dtype = V.compute_dtype(dtype)
    gen = torch.Generator().manual_seed(case.seed)
    x64 = _case_rows(gen, case.n, case.d, case.radius)
    y64 = _case_rows(gen, case.m, case.d, case.radius)
    x = _feature_leaf(x64, dtype, device, "slice" if case.noncontiguous else "contiguous")
    y = _feature_leaf(y64, dtype, device, "column_major" if case.noncontiguous else "contiguous")
    scale = _case_scale(case, param_dtype, device)
    if case.primitive == "kl":
        return _kl_case(case, backend, gen, x, y, scale, dtype, device)
    bias = _case_bias(case, param_dtype, device)
    marks = _case_marks(case, gen, device)
    logit = case_logit_bound(x, y, scale, case.bias)
    if case.primitive == "lse":
        fast, ref, outputs = _lse_calls(case, backend, marks)
    elif case.primitive in ("sigmoid", "sigmoid_sum"):
        fast, ref, outputs = _sigmoid_calls(case, backend, marks)
    else:
        raise ValueError(f"primitive must be lse, sigmoid, sigmoid_sum or kl, got {case.primitive!r}")
    return fast, ref, [x, y, scale, bias], ["x", "y", "scale", "bias"], outputs, logit, [prescaled(ref, [(0, 2)])]


def run_primitive_case(case: PrimitiveCase, backend: str, device="cpu") -> list[Comparison]:
    """Every comparison (values, then gradients) of ``case`` on ``backend`` against the float64
    reference, under the rules of ``compare_values`` / ``compare_grads``."""
    fast, ref, inputs, names, outputs, logit, variants = build_primitive_case(case, backend, device)
    return agree(fast, ref, inputs, DTYPES[case.dtype], logit, names=names, output_names=outputs,
                 seed=case.seed, dense_variants=variants)
