"""The triton backend's "gemm" path (``mmloss/ops/triton/gemm_path.py``, ``gemm_path_kl.py``,
``epilogue.py``) under TRITON_INTERPRET=1, against the float64 reference with the primitive
suites' own helpers and tolerances (docs/design.md).

Every case runs with ``MMLOSS_TRITON_PATH=gemm`` and a tiny ``MMLOSS_GEMM_PATH_BYTES`` budget, so
it crosses several product blocks whose edges cut rows and columns unevenly (on CPU tensors a
block may have any size, ``gemm_path.block_plan``): e.g. 37 × 29 at 4 KiB (fp32: 8 bytes per
logit → 22 × 22 blocks) is 2 × 2 blocks of 22/15 rows and 22/7 columns. The cases are a curated
subset of the suites (each mode once rather than every combination twice) to keep this stage's
interpreter time small. On CPU tensors the path multiplies with torch in fp32 (``gemm_engine``
"upcast"); the Triton GEMM (its CUDA fallback) is checked against torch on its own and once
through the whole path.
"""
import pytest
import torch

import mmloss.functional as F
import mmloss.reference as reference
import test_nonfinite as nonfinite
import test_pairwise_sigmoid as sigmoid
import test_similarity_kl as kl
import test_similarity_lse as lse
from mmloss import ops
from mmloss.ops import _traffic
from mmloss.ops.triton import epilogue, gemm_path
from oracle import compare, features

F32 = torch.float32
BUDGET = "4KiB"


@pytest.fixture(autouse=True)
def gemm_env(monkeypatch):
    monkeypatch.setenv("MMLOSS_TRITON_PATH", "gemm")
    monkeypatch.setenv("MMLOSS_GEMM_PATH_BYTES", BUDGET)


def _labels(n, classes, seed):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the path runs


def test_the_gemm_path_runs_in_blocks():
    # the env knob reaches the dispatch: products blocks by the GEMM, several blocks per call
    x, y = features(37, 3, seed=1), features(29, 3, seed=2)
    with _traffic.counting() as rec:
        row, col = ops.similarity_lse(x, y, 3.0, exclude="diagonal", backend="triton")
    products = [g for g in rec.gemms if g.what.startswith("products")]
    assert len(products) == 4 and {(g.m, g.n) for g in products} == {(22, 22), (22, 7), (15, 22), (15, 7)}
    assert all(g.out_dtype == F32 for g in products)


def test_block_edges_follow_chunk_size():
    x, y = features(37, 3, seed=1), features(29, 3, seed=2)
    with _traffic.counting() as rec:
        ops.similarity_lse(x, y, 3.0, backend="triton", chunk_size=10)
    shapes = [(g.m, g.n) for g in rec.gemms if g.what.startswith("products")]
    assert shapes == [(10, 10), (10, 10), (10, 9)] * 3 + [(7, 10), (7, 10), (7, 9)]


def test_triton_gemm_matches_torch():
    # the path's GEMM on CPU / its CUDA fallback: fp32 output, accumulation, transposed operands
    g = torch.Generator().manual_seed(3)
    for dtype in (F32, torch.float16):
        a = torch.randn(37, 21, generator=g).to(dtype)
        b = torch.randn(29, 21, generator=g).to(dtype)
        out = torch.empty(37, 29)
        epilogue.triton_gemm(a, b.t(), out, False, "ieee")
        expected = a.double() @ b.double().t()
        assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)
        epilogue.triton_gemm(a.t().contiguous().t(), b.t(), out, True, "ieee")
        assert torch.allclose(out.double(), 2 * expected, rtol=1e-5, atol=1e-5)


def test_lse_with_the_triton_gemm(monkeypatch):
    # the whole path with the Triton GEMM (the CUDA fallback) instead of the CPU upcast
    monkeypatch.setattr(gemm_path, "gemm_engine", lambda device, dtype: "triton")
    lse.run_case(21, 18, 19, exclude="diagonal", scale=("rows", 3.0), bias=0.5, seed=7)


# ----------------------------------------------------------------------------- counted at 32k


def _meta_spec(n, m, d, dtype, marks="diagonal"):
    from mmloss.ops._spec import PairSpec

    x = torch.empty((n, d), dtype=dtype, device="meta")
    y = torch.empty((m, d), dtype=dtype, device="meta")
    return PairSpec(x, y, torch.empty((), device="meta"), 0.0, torch.empty((), device="meta"), 0.0, marks, 0,
                    None, None, 0, True)


