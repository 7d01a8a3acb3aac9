"""Acceptance tests of the primitives ``mmloss.ops.similarity_lse`` and ``pairwise_sigmoid``.

Contract: docs/design.md "The primitives" / "Numerics rules" / "Testing rules" and docs/losses.md
"The three fused primitives". Every fast backend (``FAST_BACKENDS``: "torch", plus any other
backend that reports itself usable on CPU tensors) is compared, values and gradients w.r.t.
x, y, scale and bias under random upstream weights, with the float64 dense reference
``mmloss.reference.<same name>`` evaluated on the same (rounded) inputs.
"""
from __future__ import annotations

import math

import pytest
import torch

import mmloss
from _foundation_helpers import (
    DTYPES,
    FAST_BACKENDS,
    FP64_BACKENDS,
    backend_dtype_param,
    backend_param,
    confident_pair,
    fp64_backend_param,
    ids,
    lse_vector,
    pair,
    row_scale,
    scalar_tensor,
    sigmoid_rows,
    strided_rows,
    upstream,
)
from oracle import assert_grad_close, assert_loss_close, compare, features, oracle

ref = mmloss.reference
ops = mmloss.ops

# Ragged (N, M, D, chunk_size) covering N, M ∈ {1, 7, 129, 300} and D ∈ {1, 3, 67, 130}, N ≠ M,
# chunk sizes that leave a ragged last chunk (7 = 3+3+1, 129 = 8·16+1, 129 = 2·50+29,
# 300 = 8·37+4) and the default chunking.
SHAPES = [
    (1, 1, 1, None),
    (1, 7, 3, None),
    (7, 1, 130, None),
    (7, 129, 67, 3),
    (129, 7, 3, 16),
    (129, 300, 130, 50),
    (300, 129, 1, 37),
    (300, 300, 67, None),
]
SHAPE_IDS = [f"N{n}-M{m}-D{d}-chunk{c}" for n, m, d, c in SHAPES]

# Every mark mode, with positive and negative offsets (and one that excludes nothing).
MARK_CASES = {
    "diag": dict(mark="diagonal"),
    "diag+5": dict(mark="diagonal", offset=5),
    "diag-3": dict(mark="diagonal", offset=-3),
    "diag-beyond": dict(mark="diagonal", offset=-400),
    "same_label": dict(mark="same_label"),
    "none": dict(mark="none"),
}
MARK_SHAPES = [(129, 7, 3, 16), (7, 129, 67, 2)]


def _marks(kind: str, case: dict, n: int, m: int, seed: int) -> dict:
    """Keyword arguments of the primitive for a MARK_CASES entry (kind: "exclude"/"positives")."""
    kw = {kind: case["mark"]}
    if "offset" in case:
        kw["offset"] = case["offset"]
    if case["mark"] == "same_label":
        # 5 ids among the rows, 4 among the columns: rows with id 4 match no column.
        kw["x_labels"] = ids(n, 5, seed)
        kw["y_labels"] = ids(m, 4, seed + 1)
    return kw


def _reference_options(kw: dict) -> dict:
    """The reference takes the same options minus backend tuning (chunk_size)."""
    return {k: v for k, v in kw.items() if k != "chunk_size"}


def _check_lse(backend, x, y, scale, bias, dtype, seed=0, **kw):
    """similarity_lse vs the reference: both statistics, random row and column upstream weights."""
    rows, cols = kw.get("rows", True), kw.get("cols", True)
    n_out = (x.shape[0] if rows else 0) + (y.shape[0] if cols else 0)
    compare(lse_vector(ops.similarity_lse, backend=backend, **kw),
            lse_vector(ref.similarity_lse, **_reference_options(kw)),
            [x, y, scale, bias], dtype, what="similarity_lse", weights=upstream(n_out, seed))


