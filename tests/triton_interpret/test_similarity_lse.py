"""similarity_lse on the triton backend under TRITON_INTERPRET=1, against the float64 reference.

Interpreter tiles are 16×16×16, the owner kernels hold up to four 16-wide accumulators (64
columns per D slice) and the device pretends to have 3 programs, so these small shapes cover
ragged edges, D slices, several accumulators, persistent loops over row blocks and column splits.
"""
import pytest
import torch

import mmloss.reference as reference
from mmloss import ops
from oracle import assert_grad_close, assert_loss_close, compare, features, oracle

F32 = torch.float32


def _scale(kind: str, value: float, n: int, seed: int):
    if kind == "float":
        return value
    if kind == "tensor":
        return torch.tensor(value, dtype=F32, requires_grad=True)
    g = torch.Generator().manual_seed(seed + 7)
    return (value * (0.5 + torch.rand(n, generator=g, dtype=torch.float64))).to(F32).requires_grad_(True)


def _labels(n: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed + 11)
    return torch.randint(0, classes, (n,), generator=g)


def run_case(n, m, d, *, exclude="none", offset=0, x_labels=None, y_labels=None, rows=True, cols=True,
             scale=("float", 3.0), bias=None, seed=0, noncontig=False, deterministic=None,
             normalize=True, feature_scale=1.0, x=None, y=None):
    """Compare values and the gradients of a random weighting of (row, col) with the oracle."""
    if x is None:
        x = features(n, d, seed=seed, noncontig=noncontig, normalize=normalize, scale=feature_scale)
    if y is None:
        y = features(m, d, seed=seed + 1, noncontig=noncontig, normalize=normalize, scale=feature_scale)
    s = _scale(scale[0], scale[1], x.shape[0], seed)
    b = None if bias is None else torch.tensor(bias, dtype=F32, requires_grad=True)
    kw = dict(exclude=exclude, offset=offset, x_labels=x_labels, y_labels=y_labels, rows=rows, cols=cols)

    def cat(row, col):
        return torch.cat([t for t in (row, col) if t is not None])

    def fast(x, y, s, b):
        return cat(*ops.similarity_lse(x, y, s, b, backend="triton", deterministic=deterministic, **kw))

    def ref(x, y, s, b):
        return cat(*reference.similarity_lse(x, y, s, b, **kw))

    size = (x.shape[0] if rows else 0) + (y.shape[0] if cols else 0)
    weights = 0.5 + torch.rand(size, generator=torch.Generator().manual_seed(seed + 3), dtype=torch.float64)
    return compare(fast, ref, [x, y, s, b], F32, "similarity_lse", weights=weights)


@pytest.mark.parametrize("exclude,offset", [("none", 0), ("diagonal", 0), ("diagonal", 3), ("diagonal", -2)])
@pytest.mark.parametrize("deterministic", [None, False])
def test_marks_and_offsets(exclude, offset, deterministic):
    run_case(37, 29, 3, exclude=exclude, offset=offset, deterministic=deterministic, seed=offset + 5)


@pytest.mark.parametrize("deterministic", [None, False])
def test_same_label(deterministic):
    run_case(37, 29, 3, exclude="same_label", x_labels=_labels(37, 4, 1), y_labels=_labels(29, 4, 2),
             deterministic=deterministic)


@pytest.mark.parametrize("rows,cols", [(True, False), (False, True)])
@pytest.mark.parametrize("scale_kind", ["float", "rows"])
def test_one_direction(rows, cols, scale_kind):
    # columns only runs the rows kernel on the swapped problem (per-row scale on the B side)
    run_case(33, 21, 3, exclude="diagonal", offset=1, rows=rows, cols=cols, scale=(scale_kind, 2.5))


@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (1, 9, 5), (70, 2, 1), (19, 41, 67), (5, 70, 18)])
def test_ragged_shapes(n, m, d):
    # (19, 41, 67): two D slices of four accumulators; (5, 70, 18): one A block, column splits;
    # (70, 2, 1): rounds of the persistent loop over row blocks
    run_case(n, m, d, exclude="diagonal", scale=("tensor", 4.0), seed=n + m + d)


