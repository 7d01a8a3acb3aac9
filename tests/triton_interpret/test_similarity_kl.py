"""similarity_kl on the triton backend under TRITON_INTERPRET=1, against the float64 reference.

Interpreter tiles are 16×16×16 (the "kl_stats" and "owner" rows), the owner kernels hold up to
four 16-wide accumulators (64 columns of D_s per slice) and the device pretends to have 3
programs, so shapes of a few dozen rows cover ragged edges, D slices, persistent loops over row
blocks, column partials and column splits. Values and the student's gradients (x_s, y_s,
scale_s) of a random weighting of the outputs are compared; the teacher gets none.
"""
import pytest
import torch

import mmloss.functional as F
import mmloss.reference as reference
from mmloss import ops
from mmloss.losses import DistillClipLoss
from mmloss.ops._spec import KLSpec
from oracle import assert_grad_close, assert_loss_close, compare, features, logit_bound, oracle

F32 = torch.float32


def teacher_features(n, d, seed, **kw):
    return features(n, d, seed=seed, requires_grad=False, **kw)


def run_case(n, m, d_s, d_t, *, rows=True, cols=True, cross_entropy=False, scale_s=4.0, scale_t=7.0,
             seed=0, noncontig=False, deterministic=None, normalize=True, feature_scale=1.0,
             inputs=None, dtype=F32, teacher_dtype=None, conditioned=False):
    """Compare row / column values and the student gradients of a random weighting with the
    oracle; ``scale_s`` a float or a tensor (a float is wrapped in a tensor that needs grad).
    ``conditioned``: bound the values by their sensitivity to fp32 logit rounding as well
    (``kl_rounding_bound``; large scales)."""
    if inputs is None:
        kw = dict(noncontig=noncontig, normalize=normalize, scale=feature_scale)
        tdt = dtype if teacher_dtype is None else teacher_dtype
        inputs = (features(n, d_s, seed=seed, dtype=dtype, **kw), features(m, d_s, seed=seed + 1, dtype=dtype, **kw),
                  teacher_features(n, d_t, seed + 2, dtype=tdt, **kw),
                  teacher_features(m, d_t, seed + 3, dtype=tdt, **kw))
    x_s, y_s, x_t, y_t = inputs
    s = scale_s if isinstance(scale_s, torch.Tensor) else torch.tensor(scale_s, dtype=F32, requires_grad=True)
    kw = dict(rows=rows, cols=cols, cross_entropy=cross_entropy)

    def cat(row, col):
        assert (row is None) != rows and (col is None) != cols
        return torch.cat([t for t in (row, col) if t is not None])

    def fast(x_s, y_s, s):
        return cat(*ops.similarity_kl(x_s, y_s, x_t, y_t, s, scale_t, backend="triton",
                                      deterministic=deterministic, **kw))

    def ref(x_s, y_s, s):
        return cat(*reference.similarity_kl(x_s, y_s, oracle(x_t), oracle(y_t), s, oracle(scale_t), **kw))

    size = (x_s.shape[0] if rows else 0) + (y_s.shape[0] if cols else 0)
    weights = 0.5 + torch.rand(size, generator=torch.Generator().manual_seed(seed + 5), dtype=torch.float64)
    # the value depends on both logit matrices: L is the larger of the two bounds
    bound = max(logit_bound(x_s, y_s, s), logit_bound(x_t, y_t, scale_t))
    if not conditioned:
        return compare(fast, ref, [x_s, y_s, s], dtype, "similarity_kl", weights=weights, logit_bound=bound)
    # Values checked against the docs/design.md rule plus their first-order sensitivity to fp32
    # logit rounding (kl_rounding_bound), gradients by the gradient rule.
    out = fast(x_s, y_s, s)
    ref_inputs = [oracle(t) for t in (x_s, y_s, s)]
    expected = ref(*ref_inputs)
    assert_values_within(out, expected, bound, kl_rounding_bound(x_s, y_s, x_t, y_t, s, scale_t, **kw))
    got = torch.autograd.grad((out * weights.to(out.dtype)).sum(), [x_s, y_s, s])
    want = torch.autograd.grad((expected * weights).sum(), ref_inputs)
    for name, g, e in zip(("dx_s", "dy_s", "dscale_s"), got, want):
        assert_grad_close(g, e, dtype, f"similarity_kl {name}")
    return out, expected