def _check_sigmoid(backend, x, y, scale, bias, dtype, seed=0, **kw):
    """pairwise_sigmoid (per-row sums) vs the reference, random upstream weights."""
    compare(sigmoid_rows(ops.pairwise_sigmoid, backend=backend, **kw),
            sigmoid_rows(ref.pairwise_sigmoid, **_reference_options(kw)),
            [x, y, scale, bias], dtype, what="pairwise_sigmoid", weights=upstream(x.shape[0], seed))


# ----------------------------------------------------------------------------- shapes


@backend_param()
@pytest.mark.parametrize("n,m,d,chunk", SHAPES, ids=SHAPE_IDS)
def test_similarity_lse_shapes(backend, n, m, d, chunk):
    x, y = pair(n, m, d, seed=n + m + d)
    _check_lse(backend, x, y, row_scale(n, d), scalar_tensor(0.7), torch.float32, seed=n, chunk_size=chunk)


@backend_param()
@pytest.mark.parametrize("n,m,d,chunk", SHAPES, ids=SHAPE_IDS)
def test_pairwise_sigmoid_shapes(backend, n, m, d, chunk):
    x, y = pair(n, m, d, seed=n + m + d)
    _check_sigmoid(backend, x, y, row_scale(n, d), scalar_tensor(-2.0), torch.float32, seed=n, chunk_size=chunk)


# ----------------------------------------------------------------------------- mark modes


@backend_param()
@pytest.mark.parametrize("n,m,d,chunk", MARK_SHAPES, ids=[f"N{n}-M{m}-D{d}" for n, m, d, _ in MARK_SHAPES])
@pytest.mark.parametrize("case", list(MARK_CASES), ids=[f"exclude={c}" for c in MARK_CASES])
def test_similarity_lse_exclude(backend, case, n, m, d, chunk):
    x, y = pair(n, m, d, seed=3)
    kw = _marks("exclude", MARK_CASES[case], n, m, seed=5)
    _check_lse(backend, x, y, scalar_tensor(6.0), None, torch.float32, seed=1, chunk_size=chunk, **kw)


@backend_param()
@pytest.mark.parametrize("n,m,d,chunk", MARK_SHAPES, ids=[f"N{n}-M{m}-D{d}" for n, m, d, _ in MARK_SHAPES])
@pytest.mark.parametrize("case", list(MARK_CASES), ids=[f"positives={c}" for c in MARK_CASES])
def test_pairwise_sigmoid_positives(backend, case, n, m, d, chunk):
    x, y = pair(n, m, d, seed=4)
    kw = _marks("positives", MARK_CASES[case], n, m, seed=6)
    _check_sigmoid(backend, x, y, scalar_tensor(6.0), scalar_tensor(-3.0), torch.float32, seed=2,
                   chunk_size=chunk, **kw)


@backend_param()
def test_exclude_beyond_offset_equals_none(backend):
    """exclude="diagonal" with an offset past every column excludes nothing."""
    x, y = pair(7, 129, 3, seed=2)
    a = ops.similarity_lse(x, y, 3.0, exclude="diagonal", offset=200, backend=backend)
    b = ops.similarity_lse(x, y, 3.0, backend=backend)
    for got, want in zip(a, b):
        assert_loss_close(got, want.double(), torch.float32, "offset 200 vs exclude none")


# ----------------------------------------------------------------------------- rows / cols flags


@backend_param()
@pytest.mark.parametrize("rows,cols", [(True, False), (False, True), (True, True)],
                         ids=["rows-only", "cols-only", "rows+cols"])
def test_similarity_lse_flags(backend, rows, cols):
    n, m, d = 129, 7, 67
    x, y = pair(n, m, d, seed=7)
    row, col = ops.similarity_lse(x, y, 4.0, exclude="diagonal", offset=-2, rows=rows, cols=cols,
                                  backend=backend, chunk_size=16)
    assert (row is None) == (not rows) and (col is None) == (not cols)
    if rows:
        assert row.shape == (n,)
    if cols:
        assert col.shape == (m,)
    _check_lse(backend, x, y, row_scale(n, 1), scalar_tensor(0.5), torch.float32, seed=3, exclude="diagonal",
               offset=-2, rows=rows, cols=cols, chunk_size=16)