def _per_logit(rec, prefixes, n, m):
    return sum(t.read + t.write for t in rec.transfers if t.what.startswith(prefixes)) / (n * m)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_clip_32k_counts(monkeypatch, dtype):
    # the acceptance, from the code path itself (meta tensors, no kernel runs):
    # 4 GEMM-equivalents, ≤ 24 B per logit outside the GEMMs (bf16), ≤ 256 MiB workspace.
    # (The path's functions directly: the backend's entry refuses bf16 under the interpreter.)
    backend = gemm_path
    monkeypatch.delenv("MMLOSS_GEMM_PATH_BYTES")
    n = m = 32768
    d = 768
    spec = _meta_spec(n, m, d, dtype)
    meta = dict(device="meta")
    with _traffic.counting(execute=False) as rec:
        row, col, rs, cs = backend.similarity_lse_forward(spec, True, True)
        dx, dy, ds, db = backend.similarity_lse_backward(spec, torch.empty(n, **meta), torch.empty(m, **meta),
                                                         rs, cs, (True, True, True, True))
    assert rec.gemm_flops() == 4 * 2 * n * m * d
    assert rs.shape == (2, n) and cs.shape == (2, m) and dx.shape == (n, d) and dx.dtype == dtype
    outside = _per_logit(rec, ("logits:", "stats:"), n, m)
    assert outside <= (24 if dtype == torch.bfloat16 else 30), outside
    assert rec.workspace_bytes() <= 256 << 20, rec.workspace
    with _traffic.counting(execute=False) as rec:
        backend.pairwise_sigmoid_sum(spec, (True, True, True, True))
    assert rec.gemm_flops() == 3 * 2 * n * m * d
    assert rec.workspace_bytes() <= 256 << 20, rec.workspace


def test_workspace_budget_env(monkeypatch):
    monkeypatch.setenv("MMLOSS_GEMM_PATH_BYTES", "16MiB")
    plan = gemm_path.block_plan(32768, 32768, 0, 6, torch.device("meta"))
    assert plan.rows % 128 == 0 and plan.rows * plan.cols * 6 <= 16 << 20 and plan.rows == plan.cols
    assert gemm_path.block_plan(32768, 32768, 100, 6, torch.device("meta")).rows == 100  # chunk_size wins
    assert gemm_path.block_plan(50, 32768, 0, 6, torch.device("meta")).rows == 50
    monkeypatch.setenv("MMLOSS_GEMM_PATH_BYTES", "lots")
    with pytest.raises(ValueError, match="MMLOSS_GEMM_PATH_BYTES"):
        gemm_path.budget_bytes()


def test_path_choice(monkeypatch):
    from mmloss.ops.triton._path import choose_path

    cpu = features(4, 3, requires_grad=False)
    spec32 = _meta_spec(8, 8, 4, torch.float32)
    spec16 = _meta_spec(8, 8, 4, torch.float16)
    cpu_spec = spec32.__class__(cpu, cpu, None, 1.0, None, 0.0, "none", 0, None, None, 0, True)
    monkeypatch.setenv("MMLOSS_TRITON_PATH", "auto")
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        # exact fp32 on a GPU target: the fused owner kernels would spill → gemm; the
        # interpreter (CPU) and half inputs keep the fused kernels
        assert choose_path(spec32) == "gemm" and choose_path(spec16) == "fused"
        assert choose_path(cpu_spec) == "fused"
        torch.set_float32_matmul_precision("high")
        assert choose_path(spec32) == "fused"
    finally:
        torch.set_float32_matmul_precision(prev)
    monkeypatch.setenv("MMLOSS_TRITON_PATH", "GEMM")
    assert choose_path(cpu_spec) == "gemm"
    monkeypatch.setenv("MMLOSS_TRITON_PATH", "fast")
    with pytest.raises(ValueError, match="MMLOSS_TRITON_PATH must be one of auto, fused, gemm"):
        ops.similarity_lse(cpu, cpu, 1.0, backend="triton")


# ----------------------------------------------------------------------------- similarity_lse


@pytest.mark.parametrize("exclude,offset", [("none", 0), ("diagonal", 3), ("diagonal", -2), ("diagonal", 40)])
def test_lse_marks_and_offsets(exclude, offset):
    # offset 40: the marked diagonal lies beyond the 37 × 29 matrix
    lse.run_case(37, 29, 3, exclude=exclude, offset=offset, seed=abs(offset) + 5)


def test_lse_every_option_at_once():
    # same_label, per-row scale, bias tensor, strided inputs, N ≠ M, D = 67
    lse.run_case(35, 23, 67, exclude="same_label", x_labels=_labels(35, 3, 4), y_labels=_labels(23, 3, 5),
                 scale=("rows", 6.0), bias=-1.5, noncontig=True, seed=9)


@pytest.mark.parametrize("rows,cols,scale_kind", [(True, False, "rows"), (False, True, "float")])
def test_lse_one_direction(rows, cols, scale_kind):
    lse.run_case(33, 21, 3, exclude="diagonal", offset=1, rows=rows, cols=cols, scale=(scale_kind, 2.5))


@pytest.mark.parametrize("n,m,d", [(1, 9, 5), (70, 2, 1), (19, 41, 67)])
def test_lse_ragged_shapes(n, m, d):
    lse.run_case(n, m, d, exclude="diagonal", scale=("tensor", 4.0), seed=n + m + d)


def test_lse_large_scale_gradients():
    lse.run_case(26, 31, 3, exclude="diagonal", scale=("tensor", 500.0), seed=41)


def test_lse_fully_excluded_rows_and_columns():
    lse.test_fully_excluded_rows_and_columns()


