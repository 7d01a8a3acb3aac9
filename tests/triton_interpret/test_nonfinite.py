"""NaN/Inf propagation (issue 8, item 2) and the bfloat16 refusal (item 10) of the triton
backend under TRITON_INTERPRET=1.

Policy (docs/design.md): non-finite inputs propagate as torch propagates them — the float64
reference, which is plain torch, gives the expected pattern: a NaN feature makes NaN every LSE
whose row or column holds an allowed pair with it (an excluded pair hides it, as
``masked_fill(−inf)`` does), a +inf logit makes its LSE +inf (``torch.logsumexp``), and the
gradients are NaN where torch's are. Before: ``lse_from_stats`` mapped a NaN sum to −inf (the
"no allowed pair" sentinel, ``NaN > 0`` being false), ``clip_loss`` with one +inf feature
returned 3.95 and NaN rows of ``similarity_kl`` became 0.0 (a NaN-dropping clamp).
"""
import pytest
import torch

import mmloss
import mmloss.reference as reference
from mmloss import ops
from oracle import features, oracle

F32 = torch.float32
# numpy (the interpreter) warns on the inf − inf and NaN arithmetic these inputs are made of
# (RuntimeWarning: invalid value / overflow encountered, All-NaN slice)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _poisoned(n, d, seed, row, col, value):
    x = features(n, d, seed=seed, requires_grad=False)
    x[row, col] = value
    return x.requires_grad_(True)