# ----------------------------------------------------------------------------- scale and bias kinds


def _scale(kind: str, n: int):
    if kind == "float":
        return 2.5
    if kind == "0d-tensor":
        return scalar_tensor(2.5)
    if kind == "zero":
        return 0.0
    if kind == "per-row":
        return row_scale(n, 11)
    if kind == "per-row-signed":  # any finite value is allowed, zero and negative included
        s = row_scale(n, 12, low=-6.0, high=6.0).detach()
        s[0] = 0.0
        return s.requires_grad_(True)
    raise AssertionError(kind)


SCALES = ["float", "0d-tensor", "zero", "per-row", "per-row-signed"]
BIASES = {"none": lambda: None, "float": lambda: -1.5, "0d-tensor": lambda: scalar_tensor(0.75)}


@backend_param()
@pytest.mark.parametrize("bias", list(BIASES), ids=[f"bias={b}" for b in BIASES])
@pytest.mark.parametrize("scale", SCALES, ids=[f"scale={s}" for s in SCALES])
def test_similarity_lse_scale_bias(backend, scale, bias):
    n, m, d = 129, 300, 3
    x, y = pair(n, m, d, seed=8)
    _check_lse(backend, x, y, _scale(scale, n), BIASES[bias](), torch.float32, seed=4, exclude="diagonal",
               offset=1, chunk_size=50)


@backend_param()
@pytest.mark.parametrize("bias", list(BIASES), ids=[f"bias={b}" for b in BIASES])
@pytest.mark.parametrize("scale", SCALES, ids=[f"scale={s}" for s in SCALES])
def test_pairwise_sigmoid_scale_bias(backend, scale, bias):
    n, m, d = 300, 129, 67
    x, y = pair(n, m, d, seed=9)
    _check_sigmoid(backend, x, y, _scale(scale, n), BIASES[bias](), torch.float32, seed=5, chunk_size=37)


# ----------------------------------------------------------------------------- dtypes and strides




@backend_dtype_param(list(DTYPES))
def test_similarity_lse_dtypes(backend, dtype):
    dt = DTYPES[dtype]
    n, m, d = 129, 7, 130
    x, y = pair(n, m, d, dtype=dt, seed=10)
    scale = row_scale(n, 3) if dt != torch.float64 else row_scale(n, 3).detach().double().requires_grad_()
    bias = scalar_tensor(0.3, torch.float64 if dt == torch.float64 else torch.float32)
    _check_lse(backend, x, y, scale, bias, dt, seed=6, exclude="diagonal", chunk_size=16)


@backend_dtype_param(list(DTYPES))
def test_pairwise_sigmoid_dtypes(backend, dtype):
    dt = DTYPES[dtype]
    n, m, d = 7, 129, 67
    x, y = pair(n, m, d, dtype=dt, seed=11)
    scale = scalar_tensor(10.0, torch.float64 if dt == torch.float64 else torch.float32)
    bias = scalar_tensor(-10.0, torch.float64 if dt == torch.float64 else torch.float32)
    _check_sigmoid(backend, x, y, scale, bias, dt, seed=7, positives="diagonal", offset=2, chunk_size=3)


@backend_param()
@pytest.mark.parametrize("layout", ["colmajor", "strided"])
def test_noncontiguous_inputs(backend, layout):
    n, m, d = 129, 300, 67
    if layout == "colmajor":
        x, y = pair(n, m, d, seed=12, noncontig=True)
    else:
        x, y = strided_rows(n, d, seed=24), strided_rows(m, d, seed=25)
    assert not x.is_contiguous() and not y.is_contiguous()
    _check_lse(backend, x, y, row_scale(n, 4), scalar_tensor(-0.4), torch.float32, seed=8, exclude="diagonal",
               offset=-1, chunk_size=16)
    _check_sigmoid(backend, x, y, row_scale(n, 5), scalar_tensor(-4.0), torch.float32, seed=9,
                   positives="diagonal", offset=3, chunk_size=16)


