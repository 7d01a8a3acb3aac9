"""similarity_kl: the torch backend and the op layer against the dense float64 reference."""
from __future__ import annotations

import math

import pytest
import torch

from oracle import assert_grad_close, assert_loss_close, compare, features, logit_bound

from mmloss import reference as R
from mmloss.ops import similarity_kl
from mmloss.ops._spec import KLSpec
from mmloss.ops.torch_kl import kl_chunk_rows

F64, F32 = torch.float64, torch.float32

# (N, M, D_student, D_teacher): ragged, N ≠ M both ways, N = M = 1, teacher D ≠ student D.
SHAPES = [(1, 1, 1, 1), (37, 23, 3, 67), (23, 37, 130, 1), (5, 70, 67, 3)]
DIRECTIONS = [(True, True), (True, False), (False, True)]


def _inputs(n, m, ds, dt, dtype=F64, *, seed=0, noncontig=False, scale_s=4.0, scale_t=7.0, teacher_dtype=None):
    xs = features(n, ds, dtype=dtype, seed=seed, noncontig=noncontig)
    ys = features(m, ds, dtype=dtype, seed=seed + 1, noncontig=noncontig)
    tdt = dtype if teacher_dtype is None else teacher_dtype
    xt = features(n, dt, dtype=tdt, seed=seed + 2, requires_grad=False)
    yt = features(m, dt, dtype=tdt, seed=seed + 3, requires_grad=False)
    ss = torch.tensor(scale_s, dtype=F64 if dtype == F64 else F32, requires_grad=True)
    return xs, ys, xt, yt, ss, scale_t


def _fns(rows=True, cols=True, cross_entropy=False, **kw):
    def fast(*args):
        r, c = similarity_kl(*args, rows=rows, cols=cols, cross_entropy=cross_entropy, **kw)
        assert (r is None) != rows and (c is None) != cols
        return torch.cat([t for t in (r, c) if t is not None])

    def ref(*args):
        r, c = R.similarity_kl(*args, rows=rows, cols=cols, cross_entropy=cross_entropy)
        return torch.cat([t for t in (r, c) if t is not None])

    return fast, ref


def _weights(n, seed=5):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.5


def _kl_logit_bound(args) -> float:
    """L of a KL case (xs, ys, xt, yt, scale_s, scale_t): the larger of the student's and the
    teacher's logit bounds (both enter the loss)."""
    xs, ys, xt, yt, ss, st = args
    return max(logit_bound(xs, ys, ss), logit_bound(xt, yt, st))


def _check(args, dtype, rows=True, cols=True, cross_entropy=False, **kw):
    fast, ref = _fns(rows, cols, cross_entropy, backend=kw.pop("backend", "torch"), **kw)
    n = (args[0].shape[0] if rows else 0) + (args[1].shape[0] if cols else 0)
    return compare(fast, ref, args, dtype, "similarity_kl", weights=_weights(n), logit_bound=_kl_logit_bound(args))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cross_entropy", [False, True])
