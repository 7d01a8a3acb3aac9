"""DCL / DCLW (docs/losses.md §6; mmloss/functional/dcl.py, mmloss/losses/dcl.py): closed forms,
lightly's ``weight_fn`` and values. The tests run over every SSL loss are in tests/test_ssl_common.py."""
from __future__ import annotations

import math

import pytest
import torch

import mmloss
from oracle import assert_grad_close, assert_loss_close, oracle
from ssl_helpers import (
    check, closed_form_check, identical_rows, lightly_file, logit_bound_of, LOSSES, views,
    weights_by_distance,
)

ref = mmloss.reference
F = mmloss.functional


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("n", [2, 9])
def test_dcl_identical_rows_is_log_2n_minus_2(n):
    """The positive leaves the normaliser: −1/τ + (1/τ + log(2N−2)); DCLW's weights are all 1."""
    for fast, slow in ((F.dcl_loss, ref.dcl_loss), (F.dclw_loss, ref.dclw_loss)):
        closed_form_check(lambda t, be: fast(*t, 0.2, backend=be) if be else slow(*t, 0.2),
                           identical_rows(n, 4), math.log(2 * n - 2))


def test_dcl_weight_fn_is_called_like_lightly():
    """weight_fn(a, b) gets the normalised anchor view first; its output multiplies the
    positive term of that view's anchors (and may carry a gradient)."""
    calls = []

    def weight_fn(a, b):
        calls.append((a.detach().clone(), b.detach().clone()))
        return 1.0 + (a * b).sum(1)

    out0, out1 = views(2, 7, 5, seed=37)
    check(LOSSES["dcl"], [out0, out1], torch.float32, weight_fn=weight_fn)
    u0 = torch.nn.functional.normalize(out0.detach(), dim=1)
    u1 = torch.nn.functional.normalize(out1.detach(), dim=1)
    torch.testing.assert_close(calls[0][0], u0)
    torch.testing.assert_close(calls[0][1], u1)
    torch.testing.assert_close(calls[1][0], u1)
    torch.testing.assert_close(calls[1][1], u0)
    scalar = F.dcl_loss(out0, out1, weight_fn=lambda a, b: 2.0)
    assert_loss_close(scalar, ref.dcl_loss(oracle(out0), oracle(out1), weight_fn=lambda a, b: 2.0),
                      torch.float32, logit_bound=2 * logit_bound_of("dcl"))


# ----------------------------------------------------------------------------- peers


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")
def test_lightly_dcl_and_dclw():
    lightly = lightly_file("loss/dcl_loss.py", "_mmloss_tests_lightly_dcl")
    out0, out1 = views(2, 10, 8, seed=51)
    cases = [  # (lightly, ours, L: 1/τ, times the largest weight; DCLW's weights are < 2)
        (lightly.DCLLoss(temperature=0.2), lambda a, b: F.dcl_loss(a, b, 0.2), 1 / 0.2),
        (lightly.DCLLoss(), lambda a, b: mmloss.DCLLoss()(a, b), 1 / 0.1),
        (lightly.DCLLoss(0.3, weight_fn=weights_by_distance),
         lambda a, b: F.dcl_loss(a, b, 0.3, weights_by_distance), 4 / 0.3),
        (lightly.DCLWLoss(temperature=0.2, sigma=0.7), lambda a, b: F.dclw_loss(a, b, 0.2, 0.7), 2 / 0.2),
        (lightly.DCLWLoss(), lambda a, b: mmloss.DCLWLoss()(a, b), 2 / 0.1),
    ]
    for theirs, ours, bound in cases:
        a0, a1 = out0.detach().double().requires_grad_(), out1.detach().double().requires_grad_()
        expected = theirs(a0, a1)
        got = ours(out0, out1)
        assert_loss_close(got, expected, torch.float32, logit_bound=bound)
        for g, e in zip(torch.autograd.grad(got, [out0, out1]), torch.autograd.grad(expected, [a0, a1])):
            assert_grad_close(g, e, torch.float32)


# ----------------------------------------------------------------------------- bad inputs (one test each)


def test_module_rejects_non_callable_weight_fn():
    with pytest.raises(TypeError):
        mmloss.DCLLoss(weight_fn=3)


def test_dcl_weight_fn_not_callable():
    with pytest.raises(TypeError):
        F.dcl_loss(*views(2, 4, 3), weight_fn="uniform")


def test_dcl_weight_fn_of_wrong_shape():
    with pytest.raises(ValueError):
        F.dcl_loss(*views(2, 4, 3), weight_fn=lambda a, b: torch.ones(5))


def test_dcl_weight_fn_returning_a_non_tensor():
    with pytest.raises(TypeError):
        F.dcl_loss(*views(2, 4, 3), weight_fn=lambda a, b: "heavy")


def test_dclw_bad_sigma():
    with pytest.raises(ValueError):
        F.dclw_loss(*views(2, 4, 3), sigma=0.0)


def test_gather_distributed_is_lightlys_flag():
    """Issue 10: DCLLoss(temperature, weight_fn, gather_distributed) and DCLWLoss(temperature,
    sigma, gather_distributed) take lightly's positional flag; True is distributed="auto" (the
    local loss in a single process, bit for bit). The gathered loss: tests/distributed/cases_ssl.py."""
    out0, out1 = views(2, 6, 4, seed=41)
    dcl = mmloss.DCLLoss(0.2, weights_by_distance, True)
    dclw = mmloss.DCLWLoss(0.2, 0.7, True)
    for module in (dcl, dclw):
        assert module.gather_distributed is True and module.distributed == "auto"
    assert mmloss.DCLLoss().gather_distributed is False and mmloss.DCLWLoss().distributed is None
    assert torch.equal(dcl(out0, out1), F.dcl_loss(out0, out1, 0.2, weights_by_distance))
    assert torch.equal(dclw(out0, out1), F.dclw_loss(out0, out1, 0.2, 0.7))
    with pytest.raises(TypeError, match="gather_distributed"):
        mmloss.DCLWLoss(gather_distributed="yes")