# ----------------------------------------------------------------------------- confident rows


@backend_dtype_param(["fp32", "bf16"])
@pytest.mark.parametrize("scale_kind", ["float", "0d-tensor"])
def test_confident_rows(backend, dtype, scale_kind):
    """scale 100 on near-identical pairs: statistics are dominated by one pair per row."""
    dt = DTYPES[dtype]
    x, y = confident_pair(129, 67, dtype=dt, seed=13)
    scale = 100.0 if scale_kind == "float" else scalar_tensor(100.0)
    for exclude in ("none", "diagonal"):
        _check_lse(backend, x, y, scale, None, dt, seed=10, exclude=exclude, chunk_size=16)
    _check_sigmoid(backend, x, y, scale, scalar_tensor(-10.0), dt, seed=11, chunk_size=16)


# ----------------------------------------------------------------------------- every option at once


@backend_dtype_param(["fp32", "bf16"])
def test_every_option(backend, dtype):
    """Non-contiguous N ≠ M inputs, per-row scale, bias tensor, labels, both outputs, ragged chunks."""
    dt = DTYPES[dtype]
    n, m, d = 129, 300, 130
    x, y = strided_rows(n, d, dtype=dt, seed=30), strided_rows(m, d, dtype=dt, seed=31)
    labels = dict(x_labels=ids(n, 9, 1), y_labels=ids(m, 9, 2))
    _check_lse(backend, x, y, row_scale(n, 6), scalar_tensor(1.25), dt, seed=12, exclude="same_label",
               rows=True, cols=True, chunk_size=7, **labels)
    _check_sigmoid(backend, x, y, row_scale(n, 7), scalar_tensor(-5.0), dt, seed=13, positives="same_label",
                   chunk_size=7, **labels)
    _check_sigmoid(backend, x, y, row_scale(n, 8), scalar_tensor(-5.0), dt, seed=14, positives="diagonal",
                   offset=-11, chunk_size=7)


# ----------------------------------------------------------------------------- fully excluded rows / columns


@backend_param()
@pytest.mark.parametrize("side", ["row", "col"])
def test_fully_excluded_gives_neg_inf_and_zero_gradient(backend, side):
    """A row (column) whose every pair is excluded has LSE −inf, a zero gradient, no NaN anywhere,
    and does not disturb the other rows and columns."""
    all_zero, mixed = torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 0, 2, 0])
    x_labels, y_labels = (mixed, all_zero) if side == "row" else (all_zero, mixed)
    n, m = x_labels.shape[0], y_labels.shape[0]
    x, y = pair(n, m, 3, seed=14)
    scale, bias = row_scale(n, 9), scalar_tensor(0.2)
    kw = dict(exclude="same_label", x_labels=x_labels, y_labels=y_labels)
    row, col = ops.similarity_lse(x, y, scale, bias, backend=backend, chunk_size=2, **kw)
    blocked = torch.tensor([True, False, True, False, True])
    stat, other = (row, col) if side == "row" else (col, row)
    assert torch.equal(torch.isneginf(stat), blocked), f"{side} LSE: {stat}"
    assert bool(torch.isfinite(other).all()) and not bool(torch.isnan(stat).any())

    # Upstream gradients are non-zero on the −inf entries too: they must contribute nothing.
    inputs = [x, y, scale, bias]
    w_row, w_col = upstream(n, 1).float(), upstream(m, 2).float()
    got = torch.autograd.grad([row, col], inputs, grad_outputs=[w_row, w_col], retain_graph=True)
    ref_inputs = [oracle(t) for t in inputs]
    r_row, r_col = ref.similarity_lse(*ref_inputs, **kw)
    want = torch.autograd.grad([r_row, r_col], ref_inputs, grad_outputs=[w_row.double(), w_col.double()])
    for i, (a, e) in enumerate(zip(got, want)):
        assert_grad_close(a, e, torch.float32, f"grad of input {i}")
    blocked_features = got[0] if side == "row" else got[1]
    assert bool((blocked_features[blocked] == 0).all()), "features of a fully excluded row/column got a gradient"

    # The gradient of the −inf statistic alone is exactly zero.
    only = torch.zeros(5)
    only[0] = 1.0
    alone = torch.autograd.grad(stat, inputs, grad_outputs=only)
    for t in alone:
        assert bool((t == 0).all()), f"gradient of a −inf {side} LSE is not zero: {t}"


