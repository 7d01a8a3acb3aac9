"""HCL (docs/losses.md §12; mmloss/functional/hcl.py, mmloss/losses/hcl.py): closed forms, the
reduction to NT-Xent, the floor branch and bad hyperparameters. The tests run over every SSL loss
are in tests/test_ssl_common.py."""
from __future__ import annotations

import math

import pytest
import torch

import mmloss
from oracle import assert_grad_close, assert_loss_close
from ssl_helpers import check, closed_form_check, identical_rows, LOSSES, views

ref = mmloss.reference
F = mmloss.functional


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("beta,tau_plus", [(1.0, 0.1), (0.0, 0.0), (3.0, 0.6)])
def test_hcl_identical_rows_is_log_2n_minus_1(beta, tau_plus):
    """All negatives equal: E = e^{1/τ}, Ng = Ñ·e^{1/τ} whatever β, τ⁺: log(2N−1) as NT-Xent."""
    n = 5
    closed_form_check(lambda t, be: (F.hcl_loss(*t, 0.5, tau_plus, beta, backend=be) if be
                                      else ref.hcl_loss(*t, 0.5, tau_plus, beta)),
                       identical_rows(n, 3), math.log(2 * n - 1))


def test_hcl_with_beta_0_and_tau_plus_0_is_ntxent():
    out0, out1 = views(2, 13, 8, seed=31)
    hcl = F.hcl_loss(out0, out1, 0.4, 0.0, 0.0)
    ntx = F.ntxent_loss(out0, out1, 0.4)
    assert_loss_close(hcl, ntx.double(), torch.float32, logit_bound=1 / 0.4)
    for a, b in zip(torch.autograd.grad(hcl, [out0, out1]), torch.autograd.grad(ntx, [out0, out1])):
        assert_grad_close(a, b.double(), torch.float32)


def test_hcl_floor_branch():
    """Aligned positives and a large τ⁺: τ⁺·e^p exceeds E for every anchor, so Ng is the floor
    Ñ·e^{−1/τ} (docs/losses.md §12) and each term is softplus(log Ñ − 1/τ − p)."""
    n, tau, tau_plus, beta = 12, 0.5, 0.9, 1.0
    out0, out1 = views(2, n, 16, seed=32, noise=0.3)
    z0 = torch.nn.functional.normalize(out0.detach().double(), dim=1)
    z1 = torch.nn.functional.normalize(out1.detach().double(), dim=1)
    Z = torch.cat([z0, z1])
    L = Z @ Z.T / tau
    sample = torch.arange(n).repeat(2)
    negatives = L.masked_fill(sample[:, None] == sample[None, :], float("-inf"))
    log_e = torch.logsumexp((1 + beta) * negatives, 1) - torch.logsumexp(beta * negatives, 1)
    p = ((z0 * z1).sum(1) / tau).repeat(2)
    assert bool((math.log(tau_plus) + p > log_e).all()), "the inputs must put every anchor on the floor"
    check(LOSSES["hcl"], [out0, out1], torch.float32, temperature=tau, tau_plus=tau_plus, beta=beta)
    floor = torch.nn.functional.softplus(math.log(2 * n - 2) - 1 / tau - p).mean()
    assert_loss_close(F.hcl_loss(out0, out1, tau, tau_plus, beta), floor, torch.float32,
                      logit_bound=(1 + beta) / tau)


# ----------------------------------------------------------------------------- bad inputs (one test each)


def test_module_rejects_bad_temperature_at_construction():
    with pytest.raises(ValueError):
        mmloss.HardNegativeLoss(temperature=0.0)


def test_module_rejects_bad_tau_plus_at_construction():
    with pytest.raises(ValueError):
        mmloss.HardNegativeLoss(tau_plus=1.0)


@pytest.mark.parametrize("tau_plus", [1.0, -0.1])
def test_hcl_tau_plus_out_of_range(tau_plus):
    with pytest.raises(ValueError):
        F.hcl_loss(*views(2, 4, 3), tau_plus=tau_plus)


def test_hcl_negative_beta():
    with pytest.raises(ValueError):
        F.hcl_loss(*views(2, 4, 3), beta=-0.5)


def test_hcl_beta_not_a_number():
    with pytest.raises(TypeError):
        F.hcl_loss(*views(2, 4, 3), beta=torch.tensor(1.0))
