"""The test oracle's own rules (tests/oracle.py, docs/design.md "Testing rules"): the logit-aware fp32
bound, failure messages that name the element that failed, and ``logit_bound``."""
from __future__ import annotations

import math

import pytest
import torch

from oracle import assert_grad_close, assert_loss_close, compare, hypothesis_examples, logit_bound

F64, F32 = torch.float64, torch.float32


def test_fp32_bound_is_relative_plus_logit_term():
    """err ≤ 1e-5·|ref| + 1e-6·L: the AMD-vs-Intel case of issue 8 (scale 100 on unit rows) passes
    with its L, and an error just past the bound fails."""
    ref = torch.tensor([0.01901385], dtype=F64)
    assert_loss_close(torch.tensor([0.01901347]), ref, F32, logit_bound=100.0)
    bound = 1e-5 * 2.0 + 1e-6 * 100.0
    assert_loss_close(torch.tensor([2.0 + 0.99 * bound], dtype=F64), torch.tensor([2.0], dtype=F64), F32,
                      logit_bound=100.0)
    with pytest.raises(AssertionError, match="1 of 1 elements fail"):
        assert_loss_close(torch.tensor([2.0 + 1.01 * bound], dtype=F64), torch.tensor([2.0], dtype=F64), F32,
                          logit_bound=100.0)


def test_default_logit_bound_is_unit_scale():
    """Without logit_bound the rule is 1e-5·|ref| + 1e-6 (unit features at scale ~1)."""
    ref = torch.tensor([0.0, 1.0], dtype=F64)
    assert_loss_close(ref + torch.tensor([0.9e-6, 10.9e-6], dtype=F64), ref, F32)
    with pytest.raises(AssertionError):
        assert_loss_close(ref + torch.tensor([1.1e-6, 0.0], dtype=F64), ref, F32)


def test_half_bound():
    ref = torch.tensor([3.0], dtype=F64)
    bound = 1e-4 * 3.0 + 1e-6 * 50.0
    assert_loss_close(ref + 0.99 * bound, ref, torch.bfloat16, logit_bound=50.0)
    with pytest.raises(AssertionError):
        assert_loss_close(ref + 1.01 * bound, ref, torch.float16, logit_bound=50.0)


def test_fp64_rule_unchanged():
    ref = torch.tensor([1.0], dtype=F64)
    assert_loss_close(ref + 0.99e-10, ref, F64, logit_bound=1e6)
    with pytest.raises(AssertionError):
        assert_loss_close(ref + 2e-10, ref, F64, logit_bound=1e6)


def test_failure_names_the_failing_element_not_the_largest_difference():
    """Element 0 has the largest difference but passes (large ref); element 2 fails."""
    expected = torch.tensor([130.9767728, 5.0, 0.0190138], dtype=F64)
    actual = expected + torch.tensor([3e-4, 0.0, 5e-6], dtype=F64)
    with pytest.raises(AssertionError) as info:
        assert_loss_close(actual, expected, F32, "kl")
    message = str(info.value)
    assert "element (2,)" in message and "0.0190138" in message, message
    assert "130.97" not in message, message
    assert "bound" in message and "error 5e-06" in message, message
    assert "1 of 3 elements fail" in message, message


def test_failure_picks_the_worst_ratio_among_failures():
    expected = torch.tensor([[1.0, 100.0], [0.0, 10.0]], dtype=F64)
    actual = expected + torch.tensor([[3e-5, 3e-3], [2e-6, 0.0]], dtype=F64)
    # bounds 1.1e-5, 1.001e-3, 1e-6: ratios 2.7, 3.0, 2.0 -> element (0, 1)
    with pytest.raises(AssertionError, match=r"element \(0, 1\)"):
        assert_loss_close(actual, expected, F32)


def test_non_finite_entries_must_match():
    nan, inf = math.nan, math.inf
    assert_loss_close(torch.tensor([nan, -inf, 1.0]), torch.tensor([nan, -inf, 1.0], dtype=F64), F32)
    with pytest.raises(AssertionError, match=r"finiteness differs at element \(1,\)"):
        assert_loss_close(torch.tensor([nan, 3.0]), torch.tensor([nan, inf], dtype=F64), F32)
    with pytest.raises(AssertionError, match=r"element \(0,\)"):
        assert_loss_close(torch.tensor([inf]), torch.tensor([-inf], dtype=F64), F32)


def test_bad_logit_bound_raises():
    with pytest.raises(ValueError, match="logit_bound"):
        assert_loss_close(torch.ones(1), torch.ones(1, dtype=F64), F32, logit_bound=math.inf)


def test_grad_failure_message_names_the_element():
    expected = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    with pytest.raises(AssertionError, match=r"element \(1,\): actual -2\.09"):
        assert_grad_close(torch.tensor([1.0, -2.1, 0.5]), expected, F32)


def test_logit_bound_scale_forms():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=g), torch.randn(4, 3, generator=g)
    nx, ny = x.norm(dim=1), y.norm(dim=1)
    want = 2.5 * float(nx.max()) * float(ny.max())
    assert logit_bound(x, y, 2.5) == pytest.approx(want)
    assert logit_bound(x, y, torch.tensor(-2.5, requires_grad=True)) == pytest.approx(want)
    assert logit_bound(x, y, 2.5, -3.0) == pytest.approx(want + 3.0)
    assert logit_bound(x, y, 2.5, torch.tensor(3.0)) == pytest.approx(want + 3.0)
    per_row = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert logit_bound(x, y, per_row) == pytest.approx(float((per_row * nx).max()) * float(ny.max()))
    # every logit is within the bound
    logits = per_row[:, None] * (x @ y.T) - 3.0
    assert float(logits.abs().max()) <= logit_bound(x, y, per_row, -3.0) + 1e-6


def test_logit_bound_ignores_non_finite_entries():
    x = torch.tensor([[3.0, 4.0], [math.nan, 0.0]])
    y = torch.tensor([[1.0, 0.0], [math.inf, 0.0]])
    assert logit_bound(x, y, 2.0) == pytest.approx(10.0)


def test_compare_passes_logit_bound_on():
    """compare applies the logit term: a path off by 2e-6 on a tiny loss at L = 10 passes there
    and fails at the default L = 1."""
    def ref(x):
        return x * 1e-3

    def fast(x):
        return (x * 1e-3 + 2e-6).float()

    x = torch.tensor([1.0], dtype=F64)
    compare(fast, ref, [x], F32, logit_bound=10.0)
    with pytest.raises(AssertionError):
        compare(fast, ref, [x], F32)


def test_hypothesis_examples_environment(monkeypatch):
    monkeypatch.delenv("MMLOSS_HYPOTHESIS_EXAMPLES", raising=False)
    assert hypothesis_examples(30) == 30
    monkeypatch.setenv("MMLOSS_HYPOTHESIS_EXAMPLES", "500")
    assert hypothesis_examples(30) == 500
    monkeypatch.setenv("MMLOSS_HYPOTHESIS_EXAMPLES", "many")
    with pytest.raises(ValueError, match="MMLOSS_HYPOTHESIS_EXAMPLES"):
        hypothesis_examples(30)