@backend_param()
def test_single_pair_fully_excluded(backend):
    """N = M = 1 with the diagonal excluded: both statistics are −inf, gradients zero."""
    x, y = pair(1, 1, 67, seed=15)
    s = scalar_tensor(3.0)
    row, col = ops.similarity_lse(x, y, s, exclude="diagonal", backend=backend)
    assert torch.isneginf(row).all() and torch.isneginf(col).all()
    gx, gy, gs = torch.autograd.grad([row, col], [x, y, s], grad_outputs=[torch.ones(1), torch.ones(1)])
    for g in (gx, gy, gs):
        assert bool((g == 0).all()), g


# ----------------------------------------------------------------------------- dtype rules


@backend_dtype_param(list(DTYPES))
def test_output_dtype(backend, dtype):
    dt = DTYPES[dtype]
    expected = torch.float64 if dt == torch.float64 else torch.float32
    x, y = pair(7, 129, 3, dtype=dt, seed=16)
    row, col = ops.similarity_lse(x, y, 2.0, backend=backend)
    sig = ops.pairwise_sigmoid(x, y, 2.0, backend=backend)
    total = ops.pairwise_sigmoid(x, y, 2.0, backend=backend, reduction="sum")
    assert row.dtype == col.dtype == sig.dtype == total.dtype == expected


_PROMOTIONS = {"fp16+fp32": (torch.float16, torch.float32, torch.float32),
               "bf16+fp16": (torch.bfloat16, torch.float16, torch.float32),
               "fp32+fp64": (torch.float32, torch.float64, torch.float64)}
# fp64 results only on the backends docs/design.md runs fp64 on
_PROMOTION_CASES = [(b, k) for b in FAST_BACKENDS for k, (_, _, out) in _PROMOTIONS.items()
                    if out != torch.float64 or b in FP64_BACKENDS]


@pytest.mark.parametrize("backend,combo", _PROMOTION_CASES, ids=[f"be={b}-{k}" for b, k in _PROMOTION_CASES])
def test_mixed_dtypes_are_promoted(backend, combo):
    """Different floating dtypes are promoted to the wider one, as a matmul would."""
    x_dtype, y_dtype, promoted = _PROMOTIONS[combo]
    n, m, d = 129, 7, 67
    x = features(n, d, dtype=x_dtype, seed=40)
    y = features(m, d, dtype=y_dtype, seed=41)
    s = scalar_tensor(5.0)
    row, col = ops.similarity_lse(x, y, s, exclude="diagonal", backend=backend, chunk_size=16)
    sig = ops.pairwise_sigmoid(x, y, s, -1.0, backend=backend, chunk_size=16)
    for out in (row, col, sig):
        assert out.dtype == promoted
    # The promoted computation is exact on the (already rounded) inputs: full-precision tolerances.
    rx, ry, rs = oracle(x), oracle(y), oracle(s)
    r_row, r_col = ref.similarity_lse(rx, ry, rs, exclude="diagonal")
    r_sig = ref.pairwise_sigmoid(rx, ry, rs, -1.0)
    assert_loss_close(torch.cat([row, col]), torch.cat([r_row, r_col]), promoted, "similarity_lse")
    assert_loss_close(sig, r_sig, promoted, "pairwise_sigmoid")
    w = upstream(n + m, 3)
    got = torch.autograd.grad((torch.cat([row, col]) * w.to(promoted)).sum() + sig.sum(), [x, y, s])
    want = torch.autograd.grad((torch.cat([r_row, r_col]) * w).sum() + r_sig.sum(), [rx, ry, rs])
    assert got[0].dtype == x_dtype and got[1].dtype == y_dtype
    # A gradient is delivered in its input's dtype: judge it with that dtype's tolerance.
    for a, e, name in zip(got, want, ("x", "y", "scale")):
        assert_grad_close(a, e, a.dtype, f"grad {name}")