def _divergence(student, teacher, cross_entropy):
    """Per-row KL(softmax(teacher)‖softmax(student)) or H(p_t, p_s) of float64 logits."""
    log_q, log_p = torch.log_softmax(student, dim=1), torch.log_softmax(teacher, dim=1)
    return -(log_p.exp() * log_q).sum(1) if cross_entropy else (log_p.exp() * (log_p - log_q)).sum(1)


def kl_rounding_bound(x_s, y_s, x_t, y_t, scale_s, scale_t, *, rows, cols, cross_entropy):
    """Per output: Σ_ij |∂v/∂S_ij|·δS_ij + |∂v/∂T_ij|·δT_ij (float64), the first-order change of
    each value when every logit moves by its fp32 rounding bound δ = (D + 2)·2⁻²⁴·|s|·Σ_k|a_k b_k|
    (a D-term dot product plus the scale product). A KL value can depend on a logit with weight
    p(1 − p)·|T − S| — hundreds at scale 500 when a teacher row is split between two columns —
    so fp32 logits alone move it by far more than 1e-5 relative; every correct fp32
    implementation (dense ones included) lands within this bound, whichever rounding it gets."""
    def matrices(x, y, sc):
        x, y = oracle(x).detach(), oracle(y).detach()
        sc = float(sc.detach()) if isinstance(sc, torch.Tensor) else float(sc)
        delta = (x.shape[1] + 2) * 2.0 ** -24 * abs(sc) * (x.abs() @ y.abs().T)
        return sc * (x @ y.T), delta

    S, dS = matrices(x_s, y_s, scale_s)
    T, dT = matrices(x_t, y_t, scale_t)

    def values(S, T):
        parts = ([_divergence(S, T, cross_entropy)] if rows else []) + ([_divergence(S.T, T.T, cross_entropy)] if cols else [])
        return torch.cat(parts)

    jac_s, jac_t = torch.autograd.functional.jacobian(values, (S, T))
    return (jac_s.abs() * dS).sum(dim=(1, 2)) + (jac_t.abs() * dT).sum(dim=(1, 2))


def assert_values_within(actual, expected, bound_l, rounding):
    """|actual − expected| ≤ 1e-5·|expected| + 1e-6·L + rounding, elementwise; names the element."""
    a, e = actual.detach().double(), expected.detach().double()
    err = (a - e).abs()
    bound = 1e-5 * e.abs() + 1e-6 * bound_l + rounding
    failed = ~(err <= bound)
    if bool(failed.any()):
        idx = int(torch.where(failed, err / bound, float("inf")).argmax())
        raise AssertionError(f"similarity_kl value {idx}: actual {a[idx].item():.10g}, expected "
                             f"{e[idx].item():.10g}, error {err[idx].item():.3g} > bound {bound[idx].item():.3g} "
                             f"(1e-5·|ref| + 1e-6·L + fp32 logit-rounding sensitivity {rounding[idx].item():.3g})")


@pytest.mark.parametrize("cross_entropy", [False, True])
@pytest.mark.parametrize("rows,cols", [(True, True), (True, False), (False, True)])
def test_directions_and_forms(rows, cols, cross_entropy):
    # columns only runs the rows kernel on the swapped problem; D_t ≠ D_s
    out, _ = run_case(37, 29, 3, 5, rows=rows, cols=cols, cross_entropy=cross_entropy, seed=int(rows) + 2 * int(cols))
    assert out.dtype == F32 and bool((out >= 0).all())


@pytest.mark.parametrize("n,m,d_s,d_t", [(1, 1, 1, 1), (1, 9, 5, 3), (50, 2, 1, 3), (19, 41, 67, 3),
                                         (5, 50, 18, 20), (23, 37, 3, 67)])
def test_ragged_shapes(n, m, d_s, d_t):
    # (50, 2, 1, 3): rounds of the persistent loop over row blocks; (19, 41, 67, 3): two D_s
    # slices of four accumulators; (5, 50, 18, 20): one A block, split columns (row partials +
    # combine) and split owner outputs; (23, 37, 3, 67): the teacher's D loops over K chunks
    run_case(n, m, d_s, d_t, cross_entropy=(n + m) % 2 == 0, seed=n + m + d_s)