@pytest.mark.parametrize("deterministic", [None, False])
def test_every_option_at_once(deterministic):
    # per-row scale and bias tensors, labels, strided inputs, N ≠ M, D not a multiple of 16
    run_case(35, 23, 67, exclude="same_label", x_labels=_labels(35, 3, 4), y_labels=_labels(23, 3, 5),
             scale=("rows", 6.0), bias=-1.5, noncontig=True, deterministic=deterministic, seed=9)


def test_strided_views():
    base_x = features(60, 40, seed=21)
    base_y = features(50, 40, seed=22)
    x = base_x.detach()[::2, 3:36].requires_grad_(True)   # row stride 80, column stride 1
    y = base_y.detach()[1::3, 2:35].requires_grad_(True)          # row stride 120
    assert not x.is_contiguous() and not y.is_contiguous()
    run_case(0, 0, 0, x=x, y=y, exclude="diagonal", offset=-1, scale=("tensor", 3.0))


def test_zero_scale_gradient():
    # dscale_i = ⟨x_i, (G·y)_i⟩ needs no division by s: a zero scale still gets its gradient
    run_case(21, 18, 3, exclude="diagonal", scale=("tensor", 0.0), bias=0.25)
    run_case(21, 18, 3, exclude="none", scale=("rows", 0.0))


def test_large_scale_unnormalised_values():
    # no fixed max shift: logits in the thousands stay exact to fp32 (values)
    x = features(23, 5, seed=31, normalize=False, scale=3.0)
    y = features(17, 5, seed=32, normalize=False, scale=3.0)
    row, col = ops.similarity_lse(x, y, 1000.0, exclude="diagonal", backend="triton")
    r_ref, c_ref = reference.similarity_lse(oracle(x), oracle(y), 1000.0, exclude="diagonal")
    assert float(r_ref.detach().abs().max()) > 1000.0
    assert_loss_close(row, r_ref, F32, "row LSE at scale 1000")
    assert_loss_close(col, c_ref, F32, "column LSE at scale 1000")


def test_large_scale_gradients():
    # scale 500 on unit vectors: logits up to ±500, every exponent shift exercised
    run_case(26, 31, 3, exclude="diagonal", scale=("tensor", 500.0), seed=41)


def test_fully_excluded_rows_and_columns():
    # rows whose label every y shares: −inf and zero gradient, no NaN anywhere
    x_labels = torch.tensor([0, 1, 0, 2, 0, 1, 2, 0, 0, 1, 2, 0, 1, 0, 0, 2, 1])
    y_labels = torch.zeros(20, dtype=torch.long)
    out, _ = run_case(17, 20, 3, exclude="same_label", x_labels=x_labels, y_labels=y_labels)
    assert torch.isinf(out[:17][x_labels == 0]).all() and torch.isfinite(out[17:]).all()
    # a single row with the diagonal excluded: column 0 has no allowed pair
    out, _ = run_case(1, 6, 4, exclude="diagonal")
    assert torch.isinf(out[1]) and torch.isfinite(out[0])
    out, _ = run_case(1, 1, 2, exclude="diagonal")
    assert torch.isinf(out).all()


@pytest.mark.parametrize("need", ["x", "y", "scale", "bias"])
def test_single_gradient(need):
    """Only one input requires grad: each owner pass alone, and the bias identity alone."""
    x = features(29, 3, seed=51, requires_grad=need == "x")
    y = features(22, 3, seed=52, requires_grad=need == "y")
    s = torch.tensor(2.0, requires_grad=need == "scale")
    b = torch.tensor(0.5, requires_grad=need == "bias")
    for det in (None, False):
        row, col = ops.similarity_lse(x, y, s, b, exclude="diagonal", backend="triton", deterministic=det)
        (g,) = torch.autograd.grad((row * torch.arange(29)).sum() + col.sum(), [dict(x=x, y=y, scale=s, bias=b)[need]])
        xo, yo, so, bo = oracle(x), oracle(y), oracle(s), oracle(b)
        r, c = reference.similarity_lse(xo, yo, so, bo, exclude="diagonal")
        (e,) = torch.autograd.grad((r * torch.arange(29)).sum() + c.sum(), [dict(x=xo, y=yo, scale=so, bias=bo)[need]])
        assert_grad_close(g, e, F32, f"d{need}")