@backend_param()
def test_autocast_cpu_bf16(backend):
    """Under CPU autocast the primitives compute on bf16-rounded features (fp32 result)."""
    n, m, d = 129, 300, 67
    x, y = pair(n, m, d, seed=17)
    s, b = scalar_tensor(8.0), scalar_tensor(-3.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        row, col = ops.similarity_lse(x, y, s, exclude="diagonal", backend=backend, chunk_size=50)
        sig = ops.pairwise_sigmoid(x, y, s, b, backend=backend, chunk_size=50)
    assert row.dtype == col.dtype == sig.dtype == torch.float32
    rx, ry = (oracle(t.detach().to(torch.bfloat16).requires_grad_(True)) for t in (x, y))
    rs, rb = oracle(s), oracle(b)
    r_row, r_col = ref.similarity_lse(rx, ry, rs, exclude="diagonal")
    r_sig = ref.pairwise_sigmoid(rx, ry, rs, rb)
    assert_loss_close(torch.cat([row, col]), torch.cat([r_row, r_col]), torch.bfloat16, "similarity_lse")
    assert_loss_close(sig, r_sig, torch.bfloat16, "pairwise_sigmoid")
    w = upstream(n + m, 4)
    got = torch.autograd.grad((torch.cat([row, col]) * w.float()).sum() + sig.sum(), [x, y, s, b])
    want = torch.autograd.grad((torch.cat([r_row, r_col]) * w).sum() + r_sig.sum(), [rx, ry, rs, rb])
    for i, (a, e) in enumerate(zip(got, want)):
        assert_grad_close(a, e, torch.bfloat16, f"grad of input {i}")


# ----------------------------------------------------------------------------- reduction="sum"


@backend_param()
@pytest.mark.parametrize("case", ["diag", "diag-3", "same_label", "none"], ids=lambda c: f"positives={c}")
def test_pairwise_sigmoid_sum(backend, case):
    n, m, d = 300, 129, 130
    x, y = pair(n, m, d, seed=18)
    kw = _marks("positives", MARK_CASES[case], n, m, seed=7)
    scale, bias = row_scale(n, 13), scalar_tensor(-6.0)
    total = ops.pairwise_sigmoid(x, y, scale, bias, reduction="sum", backend=backend, chunk_size=37, **kw)
    assert total.shape == ()
    rows = ops.pairwise_sigmoid(x, y, scale, bias, reduction="none", backend=backend, chunk_size=37, **kw)
    assert_loss_close(total, rows.sum(), torch.float32, "sum vs Σ none")
    compare(lambda *a: ops.pairwise_sigmoid(*a, reduction="sum", backend=backend, chunk_size=37, **kw),
            lambda *a: ref.pairwise_sigmoid(*a, **kw).sum(), [x, y, scale, bias], torch.float32,
            what="pairwise_sigmoid sum", weights=torch.tensor(0.7, dtype=torch.float64))


# ----------------------------------------------------------------------------- autograd modes


@backend_param()
def test_no_grad(backend):
    x, y = pair(129, 7, 3, seed=19)
    s, b = row_scale(129, 14), scalar_tensor(-1.0)
    with torch.no_grad():
        row, col = ops.similarity_lse(x, y, s, b, exclude="diagonal", backend=backend, chunk_size=16)
        sig = ops.pairwise_sigmoid(x, y, s, b, backend=backend, chunk_size=16)
        total = ops.pairwise_sigmoid(x, y, s, b, backend=backend, chunk_size=16, reduction="sum")
    for t in (row, col, sig, total):
        assert not t.requires_grad
    r_row, r_col = ref.similarity_lse(oracle(x), oracle(y), oracle(s), oracle(b), exclude="diagonal")
    r_sig = ref.pairwise_sigmoid(oracle(x), oracle(y), oracle(s), oracle(b))
    assert_loss_close(torch.cat([row, col]), torch.cat([r_row, r_col]), torch.float32, "similarity_lse")
    assert_loss_close(sig, r_sig, torch.float32, "pairwise_sigmoid")
    assert_loss_close(total, r_sig.sum(), torch.float32, "pairwise_sigmoid sum")


DOUBLE_BACKWARD = {
    "similarity_lse": lambda x, y, s, be: sum(t.sum() for t in ops.similarity_lse(x, y, s, backend=be)),
    "pairwise_sigmoid": lambda x, y, s, be: ops.pairwise_sigmoid(x, y, s, -1.0, backend=be).sum(),
    "pairwise_sigmoid-sum": lambda x, y, s, be: ops.pairwise_sigmoid(x, y, s, -1.0, backend=be, reduction="sum"),
}


@backend_param()
@pytest.mark.parametrize("primitive", list(DOUBLE_BACKWARD))
def test_double_backward_raises(backend, primitive):
    x, y = pair(7, 7, 3, seed=20)
    s = scalar_tensor(2.0)
    out = DOUBLE_BACKWARD[primitive](x, y, s, backend)
    with pytest.raises(RuntimeError, match=r"(?i)double backward|higher.order|second.order|create_graph"):
        (gx,) = torch.autograd.grad(out, [x], create_graph=True)
        gx.pow(2).sum().backward()


# ----------------------------------------------------------------------------- gradcheck (float64)


GRADCHECK = {
    "lse-perrow-bias-diag+1": lambda be: (
        lambda x, y, s, b: ops.similarity_lse(x, y, s, b, exclude="diagonal", offset=1, backend=be, chunk_size=2)),
    "lse-perrow-bias-labels": lambda be: (
        lambda x, y, s, b: ops.similarity_lse(x, y, s, b, exclude="same_label", x_labels=torch.tensor([0, 1, 0, 2, 1]),
                                              y_labels=torch.tensor([1, 0, 2, 2]), backend=be, chunk_size=2)),
    "lse-rows-only": lambda be: (
        lambda x, y, s, b: ops.similarity_lse(x, y, s, b, cols=False, backend=be, chunk_size=3)[0]),
    "sigmoid-perrow-bias-diag-1": lambda be: (
        lambda x, y, s, b: ops.pairwise_sigmoid(x, y, s, b, offset=-1, backend=be, chunk_size=2)),
    "sigmoid-perrow-bias-labels": lambda be: (
        lambda x, y, s, b: ops.pairwise_sigmoid(x, y, s, b, positives="same_label",
                                                x_labels=torch.tensor([0, 1, 0, 2, 1]),
                                                y_labels=torch.tensor([1, 0, 2, 2]), backend=be, chunk_size=2)),
    "sigmoid-sum": lambda be: (
        lambda x, y, s, b: ops.pairwise_sigmoid(x, y, s, b, reduction="sum", backend=be, chunk_size=2)),
}


@fp64_backend_param()
@pytest.mark.parametrize("case", list(GRADCHECK))
def test_gradcheck(backend, case):
    g = torch.Generator().manual_seed(21)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    s = (1.0 + torch.rand(5, generator=g, dtype=torch.float64)).requires_grad_(True)
    b = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(GRADCHECK[case](backend), (x, y, s, b), eps=1e-6, atol=1e-8, rtol=1e-6)


@backend_param()
def test_large_logits_stay_finite(backend):
    """Logits of magnitude 1e3 (beyond fp32 exp range) give finite statistics: LSE is max-shifted."""
    x, y = pair(7, 129, 3, seed=22)
    _check_lse(backend, x, y, 1e3, None, torch.float32, seed=15, exclude="diagonal", chunk_size=3)
    total = ops.pairwise_sigmoid(x, y, 1e3, backend=backend, reduction="sum")
    assert math.isfinite(float(total.detach()))