def test_every_option_at_once():
    # cross-entropy, tensor teacher scale, both directions, deterministic=False (dy by atomics),
    # column-major student and teacher, N ≠ M, D_s ≠ D_t, neither a multiple of 16, fp16 teacher
    # beside an fp32 student
    x_s = features(35, 67, seed=71, noncontig=True)
    y_s = features(23, 67, seed=72, noncontig=True)
    x_t = teacher_features(35, 3, 73, noncontig=True, dtype=torch.float16)
    y_t = teacher_features(23, 3, 74, noncontig=True, dtype=torch.float16)
    assert not x_s.is_contiguous() and not x_t.is_contiguous()
    run_case(0, 0, 0, 0, inputs=(x_s, y_s, x_t, y_t), cross_entropy=True, scale_s=6.0,
             scale_t=torch.tensor(9.0), deterministic=False, seed=9)


@pytest.mark.parametrize("cross_entropy", [False, True])
def test_fast_mode_matches(cross_entropy):
    run_case(29, 22, 5, 4, cross_entropy=cross_entropy, deterministic=False, seed=13)


def test_strided_views():
    base = features(60, 40, seed=21).detach()
    x_s = base[::2, 3:36].requires_grad_(True)              # row stride 80
    y_s = base[1::3, 2:35].requires_grad_(True)             # row stride 120
    x_t = base.t()[:5, :30].t()                             # column stride 40 (column-major view)
    y_t = base[40:, ::8]                                    # column stride 8
    assert not any(t.is_contiguous() for t in (x_s, y_s, x_t, y_t))
    run_case(0, 0, 0, 0, inputs=(x_s, y_s, x_t, y_t), cross_entropy=True, seed=3)


def test_large_scale_unnormalised_values():
    # no fixed max shift: logits in the thousands (scale 1000) stay exact to fp32
    big = dict(normalize=False, scale=3.0)
    x_s, y_s = features(23, 5, seed=31, **big), features(17, 5, seed=32, **big)
    x_t, y_t = teacher_features(23, 4, 33, **big), teacher_features(17, 4, 34, **big)
    for ce in (False, True):
        row, col = ops.similarity_kl(x_s, y_s, x_t, y_t, 1000.0, 1000.0, cross_entropy=ce, backend="triton")
        r_ref, c_ref = reference.similarity_kl(oracle(x_s), oracle(y_s), oracle(x_t), oracle(y_t), 1000.0, 1000.0,
                                               cross_entropy=ce)
        assert float(r_ref.detach().max()) > 1000.0
        assert_loss_close(row, r_ref, F32, f"rows at scale 1000 (cross_entropy={ce})")
        assert_loss_close(col, c_ref, F32, f"columns at scale 1000 (cross_entropy={ce})")


def test_large_scale_gradients():
    # scale 500 on unnormalised features: logits of several thousand, sharp softmaxes on both
    # sides. Column 9 of the first case has a teacher split 0.61/0.39 between two rows whose
    # T − S differ by ~460: its KL (770.58) moves by ~0.02 when the logits are rounded to fp32
    # (dense fp32 on Intel vs AMD BLAS differ there too), so values get the rounding-aware bound.
    run_case(26, 31, 3, 4, scale_s=500.0, scale_t=500.0, normalize=False, seed=41, conditioned=True)
    run_case(26, 31, 3, 4, scale_s=500.0, scale_t=500.0, normalize=False, cross_entropy=True, seed=42,
             conditioned=True)


@pytest.mark.parametrize("cross_entropy", [False, True])
def test_teacher_is_student(cross_entropy):
    # identical tiles: KL is exactly 0 with an exactly zero gradient; H is the teacher's entropy
    x = features(29, 6, seed=51)
    y = features(22, 6, seed=52)
    s = torch.tensor(20.0, requires_grad=True)
    row, col = ops.similarity_kl(x, y, x, y, s, s, cross_entropy=cross_entropy, backend="triton")
    r_ref, c_ref = reference.similarity_kl(oracle(x), oracle(y), oracle(x), oracle(y), oracle(s), oracle(s),
                                           cross_entropy=cross_entropy)
    if not cross_entropy:
        assert bool((row == 0).all()) and bool((col == 0).all())
    assert_loss_close(row, r_ref, F32, "rows")
    assert_loss_close(col, c_ref, F32, "columns")
    gx, gy, gs = torch.autograd.grad((row * torch.arange(29)).sum() + col.sum(), [x, y, s])
    for g in (gx, gy, gs):
        assert bool((g == 0).all())


