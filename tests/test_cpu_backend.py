"""The C++ ``cpu`` backend (csrc/cpu, ``mmloss._C``), called as ``torch.ops.mmloss_C.<op>`` with
positional arguments in schema order: values and gradients against the float64 reference
(tests/oracle.py rules) and the torch backend (same statistics format: each backend's backward
accepts the other's statistics), thread-count independence, kept logits, opcheck,
torch.compile and the double-backward error. The public wrappers' ``backend="cpu"`` is covered
by the primitive and loss suites."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mmloss import _extension, reference
from mmloss.ops import torch_chunked as TC
from mmloss.ops import torch_kl as TK
from mmloss.ops._spec import KLSpec, PairSpec
from oracle import assert_grad_close, assert_loss_close, compare, features, logit_bound, oracle

pytestmark = pytest.mark.skipif(_extension.extension_error() is not None, reason="mmloss._C not built")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def ops():
    return torch.ops.mmloss_C


def _split(v):
    """A scale/bias as the ops take it: (tensor | None, float)."""
    if isinstance(v, torch.Tensor):
        return v, 0.0
    return None, float(0.0 if v is None else v)


def lse(x, y, scale, bias=None, exclude="none", offset=0, xl=None, yl=None, rows=True, cols=True, chunk=0,
        budget=0):
    st, sv = _split(scale)
    bt, bv = _split(bias)
    return ops().similarity_lse(x, y, st, sv, bt, bv, exclude, offset, xl, yl, rows, cols, "cpu", chunk, True, budget)


def sig(x, y, scale, bias=None, positives="diagonal", offset=0, xl=None, yl=None, chunk=0):
    st, sv = _split(scale)
    bt, bv = _split(bias)
    return ops().pairwise_sigmoid(x, y, st, sv, bt, bv, positives, offset, xl, yl, "cpu", chunk, True)


def sig_sum(x, y, scale, bias=None, positives="diagonal", offset=0, xl=None, yl=None, chunk=0):
    st, sv = _split(scale)
    bt, bv = _split(bias)
    need = lambda t: isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled()  # noqa: E731
    return ops().pairwise_sigmoid_sum(x, y, st, sv, bt, bv, positives, offset, xl, yl, "cpu", chunk, True,
                                      need(x), need(y), need(scale), need(bias))


def kl(xs, ys, xt, yt, ss, st, rows=True, cols=True, ce=False, chunk=0):
    sst, ssv = _split(ss)
    stt, stv = _split(st)
    return ops().similarity_kl(xs, ys, xt, yt, sst, ssv, stt, stv, rows, cols, ce, "cpu", chunk, True)


def labels(n, k, seed, dtype=torch.int64):
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed)).to(dtype)


# ----------------------------------------------------------------------------- similarity_lse

LSE_CASES = [
    # (n, m, d, exclude, offset, label dtype, per-row scale, bias tensor, rows, cols, chunk)
    (37, 29, 3, "none", 0, None, False, False, True, True, 0),
    (70, 53, 67, "diagonal", 0, None, False, True, True, True, 16),
    (45, 61, 130, "diagonal", -3, None, True, False, True, False, 7),
    (33, 40, 1, "diagonal", 5, None, False, False, False, True, 0),
    (64, 50, 67, "same_label", 0, torch.int64, True, True, True, True, 9),
    (41, 47, 3, "same_label", 0, torch.int32, False, True, True, True, 0),
    (1, 1, 3, "none", 0, None, False, False, True, True, 0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LSE_CASES, ids=lambda c: f"{c[3]}-{c[0]}x{c[1]}x{c[2]}")
def test_similarity_lse_matches_reference(dtype, case):
    n, m, d, exclude, offset, ldt, per_row, bias_t, rows, cols, chunk = case
    x = features(n, d, dtype=dtype, seed=1, noncontig=n > 1 and d > 1)
    y = features(m, d, dtype=dtype, seed=2, noncontig=m % 2 == 1 and d > 1)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    if per_row:
        scale = torch.linspace(2.0, 9.0, n, dtype=cdt).requires_grad_()
    else:
        scale = torch.tensor(7.5, dtype=cdt, requires_grad=True)
    bias = torch.tensor(-1.25, dtype=cdt, requires_grad=True) if bias_t else 0.5
    xl = yl = None
    if ldt is not None:
        xl, yl = labels(n, 5, 3, ldt), labels(m, 5, 4, ldt)

    def fast(x, y, scale, bias):
        out = lse(x, y, scale, bias, exclude, offset, xl, yl, rows, cols, chunk)
        return torch.cat([out[0], out[1]])

    def ref(x, y, scale, bias):
        r, c = reference.similarity_lse(x, y, scale, bias, exclude=exclude, offset=offset, x_labels=xl,
                                        y_labels=yl, rows=rows, cols=cols)
        return torch.cat([t for t in (r, c) if t is not None])

    w = torch.linspace(0.5, 1.5, (n if rows else 0) + (m if cols else 0), dtype=torch.float64)
    compare(fast, ref, [x, y, scale, bias], dtype, "similarity_lse", weights=w,
            logit_bound=logit_bound(x, y, scale, bias))


def _pair_spec(x, y, scale, bias, marks, offset, xl, yl, chunk, budget=0):
    st, sv = _split(scale)
    bt, bv = _split(bias)
    return PairSpec(x, y, st, sv, bt, bv, marks, offset, xl, yl, chunk, True, budget)


@pytest.mark.parametrize("exclude", ["none", "diagonal", "same_label"])
def test_similarity_lse_statistics_interchange_with_torch_backend(exclude):
    """Same chunk plan → the same GEMM → identical shifts; each backend's backward accepts the
    other's statistics (the ring/merge helpers of the torch backend apply)."""
    n, m, d = 90, 75, 67
    x, y = features(n, d, seed=5, requires_grad=False), features(m, d, seed=6, requires_grad=False)
    xl, yl = (labels(n, 6, 7), labels(m, 6, 8)) if exclude == "same_label" else (None, None)
    scale, bias = torch.tensor(11.0), torch.tensor(-2.0)
    spec = _pair_spec(x, y, scale, bias, exclude, 1, xl, yl, 20)
    t_row, t_col, t_rs, t_cs, _ = TC.similarity_lse_forward(spec, True, True)
    c_row, c_col, c_rs, c_cs, _ = lse(x, y, scale, bias, exclude, 1, xl, yl, True, True, 20)
    assert torch.equal(c_rs[0], t_rs[0]) and torch.equal(c_cs[0], t_cs[0])
    torch.testing.assert_close(c_rs[1], t_rs[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(c_cs[1], t_cs[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(c_row, t_row, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c_col, t_col, rtol=1e-6, atol=1e-6)
    g, h = torch.linspace(-1, 2, n), torch.linspace(0.5, 1, m)
    needs = (True, True, True, True)
    t_grads = TC.similarity_lse_backward(spec, g, h, c_rs, c_cs, None, needs)
    c_grads = ops().similarity_lse_backward(g, h, x, y, scale, 0.0, bias, 0.0, exclude, 1, xl, yl, True, True, "cpu",
                                            20, True, 0, t_rs, t_cs, torch.empty(0), *needs)
    for a, b, name in zip(c_grads, t_grads, ("dx", "dy", "dscale", "dbias")):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()), msg=name)


def test_results_thread_count_independent():
    """Epilogue blocks have a fixed row count and column partials merge in block order, so the
    statistics and losses are bitwise the same with 1 and 2 threads (the chunk is large enough to
    run in parallel). Gradients go through the vendor GEMM G·y, whose reduction over M MKL may
    split differently with another thread count: those agree to fp32 rounding."""
    n, m, d = 300, 2500, 67
    x, y = features(n, d, seed=9, requires_grad=False), features(m, d, seed=10, requires_grad=False)
    xl, yl = labels(n, 40, 1), labels(m, 40, 2)
    prev = torch.get_num_threads()
    exact, close = [], []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fwd = lse(x, y, 20.0, -3.0, "same_label", 0, xl, yl, True, True, 0)
            bwd = ops().similarity_lse_backward(torch.ones(n), torch.linspace(0, 1, m), x, y, None, 20.0, None, -3.0,
                                                "same_label", 0, xl, yl, True, True, "cpu", 0, True, 0, fwd[2], fwd[3],
                                                fwd[4], True, True, False, True)
            s = sig_sum(x.requires_grad_(), y.requires_grad_(), 10.0, None, "same_label", 0, xl, yl)
            x.requires_grad_(False), y.requires_grad_(False)
            k = kl(x, y, x * 0.5, y.flip(0), 5.0, 3.0)
            exact.append([t.detach() for t in (*fwd, bwd[3], s[0], *k)])
            close.append([t.detach() for t in (*bwd[:2], *s[1:3])])
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(*exact):
        assert torch.equal(a, b)
    for a, b in zip(*close):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_similarity_lse_fully_excluded_rows_and_columns():
    """A row (column) whose every pair is excluded: −inf, statistics [0, 0], zero gradient."""
    x, y = features(4, 3, seed=1), features(5, 3, seed=2)
    xl = torch.tensor([0, 1, 7, 1])
    yl = torch.tensor([7, 7, 7, 7, 7])  # row 2 matches every column: fully excluded
    row, col, rs, cs, _ = lse(x, y, 3.0, None, "same_label", 0, xl, yl)
    assert row[2] == float("-inf") and torch.isfinite(row[[0, 1, 3]]).all()
    assert rs[0, 2] == 0 and rs[1, 2] == 0
    assert torch.isfinite(col).all()
    (row[torch.isfinite(row)].sum() + col.sum()).backward()
    ref = [t.detach().double().requires_grad_() for t in (x, y)]
    r, c = reference.similarity_lse(*ref, 3.0, exclude="same_label", x_labels=xl, y_labels=yl)
    (r[torch.isfinite(r)].sum() + c.sum()).backward()
    assert_grad_close(x.grad, ref[0].grad, torch.float32, "dx")
    assert_grad_close(y.grad, ref[1].grad, torch.float32, "dy")
    # 1×1 with the diagonal excluded: everything excluded both ways.
    a, b = features(1, 2, seed=3), features(1, 2, seed=4)
    row, col, rs, cs, _ = lse(a, b, 1.0, None, "diagonal")
    assert row.item() == float("-inf") and col.item() == float("-inf")
    gx, gy, _, _ = ops().similarity_lse_backward(torch.ones(1), torch.ones(1), a.detach(), b.detach(), None, 1.0, None,
                                                 0.0, "diagonal", 0, None, None, True, True, "cpu", 0, True, 0, rs, cs,
                                                 torch.empty(0), True, True, False, False)
    assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gy, torch.zeros_like(gy))


def test_similarity_lse_nan_propagates_like_torch_backend():
    x, y = features(20, 5, seed=1, requires_grad=False), features(17, 5, seed=2, requires_grad=False)
    x = x.clone()
    x[3, 2] = float("nan")
    c = lse(x, y, 2.0, None, "diagonal", 0, chunk=6)
    t = TC.similarity_lse_forward(_pair_spec(x, y, 2.0, None, "diagonal", 0, None, None, 6), True, True)
    for a, b in zip(c[:2], t[:2]):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        torch.testing.assert_close(a[~torch.isnan(a)], b[~torch.isnan(b)])
    # Row 3's NaN reaches every column but its excluded diagonal partner, column 3.
    assert torch.isnan(c[0][3]) and torch.isnan(c[1][torch.arange(17) != 3]).all() and not torch.isnan(c[1][3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_similarity_lse_kept_logits(dtype):
    """logit_budget ≥ N·M·elem keeps S (excluded pairs −inf, no bias); the backward that reads it
    equals the recomputing one."""
    n, m, d = 50, 43, 7
    elem = 8 if dtype == torch.float64 else 4
    x, y = features(n, d, dtype=dtype, seed=1, requires_grad=False), features(m, d, dtype=dtype, seed=2,
                                                                             requires_grad=False)
    out_small = lse(x, y, 4.0, 1.0, "diagonal", 2, chunk=8, budget=n * m * elem - 1)
    out = lse(x, y, 4.0, 1.0, "diagonal", 2, chunk=8, budget=n * m * elem)
    assert out_small[4].shape == (0,) and out[4].shape == (n, m) and out[4].dtype == dtype
    s = (x.to(dtype) * 4.0) @ y.t()
    s[torch.arange(n)[:, None] + 2 == torch.arange(m)[None, :]] = float("-inf")
    torch.testing.assert_close(out[4], s)
    for a, b in zip(out[:4], out_small[:4]):
        assert torch.equal(a, b)
    args = (x, y, None, 4.0, None, 1.0, "diagonal", 2, None, None, True, True, "cpu", 8, True, 0)
    g, h = torch.linspace(-1, 1, n, dtype=dtype), torch.linspace(1, 2, m, dtype=dtype)
    kept = ops().similarity_lse_backward(g, h, *args, out[2], out[3], out[4], True, True, False, False)
    recomputed = ops().similarity_lse_backward(g, h, *args, out[2], out[3], torch.empty(0, dtype=dtype), True, True,
                                               False, False)
    for a, b in zip(kept, recomputed):
        assert torch.equal(a, b)
    # Through autograd: the kept matrix is saved and read by the backward.
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    row, col, *_ = lse(xr, yr, 4.0, 1.0, "diagonal", 2, chunk=8, budget=n * m * elem)
    ((row * g).sum() + (col * h).sum()).backward()
    assert torch.equal(xr.grad, kept[0]) and torch.equal(yr.grad, kept[1])


def test_logit_blocks_plan(monkeypatch):
    """Default plan: whole rows while the strip is thick (or one chunk holds every row), near-square
    blocks when it would be thin; chunk_size sets both edges."""
    C = _extension.load()
    monkeypatch.delenv("MMLOSS_CHUNK_BYTES", raising=False)
    assert C.logit_blocks(64, 64, 64, 4) == (64, 64)  # one chunk
    br, bc = C.logit_blocks(8192, 8192, 512, 4)  # 16 MiB: a 398-row strip → ~1400² blocks
    assert 1024 <= br <= 2048 and 1024 <= bc <= 2048 and bc % 16 == 0
    assert br * (bc + 2 * 512) * 4 <= 16 << 20
    assert C.logit_blocks(100, 90, 8, 4, 7) == (7, 7) and C.logit_blocks(5, 3, 8, 4, 7) == (5, 3)
    monkeypatch.setenv("MMLOSS_CHUNK_BYTES", "64KiB")
    assert C.logit_blocks(300, 300, 20, 4) == (75, 112)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_blocked_default_plan_matches_reference(dtype, monkeypatch):
    """A small MMLOSS_CHUNK_BYTES makes the default plan cut rows and columns (4 × 3 blocks, the
    last column block ragged): statistics, losses and gradients of similarity_lse (labels and an
    offset diagonal) and the SigLIP sum against the float64 reference."""
    monkeypatch.setenv("MMLOSS_CHUNK_BYTES", "64KiB")
    n, m, d = 300, 300, 20
    assert _extension.load().logit_blocks(n, m, d, 4)[1] < m
    x = features(n, d, dtype=dtype, seed=11, noncontig=True)
    y = features(m, d, dtype=dtype, seed=12)
    xl, yl = labels(n, 7, 13), labels(m, 7, 14)
    for exclude, offset in (("diagonal", 110), ("same_label", 0)):

        def fast(x, y):
            out = lse(x, y, 9.0, -0.5, exclude, offset, xl, yl)
            return torch.cat([out[0], out[1]])

        def ref(x, y):
            return torch.cat(reference.similarity_lse(x, y, 9.0, -0.5, exclude=exclude, offset=offset, x_labels=xl,
                                                      y_labels=yl))

        compare(fast, ref, [x, y], dtype, "similarity_lse", weights=torch.linspace(0.5, 1.5, n + m,
                                                                                     dtype=torch.float64),
                logit_bound=logit_bound(x, y, 9.0, -0.5))
    compare(lambda x, y: sig_sum(x, y, 6.0, -2.0, "diagonal", 40)[0],
            lambda x, y: reference.pairwise_sigmoid(x, y, 6.0, -2.0, positives="diagonal", offset=40).sum(),
            [x, y], dtype, "pairwise_sigmoid", logit_bound=logit_bound(x, y, 6.0, -2.0) * m)
    compare(lambda x, y: sig(x, y, 6.0, -2.0, "same_label", 0, xl, yl),
            lambda x, y: reference.pairwise_sigmoid(x, y, 6.0, -2.0, positives="same_label", x_labels=xl,
                                                    y_labels=yl),
            [x, y], dtype, "pairwise_sigmoid", weights=torch.linspace(0.5, 1.5, n, dtype=torch.float64),
            logit_bound=logit_bound(x, y, 6.0, -2.0))


@pytest.mark.parametrize("chunk", [0, 4])
def test_ops_with_no_columns_or_no_rows(chunk):
    """The ops called directly with M = 0 (or N = 0): every row is empty — LSE −inf, statistics
    [0, 0], sigmoid sums 0, zero gradients (the public wrappers reject empty inputs). The column
    loop must run once with an empty block: skipping it left these outputs uninitialised."""
    x, empty = torch.randn(5, 3), torch.randn(0, 3)
    row, col, rs, cs, kept = lse(x, empty, 2.0, None, "none", 0, chunk=chunk)
    assert torch.equal(row, torch.full((5,), float("-inf"))) and col.shape == (0,)
    assert torch.equal(rs, torch.zeros(2, 5)) and cs.shape == (2, 0)
    assert torch.equal(sig(x, empty, 2.0, -1.0, "none", chunk=chunk), torch.zeros(5))
    grads = ops().similarity_lse_backward(torch.ones(5), torch.ones(0), x, empty, None, 2.0, None, 0.0, "none", 0,
                                          None, None, True, True, "cpu", chunk, True, 0, rs, cs, kept, True, True,
                                          False, False)
    assert torch.equal(grads[0], torch.zeros(5, 3)) and grads[1].shape == (0, 3)
    total, gx, gy, _, _ = ops().pairwise_sigmoid_sum(x, empty, None, 2.0, None, -1.0, "none", 0, None, None, "cpu",
                                                     chunk, True, True, True, False, False)
    assert total.item() == 0.0 and torch.equal(gx, torch.zeros(5, 3)) and gy.shape == (0, 3)
    row, col, rs, cs, _ = lse(empty, x, 2.0, None, "none", 0, chunk=chunk)
    assert row.shape == (0,) and torch.equal(col, torch.full((5,), float("-inf")))
    assert torch.equal(cs, torch.zeros(2, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_similarity_lse_wide_span_takes_two_exponentials(dtype):
    """One exponential serves both directions only within tile::kFactorSpan: here row 0's max is
    100 while column 1's is 0, so exp(S₀₁ − r₀) = e⁻¹⁰⁰ underflows (fp32) and exp(r₀ − c₁) = e¹⁰⁰
    overflows. Column 1's LSE is log(1 + e⁻¹) and every gradient is finite and exact."""
    x = torch.tensor([[100.0, 0.0], [0.0, -1.0]], dtype=dtype, requires_grad=True)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=dtype, requires_grad=True)
    row, col, *_ = lse(x, y, 1.0, None, "none", 0)
    ref = [t.detach().double().requires_grad_() for t in (x, y)]
    r_row, r_col = reference.similarity_lse(*ref, 1.0)
    torch.testing.assert_close(col.double(), r_col, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(row.double(), r_row, rtol=1e-6, atol=1e-6)
    (row.sum() + 2 * col.sum()).backward()
    (r_row.sum() + 2 * r_col.sum()).backward()
    for got, want in ((x.grad, ref[0].grad), (y.grad, ref[1].grad)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- pairwise_sigmoid

SIG_CASES = [
    (37, 29, 3, "none", 0, None, False, False, 0),
    (70, 53, 67, "diagonal", 0, None, False, True, 16),
    (45, 61, 130, "diagonal", -3, None, True, False, 7),
    (64, 50, 1, "same_label", 0, torch.int32, True, True, 9),
    (1, 1, 3, "diagonal", 0, None, False, True, 0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SIG_CASES, ids=lambda c: f"{c[3]}-{c[0]}x{c[1]}x{c[2]}")
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_pairwise_sigmoid_matches_reference(dtype, case, reduction):
    n, m, d, positives, offset, ldt, per_row, bias_t, chunk = case
    x = features(n, d, dtype=dtype, seed=11, noncontig=n > 1 and d > 1)
    y = features(m, d, dtype=dtype, seed=12, noncontig=m % 2 == 1 and d > 1)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    scale = (torch.linspace(3.0, 12.0, n, dtype=cdt) if per_row else torch.tensor(10.0, dtype=cdt)).requires_grad_()
    bias = torch.tensor(-6.0, dtype=cdt, requires_grad=True) if bias_t else -2.0
    xl = yl = None
    if ldt is not None:
        xl, yl = labels(n, 4, 13, ldt), labels(m, 4, 14, ldt)

    def fast(x, y, scale, bias):
        if reduction == "sum":
            return sig_sum(x, y, scale, bias, positives, offset, xl, yl, chunk)[0]
        return sig(x, y, scale, bias, positives, offset, xl, yl, chunk)

    def ref(x, y, scale, bias):
        out = reference.pairwise_sigmoid(x, y, scale, bias, positives=positives, offset=offset, x_labels=xl,
                                         y_labels=yl)
        return out.sum() if reduction == "sum" else out

    w = None if reduction == "sum" else torch.linspace(0.5, 1.5, n, dtype=torch.float64)
    compare(fast, ref, [x, y, scale, bias], dtype, "pairwise_sigmoid", weights=w,
            logit_bound=logit_bound(x, y, scale, bias) * (m if reduction == "sum" else 1))


def test_pairwise_sigmoid_sum_gradients_keep_compute_dtype():
    """The forward-formed gradients stay fp32 (a sum over N·M pairs may exceed fp16's range);
    autograd rescales them by the upstream scalar and casts to the input dtypes."""
    x, y = features(20, 8, dtype=torch.float16, seed=1), features(30, 8, dtype=torch.float16, seed=2)
    bias = torch.tensor(-3.0, requires_grad=True)
    total, gx, gy, gs, gb = sig_sum(x, y, 5.0, bias)
    assert total.dtype == gx.dtype == gy.dtype == gb.dtype == torch.float32 and gs.shape == (0,)
    (total * 3.0).backward()
    assert x.grad.dtype == torch.float16 and bias.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, (gx * 3.0).half())
    torch.testing.assert_close(bias.grad, gb * 3.0)
    with torch.no_grad():
        total2, *rest = sig_sum(x, y, 5.0, bias.detach())
    assert all(t.numel() == 0 for t in rest) and torch.equal(total2, total.detach())


# ----------------------------------------------------------------------------- similarity_kl

KL_CASES = [
    (37, 29, 3, 5, True, True, False, 0),
    (70, 53, 67, 130, True, False, True, 16),
    (45, 61, 1, 3, False, True, True, 7),
    (1, 1, 3, 2, True, True, False, 0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", KL_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}/{c[3]}-ce{c[6]}")
def test_similarity_kl_matches_reference(dtype, case):
    n, m, ds, dt, rows, cols, ce, chunk = case
    xs = features(n, ds, dtype=dtype, seed=21, noncontig=n > 1 and ds > 1)
    ys = features(m, ds, dtype=dtype, seed=22, noncontig=m % 2 == 1 and ds > 1)
    xt = features(n, dt, dtype=dtype, seed=23, requires_grad=False, noncontig=n > 1 and dt > 1)
    yt = features(m, dt, dtype=dtype, seed=24, requires_grad=False)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    ss = torch.tensor(6.0, dtype=cdt, requires_grad=True)
    st = 9.0

    def fast(xs, ys, ss):
        out = kl(xs, ys, xt, yt, ss, st, rows, cols, ce, chunk)
        return torch.cat([out[0], out[1]])

    def ref(xs, ys, ss):
        r, c = reference.similarity_kl(xs, ys, oracle(xt), oracle(yt), ss, st, rows=rows, cols=cols,
                                       cross_entropy=ce)
        return torch.cat([t for t in (r, c) if t is not None])

    w = torch.linspace(0.5, 1.5, (n if rows else 0) + (m if cols else 0), dtype=torch.float64)
    bound = max(logit_bound(xs, ys, ss), logit_bound(xt, yt, st))
    compare(fast, ref, [xs, ys, ss], dtype, "similarity_kl", weights=w, logit_bound=bound)


def test_similarity_kl_statistics_interchange_with_torch_backend():
    n, m = 60, 45
    xs, ys = features(n, 9, seed=1, requires_grad=False), features(m, 9, seed=2, requires_grad=False)
    xt, yt = features(n, 4, seed=3, requires_grad=False), features(m, 4, seed=4, requires_grad=False)
    spec = KLSpec(xs, ys, xt, yt, None, 8.0, None, 5.0, 16, True)
    t_out = TK.similarity_kl_forward(spec, True, True, True)
    c_out = kl(xs, ys, xt, yt, 8.0, 5.0, True, True, True, 16)
    for a, b in zip(c_out, t_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    g, h = torch.linspace(0, 1, n), torch.linspace(1, 2, m)
    t_grads = TK.similarity_kl_backward(spec, g, h, c_out[2], c_out[3], (True, True, False))
    c_grads = ops().similarity_kl_backward(g, h, xs, ys, xt, yt, None, 8.0, None, 5.0, True, True, True, "cpu", 16,
                                           True, t_out[2], t_out[3], True, True, False)
    for a, b in zip(c_grads[:2], t_grads[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


# ----------------------------------------------------------------------------- op machinery


def _opcheck_samples():
    x, y = features(9, 5, seed=1), features(7, 5, seed=2)
    scale = torch.tensor(3.0, requires_grad=True)
    bias = torch.tensor(-1.0, requires_grad=True)
    xl, yl = labels(9, 3, 1), labels(7, 3, 2)
    xt, yt = features(9, 4, seed=3, requires_grad=False), features(7, 4, seed=4, requires_grad=False)
    lse_args = (x, y, scale, 0.0, bias, 0.0, "same_label", 0, xl, yl, True, True, "cpu", 4, True, 0)
    lse_kept = (x, y, None, 2.0, None, 0.5, "diagonal", 1, None, None, True, False, "cpu", 0, True, 1 << 20)
    fwd = ops().similarity_lse(*lse_args)
    sig_args = (x, y, scale, 0.0, bias, 0.0, "diagonal", -1, None, None, "cpu", 3, True)
    kl_args = (x, y, xt, yt, scale, 0.0, None, 4.0, True, True, True, "cpu", 4, True)
    kfwd = ops().similarity_kl(*kl_args)
    det = lambda t: t.detach()  # noqa: E731
    return [
        (ops().similarity_lse, lse_args),
        (ops().similarity_lse, lse_kept),
        (ops().similarity_lse_backward, (torch.ones(9), torch.ones(7), *(det(a) if isinstance(a, torch.Tensor) else a
                                                                          for a in lse_args),
                                         det(fwd[2]), det(fwd[3]), det(fwd[4]), True, True, True, True)),
        (ops().pairwise_sigmoid, sig_args),
        (ops().pairwise_sigmoid_backward, (torch.ones(9), *(det(a) if isinstance(a, torch.Tensor) else a
                                                            for a in sig_args), True, True, True, True)),
        (ops().pairwise_sigmoid_sum, (*sig_args, True, True, True, True)),
        (ops().similarity_kl, kl_args),
        (ops().similarity_kl_backward, (torch.ones(9), torch.ones(7), *(det(a) if isinstance(a, torch.Tensor) else a
                                                                         for a in kl_args),
                                        det(kfwd[2]), det(kfwd[3]), True, True, True)),
    ]


@pytest.mark.parametrize("index", range(8))
def test_opcheck(index):
    op, args = _opcheck_samples()[index]
    torch.library.opcheck(op, args)


def test_double_backward_raises():
    x, y = features(6, 3, seed=1), features(5, 3, seed=2)
    row, col, *_ = lse(x, y, 2.0)
    (gx,) = torch.autograd.grad(row.sum() + col.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="do not support double backward"):
        gx.sum().backward()
    # pairwise_sigmoid_sum's gradients were formed in the forward: create_graph itself raises
    # (as mmloss.ops._schema._register_precomputed does).
    total = sig_sum(x, y, 2.0)[0]
    with pytest.raises(RuntimeError, match="do not support double backward"):
        torch.autograd.grad(total, x, create_graph=True)


def test_bad_marks_raise():
    x, y = features(3, 2, seed=1), features(3, 2, seed=2)
    with pytest.raises(ValueError, match="exclude must be one of"):
        lse(x, y, 1.0, None, "everything")


def test_torch_compile_fullgraph_dynamic():
    """One graph for three sizes (Meta kernels with symbolic sizes; the kept-logits rule becomes a
    guard), gradients through the C++ autograd, equal to eager."""
    torch._dynamo.reset()

    def loss(x, y, scale):
        row, col, *_ = lse(x, y, scale, None, "diagonal", 0, budget=1 << 20)
        k_row, k_col, *_ = kl(x, y, x * 0.5, y, scale, 2.0, True, True, False)
        return row.mean() + col.mean() + sig_sum(x, y, scale, -1.0)[0] + k_row.mean() + sig(x, y, scale).mean()

    compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (12, 17, 23):
        x, y = features(n, 6, seed=n), features(n + 2, 6, seed=n + 1)
        scale = torch.tensor(4.0, requires_grad=True)
        out = compiled(x, y, scale)
        grads = torch.autograd.grad(out, (x, y, scale))
        expected = loss(x, y, scale)
        ref_grads = torch.autograd.grad(expected, (x, y, scale))
        torch.testing.assert_close(out, expected)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_portable_epilogues_match_vectorised():
    """MMLOSS_CPU_ISA=default (the portable lanes) agrees with the AVX2 and (where this CPU runs
    them) AVX-512 epilogues."""
    info = _extension.build_info()
    if "avx2" not in info.get("cpu_isas_built", ""):
        pytest.skip("the AVX2 epilogues are not built (not an x86-64 build)")
    script = (
        "import torch, mmloss._extension as E; E.load(); import sys\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, y = torch.randn(50, 19, generator=g), torch.randn(41, 19, generator=g)\n"
        "o = torch.ops.mmloss_C\n"
        "a = o.similarity_lse(x, y, None, 2.0, None, 0.5, 'diagonal', 1, None, None, True, True, 'cpu', 8, True, 0)\n"
        "b = o.pairwise_sigmoid_sum(x, y, None, 2.0, None, -1.0, 'diagonal', 0, None, None, 'cpu', 8, True,"
        " True, True, False, False)\n"
        "c = o.similarity_kl(x, y, x * 0.5, y, None, 2.0, None, 3.0, True, True, True, 'cpu', 8, True)\n"
        "torch.save([E.build_info()['cpu_isa'], *a[:4], *b[:3], *c], sys.argv[1])\n"
    )
    isas = ["default", "avx2"] + (["avx512"] if info.get("cpu_isa") == "avx512" else [])
    outs = []
    for isa in isas:
        env = dict(os.environ, MMLOSS_CPU_ISA=isa, OMP_NUM_THREADS="1")
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mmloss_isa_{os.getpid()}_{isa}.pt")
        subprocess.run([sys.executable, "-c", script, path], check=True, env=env, timeout=300)
        outs.append(torch.load(path))
        os.unlink(path)
    assert [o[0] for o in outs] == isas
    # The KL divergences (entries 7, 8: row and column) are differences of log-sum-exps of
    # logits up to L = 2·max|x|·max|y|: the lane count changes their rounding by a few ulp of L
    # (AVX-512 vs portable: 2e-6 at values ~1e-3), so their absolute bound scales with L.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 19, generator=g), torch.randn(41, 19, generator=g)  # as in the script
    logit_max = 2.0 * float(x.norm(dim=1).max() * y.norm(dim=1).max())
    kl_atol = 8 * torch.finfo(torch.float32).eps * logit_max
    for other in outs[1:]:
        for k, (a, b) in enumerate(zip(outs[0][1:], other[1:])):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=kl_atol if k in (7, 8) else 1e-6)


def test_built_with_openmp_where_torch_uses_it():
    # at::parallel_for is a header template: compiled without -fopenmp it silently runs every
    # epilogue pass on one thread (the cpu backend was 1.2–1.3× slower than the torch backend at
    # N = M = 8192 before setup.py passed -fopenmp).
    from mmloss import _extension

    if not torch.backends.openmp.is_available():
        pytest.skip("this torch is built without OpenMP")
    assert _extension.build_info().get("openmp") is True