@pytest.mark.parametrize("rows,cols", DIRECTIONS)
def test_fp64_matches_reference(shape, cross_entropy, rows, cols):
    _check(_inputs(*shape), F64, rows, cols, cross_entropy)


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_fp32_matches_reference_across_chunkings(shape, chunk_size):
    _check(_inputs(*shape, dtype=F32), F32, chunk_size=chunk_size)
    _check(_inputs(*shape, dtype=F32, seed=3), F32, cross_entropy=True, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    args = _inputs(37, 23, 67, 3, dtype=dtype)
    out, _ = _check(args, dtype, cross_entropy=True, chunk_size=5)
    assert out.dtype == F32


def test_noncontiguous_inputs():
    xs, ys, xt, yt, ss, st = _inputs(37, 23, 67, 3, dtype=F32, noncontig=True)
    xt, yt = xt.t().contiguous().t(), yt.t().contiguous().t()
    assert not xs.is_contiguous() and not xt.is_contiguous()
    _check((xs, ys, xt, yt, ss, st), F32, chunk_size=8)


def test_large_scales_fp32():
    """Sharp softmaxes (scale 100 on unit vectors): no underflow to log(0), reference accuracy."""
    _check(_inputs(37, 23, 3, 5, dtype=F32, scale_s=100.0, scale_t=100.0), F32, chunk_size=6)


def test_every_option_at_once():
    """Tensor teacher scale, cross-entropy, rows and columns, chunking, non-determinism allowed,
    non-contiguous student, teacher in another dtype and D."""
    xs, ys, xt, yt, ss, _ = _inputs(23, 37, 3, 130, dtype=F32, noncontig=True, teacher_dtype=torch.bfloat16)
    st = torch.tensor(9.0)
    out, _ = _check((xs, ys, xt, yt, ss, st), F32, cross_entropy=True, chunk_size=4, deterministic=False)
    assert out.dtype == F32


def test_fp64_anywhere_makes_everything_fp64():
    xs, ys, xt, yt, ss, st = _inputs(9, 7, 3, 5, dtype=F32)
    row, col = similarity_kl(xs, ys, xt.double(), yt.double(), ss, st, backend="torch")
    assert row.dtype == col.dtype == F64
    row.sum().backward()
    assert xs.grad.dtype == F32


def test_teacher_gets_no_gradient():
    xs, ys, xt, yt, ss, _ = _inputs(9, 7, 3, 5, dtype=F32)
    xt.requires_grad_(True)
    yt.requires_grad_(True)
    st = torch.tensor(3.0, requires_grad=True)
    row, col = similarity_kl(xs, ys, xt, yt, ss, st, backend="torch")
    (row.sum() + col.sum()).backward()
    assert xt.grad is None and yt.grad is None and st.grad is None
    assert xs.grad is not None and ys.grad is not None and ss.grad is not None


def test_kl_nonnegative_and_zero_when_teacher_is_student():
    xs, ys, xt, yt, ss, st = _inputs(37, 23, 5, 8, dtype=F32, scale_s=30.0, scale_t=3.0)
    row, col = similarity_kl(xs, ys, xt, yt, ss, st, backend="torch", chunk_size=6)
    assert bool((row >= 0).all()) and bool((col >= 0).all())
    assert float(row.detach().min()) > 0  # different distributions
    same_row, same_col = similarity_kl(xs, ys, xs, ys, 30.0, 30.0, backend="torch", chunk_size=6)
    assert bool((same_row == 0).all()) and bool((same_col == 0).all())
    (same_row.sum() + same_col.sum()).backward()
    assert float(xs.grad.abs().max()) <= 1e-6 and float(ys.grad.abs().max()) <= 1e-6


def test_cross_entropy_exceeds_kl_by_teacher_entropy():
    args = _inputs(23, 37, 3, 6, dtype=F64)
    kl_row, kl_col = similarity_kl(*args, backend="torch")
    ce_row, ce_col = similarity_kl(*args, cross_entropy=True, backend="torch")
    xt, yt, st = args[2], args[3], args[5]
    teacher = st * xt @ yt.T
    entropy = lambda L: -(L.softmax(dim=1) * L.log_softmax(dim=1)).sum(dim=1)  # noqa: E731
    assert_loss_close(ce_row - kl_row, entropy(teacher), F64, "row entropy")
    assert_loss_close(ce_col - kl_col, entropy(teacher.T), F64, "column entropy")


def test_uniform_teacher_closed_form():
    """A zero teacher is uniform: KL_i = LSE_j L^s_ij − mean_j L^s_ij − log M."""
    xs, ys, xt, yt, ss, st = _inputs(9, 13, 4, 2, dtype=F64)
    row, col = similarity_kl(xs, ys, torch.zeros_like(xt), torch.zeros_like(yt), ss, st, backend="torch")
    L = ss.detach() * xs.detach() @ ys.detach().T
    assert_loss_close(row, torch.logsumexp(L, 1) - L.mean(1) - math.log(13), F64, "rows")
    assert_loss_close(col, torch.logsumexp(L, 0) - L.mean(0) - math.log(9), F64, "cols")


def test_chunk_budget_from_environment(monkeypatch):
    """A tiny MMLOSS_CHUNK_BYTES forces the 16-row floor: several chunks with a ragged last one."""
    monkeypatch.setenv("MMLOSS_CHUNK_BYTES", "1")
    args = _inputs(50, 29, 3, 4, dtype=F32)
    spec = KLSpec(*args[:4], args[4].detach(), 0.0, None, args[5])
    assert kl_chunk_rows(spec) == 16
    _check(args, F32, cross_entropy=True)


def test_default_chunks_stay_within_half_the_budget():
    spec = KLSpec(*(t.detach() for t in _inputs(4096, 4096, 1, 1, dtype=F32)[:4]), None, 1.0, None, 1.0)
    rows = kl_chunk_rows(spec)
    assert 4 * rows * 4096 * 4 <= (4096 * 4096 * 4 // 16) // 2


def test_reference_backend_matches_torch():
    args = _inputs(9, 7, 3, 5, dtype=F64)
    a = similarity_kl(*args, backend="reference")
    b = similarity_kl(*args, backend="torch")
    for u, v in zip(a, b):
        assert_loss_close(u, v, F64)


def test_deterministic_repeats():
    args = _inputs(37, 23, 5, 6, dtype=F32)
    first = similarity_kl(*args, backend="torch", chunk_size=5)
    second = similarity_kl(*args, backend="torch", chunk_size=5)
    assert all(torch.equal(u, v) for u, v in zip(first, second))


def test_autocast_bf16():
    xs, ys, xt, yt, ss, st = _inputs(13, 11, 8, 4, dtype=F32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        row, col = similarity_kl(xs, ys, xt, yt, ss, st, backend="torch")
    assert row.dtype == F32
    rounded = [t.detach().to(torch.bfloat16).double() for t in (xs, ys, xt, yt)]
    ref_row, ref_col = R.similarity_kl(*rounded, ss.detach().double(), st)
    bound = _kl_logit_bound((xs, ys, xt, yt, ss, st))
    assert_loss_close(row, ref_row, torch.bfloat16, logit_bound=bound)
    assert_loss_close(col, ref_col, torch.bfloat16, logit_bound=bound)


def test_opcheck():
    xs, ys, xt, yt, ss, st = _inputs(9, 7, 5, 3, dtype=F32)
    op, backward_op = torch.ops.mmloss.similarity_kl.default, torch.ops.mmloss.similarity_kl_backward.default
    torch.library.opcheck(op, (xs, ys, xt, yt, ss, 0.0, None, st, True, True, False, "torch", 4, True))
    torch.library.opcheck(op, (xs, ys, xt, yt, None, 2.0, torch.tensor(3.0), 0.0, False, True, True, "torch", 0, True))
    forward_args = (xs.detach(), ys.detach(), xt, yt, ss.detach(), 0.0, None, st, True, True, False, "torch", 4, True)
    _, _, row_stats, col_stats = op(*forward_args)
    torch.library.opcheck(
        backward_op,
        (torch.randn(9), torch.randn(7), *forward_args, row_stats, col_stats, True, True, True),
    )


def test_compile_fullgraph_dynamic():
    xs, ys, xt, yt, ss, st = _inputs(9, 7, 5, 3, dtype=F32)

    def total(a, b, c, d, e):
        row, col = similarity_kl(a, b, c, d, e, st, cross_entropy=True, backend="torch")
        return row.sum() + 2 * col.sum()

    compiled = torch.compile(total, fullgraph=True, dynamic=True, backend="aot_eager")
    out = compiled(xs, ys, xt, yt, ss)
    grads = torch.autograd.grad(out, (xs, ys, ss))
    expected = total(xs, ys, xt, yt, ss)
    expected_grads = torch.autograd.grad(expected, (xs, ys, ss))
    assert_loss_close(out, expected, F32, logit_bound=_kl_logit_bound((xs, ys, xt, yt, ss, st)))
    for a, e in zip(grads, expected_grads):
        assert_grad_close(a, e, F32)


def test_double_backward_raises():
    xs, ys, xt, yt, ss, st = _inputs(5, 4, 3, 3, dtype=F64)
    row, _ = similarity_kl(xs, ys, xt, yt, ss, st, backend="torch")
    (gx,) = torch.autograd.grad(row.sum(), xs, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


# ----------------------------------------------------------------------------- backends


def test_explicit_triton_on_cpu_without_interpreter_raises():
    args = _inputs(5, 4, 3, 3, dtype=F32)
    with pytest.raises(RuntimeError, match="triton"):
        similarity_kl(*args, backend="triton")


# ----------------------------------------------------------------------------- bad inputs


def _good():
    return _inputs(5, 4, 3, 2, dtype=F32)


def test_error_no_direction():
    with pytest.raises(ValueError, match="rows=True or cols=True"):
        similarity_kl(*_good(), rows=False, cols=False)


def test_error_teacher_rows_mismatch():
    xs, ys, xt, yt, ss, st = _good()
    with pytest.raises(ValueError, match="x_t must have as many rows"):
        similarity_kl(xs, ys, xt[:4], yt, ss, st)


def test_error_teacher_columns_mismatch():
    xs, ys, xt, yt, ss, st = _good()
    with pytest.raises(ValueError, match="y_t must have as many rows"):
        similarity_kl(xs, ys, xt, yt[:3], ss, st)


def test_error_student_dims_differ():
    xs, ys, xt, yt, ss, st = _good()
    with pytest.raises(ValueError, match="same feature"):
        similarity_kl(xs, torch.randn(4, 5), xt, yt, ss, st)


def test_error_integer_features():
    xs, ys, xt, yt, ss, st = _good()
    with pytest.raises(TypeError, match="x_t"):
        similarity_kl(xs, ys, xt.long(), yt, ss, st)


def test_error_one_dimensional_features():
    xs, ys, xt, yt, ss, st = _good()
    with pytest.raises(ValueError, match="2-D"):
        similarity_kl(xs[0], ys, xt, yt, ss, st)


def test_error_per_row_scale():
    xs, ys, xt, yt, ss, st = _good()
    with pytest.raises(ValueError, match="scale_s"):
        similarity_kl(xs, ys, xt, yt, torch.ones(5), st)


def test_error_non_finite_scale():
    xs, ys, xt, yt, ss, st = _good()
    with pytest.raises(ValueError, match="scale_t"):
        similarity_kl(xs, ys, xt, yt, ss, float("nan"))


def test_error_flag_type():
    with pytest.raises(TypeError, match="cross_entropy"):
        similarity_kl(*_good(), cross_entropy=1)


def test_error_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        similarity_kl(*_good(), backend="fastest")


def test_error_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        similarity_kl(*_good(), chunk_size=0)


def test_error_device_mismatch():
    xs, ys, xt, yt, ss, st = _good()
    with pytest.raises(ValueError, match="device|on meta"):
        similarity_kl(xs, ys, xt.to("meta"), yt.to("meta"), ss, st)