@pytest.mark.parametrize("need", ["x", "y", "scale"])
def test_single_gradient(need):
    """Only one student input requires grad: the row owner alone (dx or dscale), the column
    owner alone (dy); in both modes."""
    x = features(29, 3, seed=61, requires_grad=need == "x")
    y = features(22, 3, seed=62, requires_grad=need == "y")
    s = torch.tensor(2.0, requires_grad=need == "scale")
    x_t, y_t = teacher_features(29, 5, 63), teacher_features(22, 5, 64)
    for det in (None, False):
        row, col = ops.similarity_kl(x, y, x_t, y_t, s, 3.0, backend="triton", deterministic=det)
        (g,) = torch.autograd.grad((row * torch.arange(29)).sum() + col.sum(), [dict(x=x, y=y, scale=s)[need]])
        xo, yo, so = oracle(x), oracle(y), oracle(s)
        r, c = reference.similarity_kl(xo, yo, oracle(x_t), oracle(y_t), so, 3.0)
        (e,) = torch.autograd.grad((r * torch.arange(29)).sum() + c.sum(), [dict(x=xo, y=yo, scale=so)[need]])
        assert_grad_close(g, e, F32, f"d{need}")


def test_zero_student_scale_and_float_scales():
    # dscale = Σ G⊙⟨x, y⟩ needs no division by s; Python-float scales take the constant path
    run_case(21, 18, 3, 2, scale_s=0.0, seed=81)
    x_s, y_s = features(21, 3, seed=82), features(18, 3, seed=83)
    x_t, y_t = teacher_features(21, 2, 84), teacher_features(18, 2, 85)
    compare(lambda a, b: torch.cat(ops.similarity_kl(a, b, x_t, y_t, 5.0, 2.0, backend="triton")),
            lambda a, b: torch.cat(reference.similarity_kl(a, b, oracle(x_t), oracle(y_t), 5.0, 2.0)),
            [x_s, y_s], F32, "float scales")


def test_half_inputs():
    # fp16 operands into the MMA with fp32 accumulation and statistics; reference on the same
    # rounded inputs. (bf16 is compile-checked: the interpreter's tl.dot multiplies bf16 bit
    # patterns as integers.)
    out, _ = run_case(21, 18, 19, 7, dtype=torch.float16, cross_entropy=True, seed=91)
    assert out.dtype == F32


