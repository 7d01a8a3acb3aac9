"""pairwise_sigmoid (per-row and summed) on the triton backend under TRITON_INTERPRET=1."""
import pytest
import torch

import mmloss.reference as reference
from mmloss import ops
from oracle import assert_grad_close, assert_loss_close, compare, features, oracle

F32 = torch.float32


def _labels(n: int, classes: int, seed: int):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def _scale(kind, value, n, seed):
    if kind == "float":
        return value
    if kind == "tensor":
        return torch.tensor(value, dtype=F32, requires_grad=True)
    g = torch.Generator().manual_seed(seed + 7)
    return (value * (0.5 + torch.rand(n, generator=g, dtype=torch.float64))).to(F32).requires_grad_(True)


def run_case(n, m, d, *, positives="diagonal", offset=0, x_labels=None, y_labels=None, reduction="none",
             scale=("tensor", 4.0), bias=-2.0, seed=0, noncontig=False, deterministic=None,
             normalize=True, feature_scale=1.0):
    x = features(n, d, seed=seed, noncontig=noncontig, normalize=normalize, scale=feature_scale)
    y = features(m, d, seed=seed + 1, noncontig=noncontig, normalize=normalize, scale=feature_scale)
    s = _scale(scale[0], scale[1], n, seed)
    b = None if bias is None else torch.tensor(bias, dtype=F32, requires_grad=True)
    kw = dict(positives=positives, offset=offset, x_labels=x_labels, y_labels=y_labels)

    def fast(x, y, s, b):
        return ops.pairwise_sigmoid(x, y, s, b, backend="triton", deterministic=deterministic,
                                    reduction=reduction, **kw)

    def ref(x, y, s, b):
        rows = reference.pairwise_sigmoid(x, y, s, b, **kw)
        return rows.sum() if reduction == "sum" else rows

    weights = None
    if reduction == "none":
        weights = 0.5 + torch.rand(n, generator=torch.Generator().manual_seed(seed + 3), dtype=torch.float64)
    return compare(fast, ref, [x, y, s, b], F32, f"pairwise_sigmoid[{reduction}]", weights=weights)


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("positives,offset", [("diagonal", 0), ("diagonal", 2), ("diagonal", -3), ("none", 0)])
def test_positives(positives, offset, reduction):
    run_case(31, 27, 3, positives=positives, offset=offset, reduction=reduction, seed=abs(offset) + 1)


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("deterministic", [None, False])
def test_same_label(reduction, deterministic):
    run_case(33, 26, 5, positives="same_label", x_labels=_labels(33, 3, 1), y_labels=_labels(26, 3, 2),
             reduction=reduction, deterministic=deterministic)


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (1, 7, 3), (70, 3, 1), (18, 37, 67), (4, 70, 20)])
def test_ragged_shapes(n, m, d, reduction):
    run_case(n, m, d, reduction=reduction, seed=n + m + d)


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("deterministic", [None, False])
def test_every_option_at_once(reduction, deterministic):
    run_case(34, 25, 67, positives="same_label", x_labels=_labels(34, 4, 5), y_labels=_labels(25, 4, 6),
             scale=("rows", 8.0), bias=-3.0, noncontig=True, deterministic=deterministic,
             reduction=reduction, seed=12)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_scalar_and_zero_scale(reduction):
    run_case(19, 22, 3, scale=("float", 10.0), bias=None, reduction=reduction)
    run_case(19, 22, 3, scale=("tensor", 0.0), bias=1.0, reduction=reduction)


def test_large_scale_unnormalised():
    # |L| in the hundreds: softplus/sigmoid saturate without overflow or lost small terms
    run_case(23, 19, 4, scale=("tensor", 50.0), bias=-10.0, normalize=False, feature_scale=2.0)
    run_case(23, 19, 4, scale=("tensor", 1000.0), bias=0.0, reduction="sum", seed=3)


def test_tiny_terms_keep_relative_precision():
    # every negative far below zero: each term ≈ e^L (1e-7 … 1e-4) must not round to 0
    x = features(9, 3, seed=71)
    y = features(11, 3, seed=72)
    out = ops.pairwise_sigmoid(x, y, 3.0, -12.0, positives="none", backend="triton")
    ref = reference.pairwise_sigmoid(oracle(x), oracle(y), 3.0, -12.0, positives="none")
    assert float(ref.detach().max()) < 1e-3
    assert_loss_close(out, ref, F32, "tiny softplus sums")


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("need", ["x", "y", "scale", "bias"])
def test_single_gradient(need, reduction):
    x = features(24, 3, seed=81, requires_grad=need == "x")
    y = features(20, 3, seed=82, requires_grad=need == "y")
    s = torch.tensor(5.0, requires_grad=need == "scale")
    b = torch.tensor(-1.0, requires_grad=need == "bias")
    w = torch.arange(24, dtype=F32) if reduction == "none" else torch.tensor(1.5)
    for det in (None, False):
        out = ops.pairwise_sigmoid(x, y, s, b, backend="triton", deterministic=det, reduction=reduction)
        (g,) = torch.autograd.grad((out * w).sum(), [dict(x=x, y=y, scale=s, bias=b)[need]])
        xo, yo, so, bo = oracle(x), oracle(y), oracle(s), oracle(b)
        ref = reference.pairwise_sigmoid(xo, yo, so, bo)
        ref = ref.sum() if reduction == "sum" else ref
        (e,) = torch.autograd.grad((ref * w.double()).sum(), [dict(x=xo, y=yo, scale=so, bias=bo)[need]])
        assert_grad_close(g, e, F32, f"d{need}")


def test_sum_without_gradients_is_forward_only():
    x = features(15, 6, seed=91, requires_grad=False)
    y = features(12, 6, seed=92, requires_grad=False)
    with torch.no_grad():
        total = ops.pairwise_sigmoid(x, y, 4.0, -2.0, backend="triton", reduction="sum")
    ref = reference.pairwise_sigmoid(oracle(x), oracle(y), 4.0, -2.0).sum()
    assert total.dim() == 0 and total.dtype == F32
    assert_loss_close(total, ref, F32, "no-grad total")


def test_half_inputs():
    x = features(17, 21, seed=95, dtype=torch.float16)
    y = features(19, 21, seed=96, dtype=torch.float16)
    b = torch.tensor(-3.0, requires_grad=True)

    def fast(x, y, b):
        return ops.pairwise_sigmoid(x, y, 6.0, b, backend="triton")

    def ref(x, y, b):
        return reference.pairwise_sigmoid(x, y, 6.0, b)

    out, _ = compare(fast, ref, [x, y, b], torch.float16, "pairwise_sigmoid fp16")
    assert out.dtype == F32


def test_float64_is_refused():
    x = features(4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        ops.pairwise_sigmoid(x, x, 1.0, backend="triton")