def test_half_inputs():
    # fp16 operands into the MMA with fp32 accumulation; reference on the same rounded inputs.
    # (bf16 runs in the GPU script and the compile-only tests: the interpreter's tl.dot
    # multiplies bf16 bit patterns as integers.)
    x = features(21, 19, seed=61, dtype=torch.float16)
    y = features(18, 19, seed=62, dtype=torch.float16)

    def fast(x, y):
        return torch.cat(ops.similarity_lse(x, y, 5.0, exclude="diagonal", backend="triton"))

    def ref(x, y):
        return torch.cat(reference.similarity_lse(x, y, 5.0, exclude="diagonal"))

    out, _ = compare(fast, ref, [x, y], torch.float16, "similarity_lse fp16")
    assert out.dtype == F32


def test_tf32_precision_setting_is_followed():
    # "high" lets fp32 tiles use TF32 on GPUs; the interpreter computes exactly either way
    from mmloss.ops.triton._launch import dot_precision

    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert dot_precision(F32) == "tf32"
        run_case(17, 13, 3, exclude="diagonal")
        torch.set_float32_matmul_precision("highest")
        assert dot_precision(F32) == "ieee"
    finally:
        torch.set_float32_matmul_precision(prev)


def test_float64_is_refused():
    x = features(4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        ops.similarity_lse(x, x, 1.0, backend="triton")


@pytest.mark.parametrize("rows,cols", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("empty", ["row", "column"])
def test_saved_statistics_layout(rows, cols, empty):
    # the backend contract (issue 8, item 1): (row LSE, col LSE, row stats (2, N), col stats
    # (2, M)); stats[0] = max of t2 = log2(e)·s·⟨x, y⟩ over allowed pairs (no bias), stats[1] =
    # log2 Σ 2^(t2 − max); (−inf, −inf) for a row / column with no allowed pair
    from mmloss.ops import triton as backend
    from mmloss.ops._spec import PairSpec

    x = features(7, 3, seed=71, requires_grad=False)
    y = features(9, 3, seed=72, requires_grad=False)
    if empty == "row":   # x row 6 shares its label with every y
        x_labels, y_labels = torch.tensor([0, 1, 1, 2, 0, 1, 5]), torch.full((9,), 5)
    else:                # y row 8 shares its label with every x
        x_labels, y_labels = torch.full((7,), 5), torch.tensor([0, 1, 1, 2, 0, 1, 3, 4, 5])
    spec = PairSpec(x, y, torch.tensor(4.0), 0.0, torch.tensor(-0.5), 0.0, "same_label", 0, x_labels,
                    y_labels, 0, True)
    row, col, row_stats, col_stats, logits = backend.similarity_lse_forward(spec, rows, cols)
    assert logits.shape == (0,)  # the triton backend never keeps its logits
    ln2 = torch.log(torch.tensor(2.0, dtype=torch.float64))
    t2 = (x.double() @ y.double().T) * 4.0 / ln2
    allowed = x_labels[:, None] != y_labels[None, :]
    for on, lse, stats, axis, n in ((rows, row, row_stats, 1, 7), (cols, col, col_stats, 0, 9)):
        if not on:
            assert lse.shape == (0,) and stats.shape == (2, 0)
            continue
        assert lse.shape == (n,) and stats.shape == (2, n) and stats.dtype == F32
        masked = t2.masked_fill(~allowed, float("-inf"))
        some = allowed.any(dim=axis)
        m2 = masked.amax(dim=axis)
        lg2 = torch.log2(torch.exp2(masked - torch.where(some, m2, 0.0).unsqueeze(axis)).sum(dim=axis))
        assert bool((stats[:, ~some] == float("-inf")).all()) and bool((lse[~some] == float("-inf")).all())
        assert torch.allclose(stats[0][some].double(), m2[some], rtol=1e-6, atol=1e-6)
        assert torch.allclose(stats[1][some].double(), lg2[some], rtol=1e-5, atol=1e-6)
        assert torch.allclose(lse[some].double(), ((m2 + lg2) * ln2 - 0.5)[some], rtol=1e-6, atol=1e-6)