def test_float64_is_refused():
    x = features(4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        ops.similarity_kl(x, x, x, x, 1.0, 1.0, backend="triton")


def test_opcheck_triton_backend():
    g = torch.Generator().manual_seed(0)
    x_s = torch.randn(20, 5, generator=g).requires_grad_()
    y_s = torch.randn(17, 5, generator=g).requires_grad_()
    x_t, y_t = torch.randn(20, 3, generator=g), torch.randn(17, 3, generator=g)
    s = torch.tensor(2.0, requires_grad=True)
    op, backward_op = torch.ops.mmloss.similarity_kl.default, torch.ops.mmloss.similarity_kl_backward.default
    for ce in (False, True):
        torch.library.opcheck(op, (x_s, y_s, x_t, y_t, s, 0.0, None, 1.5, True, True, ce, "triton", 0, True))
    forward_args = (x_s.detach(), y_s.detach(), x_t, y_t, s.detach(), 0.0, None, 1.5, True, True, False,
                    "triton", 0, True)
    _, _, row_stats, col_stats = op(*forward_args)
    torch.library.opcheck(
        backward_op,
        (torch.randn(20, generator=g), torch.randn(17, generator=g), *forward_args, row_stats, col_stats,
         True, True, True),
    )


# ----------------------------------------------------------------------------- the losses on it


@pytest.mark.parametrize("cross_entropy", [True, False])
def test_contrastive_distill_loss(cross_entropy):
    x, y = features(27, 19, seed=101), features(23, 19, seed=102, noncontig=True)
    x_t, y_t = teacher_features(27, 5, 103), teacher_features(23, 5, 104)
    s = torch.tensor(14.0, requires_grad=True)

    def fast(x, y, s):
        return F.contrastive_distill_loss(x, y, s, x_t, y_t, 20.0, cross_entropy=cross_entropy, backend="triton")

    def ref(x, y, s):
        return reference.contrastive_distill_loss(x, y, s, oracle(x_t), oracle(y_t), 20.0, cross_entropy=cross_entropy)

    compare(fast, ref, [x, y, s], F32, f"contrastive_distill_loss[cross_entropy={cross_entropy}]")


def test_distill_clip_loss_module():
    n = 25
    x, y = features(n, 11, seed=111), features(n, 11, seed=112)
    x_t, y_t = teacher_features(n, 7, 113), teacher_features(n, 7, 114)
    s = torch.tensor(12.0, requires_grad=True)
    module = DistillClipLoss(backend="triton")

    def fast(x, y, s):
        contrastive, distill = module(x, y, s, x_t, y_t, torch.tensor(25.0))
        return torch.stack((contrastive, distill))

    def ref(x, y, s):
        contrastive = reference.clip_loss(x, y, s)
        distill = reference.contrastive_distill_loss(x, y, s, oracle(x_t), oracle(y_t), 25.0)
        return torch.stack((contrastive, distill))

    compare(fast, ref, [x, y, s], F32, "DistillClipLoss")


def test_modx_loss():
    n = 24
    x, y = features(n, 9, seed=121), features(n, 9, seed=122)
    # an old model close to the new one (most diagonals are the argmax), with another D
    g = torch.Generator().manual_seed(123)
    x_o = torch.nn.functional.normalize(x.detach()[:, :6] + 0.3 * torch.randn(n, 6, generator=g), dim=1)
    y_o = torch.nn.functional.normalize(y.detach()[:, :6] + 0.3 * torch.randn(n, 6, generator=g), dim=1)
    s = torch.tensor(10.0, requires_grad=True)

    def fast(x, y, s):
        return F.modx_loss(x, y, s, x_o, y_o, 2.0, backend="triton")

    def ref(x, y, s):
        return reference.modx_loss(x, y, s, oracle(x_o), oracle(y_o), 2.0)

    compare(fast, ref, [x, y, s], F32, "modx_loss")


@pytest.mark.parametrize("rows,cols", [(True, True), (True, False), (False, True)])
def test_saved_statistics_layout(rows, cols):
    # the backend contract (issue 8, item 1): stats (4, N) / (4, M) = [student max, student
    # log-sum, teacher max, teacher log-sum] of t2 = log2(e)·s·⟨a, b⟩, log2 units; (4, 0) when
    # that direction is not asked
    from mmloss.ops import triton as backend

    x_s, y_s = features(7, 3, seed=61, requires_grad=False), features(9, 3, seed=62, requires_grad=False)
    x_t, y_t = teacher_features(7, 4, 63), teacher_features(9, 4, 64)
    spec = KLSpec(x_s, y_s, x_t, y_t, torch.tensor(4.0), 0.0, None, 6.0, 0, True)
    _, _, row_stats, col_stats = backend.similarity_kl_forward(spec, rows, cols, False)
    ln2 = torch.log(torch.tensor(2.0, dtype=torch.float64))
    s2 = (x_s.double() @ y_s.double().T) * 4.0 / ln2
    t2 = (x_t.double() @ y_t.double().T) * 6.0 / ln2
    for on, stats, axis, n in ((rows, row_stats, 1, 7), (cols, col_stats, 0, 9)):
        assert stats.dtype == F32 and stats.shape == ((4, n) if on else (4, 0))
        if not on:
            continue
        for k, logits in ((0, s2), (2, t2)):
            m2 = logits.amax(dim=axis)
            lg2 = torch.log2(torch.exp2(logits - m2.unsqueeze(axis)).sum(dim=axis))
            assert torch.allclose(stats[k].double(), m2, rtol=1e-6, atol=1e-6)
            assert torch.allclose(stats[k + 1].double(), lg2, rtol=1e-5, atol=1e-6)