@pytest.mark.parametrize("need", ["scale", "bias"])
def test_lse_single_gradient(need):
    # scale only: the epilogue's dscale partials without G or gradient GEMMs; bias: no pass
    lse.test_single_gradient(need)


def test_lse_half_inputs():
    lse.test_half_inputs()


def test_lse_saved_statistics_layout():
    # the fused kernels' [m2, lg2] format (ring merges and lse_from_stats read it)
    lse.test_saved_statistics_layout(True, True, "row")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the NaN / inf arithmetic
def test_lse_nan_feature():
    nonfinite.test_similarity_lse_non_finite_feature(float("nan"), "diagonal")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the NaN / inf arithmetic
def test_lse_non_finite_bias():
    nonfinite.test_similarity_lse_non_finite_bias()


# ----------------------------------------------------------------------------- pairwise_sigmoid


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_sigmoid_positives(reduction):
    sigmoid.run_case(31, 27, 3, positives="diagonal", offset=2, reduction=reduction, seed=3)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_sigmoid_every_option_at_once(reduction):
    sigmoid.run_case(34, 25, 67, positives="same_label", x_labels=_labels(34, 4, 5), y_labels=_labels(25, 4, 6),
                     scale=("rows", 8.0), bias=-3.0, noncontig=True, reduction=reduction, seed=12)


@pytest.mark.parametrize("n,m,d,reduction", [(1, 7, 3, "none"), (4, 70, 20, "sum")])
def test_sigmoid_ragged_shapes(n, m, d, reduction):
    sigmoid.run_case(n, m, d, positives="none" if n == 1 else "diagonal", reduction=reduction, seed=n + m + d)


@pytest.mark.parametrize("need", ["x", "y", "scale", "bias"])
def test_sigmoid_sum_single_gradient(need):
    # every subset the SigLIP path forms in its forward: each gradient alone here, all of them in
    # test_sigmoid_every_option_at_once, none in test_sigmoid_sum_without_gradients
    sigmoid.test_single_gradient(need, "sum")


def test_sigmoid_sum_every_subset_of_needs():
    # the SigLIP path forms what is asked in its one pass: every subset gives the all-gradients
    # call's values bit for bit (that call is checked against the reference above), None elsewhere
    import itertools

    from mmloss.ops._spec import PairSpec

    x, y = features(13, 3, seed=21, requires_grad=False), features(11, 3, seed=22, requires_grad=False)
    spec = PairSpec(x, y, torch.linspace(2.0, 5.0, 13), 0.0, torch.tensor(-1.0), 0.0, "diagonal", 1,
                    None, None, 0, True)
    full = gemm_path.pairwise_sigmoid_sum(spec, (True,) * 4)
    for needs in itertools.product((False, True), repeat=4):
        out = gemm_path.pairwise_sigmoid_sum(spec, needs)
        assert torch.equal(out[0], full[0])
        for need, got, want in zip(needs, out[1:], full[1:]):
            assert (got is None) != need and (got is None or torch.equal(got, want)), needs


def test_sigmoid_sum_without_gradients():
    sigmoid.test_sum_without_gradients_is_forward_only()


def test_sigmoid_scalar_and_zero_scale():
    sigmoid.test_scalar_and_zero_scale("none")


def test_sigmoid_tiny_terms():
    sigmoid.test_tiny_terms_keep_relative_precision()


def test_sigmoid_half_inputs():
    sigmoid.test_half_inputs()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the NaN / inf arithmetic
def test_siglip_loss_nan_propagates():
    nonfinite.test_siglip_loss_nan_propagates()


# ----------------------------------------------------------------------------- similarity_kl


@pytest.mark.parametrize("rows,cols,cross_entropy", [(True, True, True), (True, False, False), (False, True, True)])
def test_kl_directions_and_forms(rows, cols, cross_entropy):
    kl.test_directions_and_forms(rows, cols, cross_entropy)


def test_kl_ragged_shapes():
    kl.run_case(19, 41, 67, 3, cross_entropy=True, seed=19 + 41 + 67)


def test_kl_teacher_is_student():
    kl.test_teacher_is_student(False)


def test_kl_single_gradient_scale():
    kl.test_single_gradient("scale")


def test_kl_half_inputs():
    kl.test_half_inputs()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the NaN / inf arithmetic
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_kl_nan_rows(where):
    nonfinite.test_similarity_kl_nan_rows(where, where == "teacher")


def test_kl_saved_statistics_layout():
    kl.test_saved_statistics_layout(True, True)


# ----------------------------------------------------------------------------- losses


def test_clip_loss_with_labels():
    n, d = 27, 19
    x, y = features(n, d, seed=1), features(n, d, seed=2, noncontig=True)
    s = torch.tensor(14.0, requires_grad=True)
    labels = _labels(n, 5, 3)
    compare(lambda x, y, s: F.clip_loss(x, y, s, labels=labels, backend="triton"),
            lambda x, y, s: reference.clip_loss(x, y, s, labels=labels), [x, y, s], F32, "clip_loss")