def assert_same_pattern(actual, expected, what):
    """NaN where the reference has NaN, ±inf where it has ±inf, finite and close elsewhere."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, what
    for name, mask_a, mask_e in (("NaN", torch.isnan(a), torch.isnan(e)),
                                 ("+inf", a == float("inf"), e == float("inf")),
                                 ("-inf", a == float("-inf"), e == float("-inf"))):
        diff = mask_a != mask_e
        if bool(diff.any()):
            idx = tuple(int(i) for i in diff.nonzero()[0])
            raise AssertionError(f"{what}: {name} pattern differs at {idx}: actual {a[idx].item()}, "
                                 f"expected {e[idx].item()} ({int(diff.sum())} elements differ)")
    fin = torch.isfinite(e)
    err = (a - e).abs()[fin]
    scale = e[fin].abs().max() if bool(fin.any()) else torch.tensor(0.0)
    assert bool((err <= 1e-4 * scale + 1e-5).all()), f"{what}: finite entries differ by {float(err.max()):.3g}"


def _lse_case(x, y, exclude="diagonal", bias=None):
    s = torch.tensor(3.0, requires_grad=True)
    out = {}
    for name, cast, fn in (("fast", lambda t: t, lambda *a, **k: ops.similarity_lse(*a, backend="triton", **k)),
                           ("ref", oracle, reference.similarity_lse)):
        xx, yy, ss = cast(x), cast(y), cast(s)
        bb = None if bias is None else cast(bias)
        row, col = fn(xx, yy, ss, bb, exclude=exclude)
        leaves = [t for t in (xx, yy, ss, bb) if t is not None]
        grads = torch.autograd.grad((row * torch.arange(1, row.numel() + 1)).sum() + col.sum(), leaves)
        out[name] = (row, col) + tuple(grads)
    return out


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("exclude", ["none", "diagonal"])
def test_similarity_lse_non_finite_feature(value, exclude):
    x = _poisoned(21, 3, 1, 4, 1, value)
    y = features(18, 3, seed=2)
    out = _lse_case(x, y, exclude)
    for k, name in enumerate(("row LSE", "column LSE", "dx", "dy", "dscale")):
        assert_same_pattern(out["fast"][k], out["ref"][k], f"{name} (x[4, 1] = {value}, exclude={exclude})")
    if value != value:  # NaN: row 4 is NaN, not the −inf of a row with no allowed pair
        assert bool(torch.isnan(out["fast"][0][4]))


def test_similarity_lse_non_finite_bias():
    x, y = features(9, 3, seed=3), features(7, 3, seed=4)
    for value in (float("nan"), float("inf")):
        out = _lse_case(x, y, "diagonal", torch.tensor(value, requires_grad=True))
        for k, name in enumerate(("row LSE", "column LSE", "dx", "dy", "dscale", "dbias")):
            assert_same_pattern(out["fast"][k], out["ref"][k], f"{name} (bias = {value})")


def test_nan_in_a_fully_excluded_row_stays_hidden():
    # an excluded pair hides its NaN (masked_fill(−inf) in torch): a row whose every pair is
    # excluded stays −inf with a zero gradient, the other rows stay finite
    x = _poisoned(6, 3, 5, 2, 0, float("nan"))
    y = features(6, 3, seed=6)
    x_labels = torch.tensor([0, 1, 2, 1, 0, 1])
    y_labels = torch.tensor([2, 2, 2, 2, 2, 2])  # row 2 shares its label with every y
    s = torch.tensor(2.0, requires_grad=True)
    row, col = ops.similarity_lse(x, y, s, exclude="same_label", x_labels=x_labels, y_labels=y_labels,
                                  cols=True, backend="triton")
    r_ref, c_ref = reference.similarity_lse(oracle(x), oracle(y), oracle(s), exclude="same_label",
                                            x_labels=x_labels, y_labels=y_labels)
    assert row[2] == float("-inf")
    assert_same_pattern(row, r_ref, "rows")
    assert_same_pattern(col, c_ref, "columns")


def test_clip_loss_with_an_infinite_feature_is_not_finite():
    # issue 8: 3.95 before (torch: nan)
    for value in (float("inf"), float("nan")):
        x = _poisoned(8, 4, 7, 3, 2, value)
        y = features(8, 4, seed=8)
        xo, yo = oracle(x), oracle(y)
        fast = mmloss.clip_loss(x, y, 10.0, backend="triton")
        ref = reference.clip_loss(xo, yo, 10.0)
        assert not bool(torch.isfinite(ref))
        assert_same_pattern(fast, ref, f"clip_loss with x[3, 2] = {value}")
        for g, g_ref, name in zip(torch.autograd.grad(fast, [x, y]), torch.autograd.grad(ref, [xo, yo]), "xy"):
            assert_same_pattern(g, g_ref, f"clip_loss d{name} with x[3, 2] = {value}")


@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("cross_entropy", [False, True])
def test_similarity_kl_nan_rows(where, cross_entropy):
    # issue 8: NaN rows became 0.0
    x_s = _poisoned(13, 3, 9, 5, 1, float("nan")) if where == "student" else features(13, 3, seed=9)
    y_s = features(11, 3, seed=10)
    x_t = features(13, 4, seed=11, requires_grad=False)
    if where == "teacher":
        x_t[5, 2] = float("nan")
    y_t = features(11, 4, seed=12, requires_grad=False)
    s = torch.tensor(4.0, requires_grad=True)
    out = {}
    for name, cast, fn in (("fast", lambda t: t, lambda *a, **k: ops.similarity_kl(*a, backend="triton", **k)),
                           ("ref", oracle, reference.similarity_kl)):
        xs, ys, ss = cast(x_s), cast(y_s), cast(s)
        row, col = fn(xs, ys, cast(x_t), cast(y_t), ss, 6.0, cross_entropy=cross_entropy)
        grads = torch.autograd.grad(row.sum() + (col * 0.5).sum(), [xs, ys, ss])
        out[name] = (row, col) + tuple(grads)
    assert bool(torch.isnan(out["fast"][0][5]))
    for k, name in enumerate(("rows", "columns", "dx_s", "dy_s", "dscale_s")):
        assert_same_pattern(out["fast"][k], out["ref"][k], f"{name} (NaN in the {where}, ce={cross_entropy})")


def test_siglip_loss_nan_propagates():
    x = _poisoned(8, 4, 13, 2, 3, float("nan"))
    y = features(8, 4, seed=14)
    fast = mmloss.siglip_loss(x, y, 10.0, -5.0, backend="triton")
    assert bool(torch.isnan(fast))
    (g,) = torch.autograd.grad(fast, [x])
    assert bool(torch.isnan(g[2]).all())


# ----------------------------------------------------------------------------- bfloat16


@pytest.mark.parametrize("call", ["similarity_lse", "pairwise_sigmoid", "similarity_kl", "clip_loss"])
def test_bfloat16_is_refused_under_the_interpreter(call):
    # issue 8, item 10: the interpreter's tl.dot multiplies bfloat16 bit patterns as integers
    # (results 1e11–1e13× off); refuse rather than return garbage
    x = features(6, 3, seed=15, dtype=torch.bfloat16)
    y = features(5, 3, seed=16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"bfloat16.*TRITON_INTERPRET=1"):
        if call == "similarity_lse":
            ops.similarity_lse(x, y, 2.0, backend="triton")
        elif call == "pairwise_sigmoid":
            ops.pairwise_sigmoid(x, y, 2.0, positives="none", backend="triton")
        elif call == "similarity_kl":
            ops.similarity_kl(x, y, x.float(), y.float(), 2.0, 3.0, backend="triton")
        else:
            mmloss.clip_loss(x, x, 2.0, backend="triton")
