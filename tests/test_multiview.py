"""MV-InfoNCE / MV-DHEL (docs/losses.md §8; mmloss/functional/multiview.py,
mmloss/losses/multiview.py): input forms, closed forms, symmetries, M = 1 and bad view lists.
The tests run over every SSL loss are in tests/test_ssl_common.py."""
from __future__ import annotations

import math

import pytest
import torch

import mmloss
from oracle import assert_loss_close, compare, oracle
from ssl_helpers import closed_form_check, identical_rows, logit_bound_of, LOSSES, views

ref = mmloss.reference
F = mmloss.functional


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("kind", ["list", "tuple", "stacked"])
@pytest.mark.parametrize("name", ["mv_infonce", "mv_dhel"])
def test_multiview_input_forms(name, kind):
    parts = views(4, 6, 5, seed=9, stacked=(kind == "stacked"))
    inputs = [parts] if kind == "stacked" else parts
    fast = LOSSES[name].fast
    reference = LOSSES[name].reference

    def pack(*t):
        return t[0] if kind == "stacked" else (list(t) if kind == "list" else tuple(t))

    compare(lambda *t: fast(pack(*t), backend="torch"), lambda *t: reference(pack(*t)), inputs,
            torch.float32, what=name, logit_bound=logit_bound_of(name))


def test_multiview_promotes_mixed_dtypes():
    a, b = views(2, 5, 4, seed=1)
    out = F.mv_infonce_loss([a.to(torch.float16), b], backend="torch")
    expected = ref.mv_infonce_loss([oracle(a.to(torch.float16)), oracle(b)])
    assert out.dtype == torch.float32
    assert_loss_close(out, expected, torch.float32, logit_bound=logit_bound_of("mv_infonce"))


@pytest.mark.parametrize("same_view_negatives", [True, False])
def test_mv_infonce_identical_rows(same_view_negatives):
    """True: log(V(VM−1)) − log(V(V−1)); False: the inner LSE has (V−1)M logits: log M."""
    v, m = 3, 4
    expected = math.log((v * m - 1) / (v - 1)) if same_view_negatives else math.log(m)
    closed_form_check(lambda t, be: (F.mv_infonce_loss(t, 0.25, same_view_negatives, backend=be) if be
                                      else ref.mv_infonce_loss(t, 0.25, same_view_negatives)),
                       identical_rows(m, 3, v=v), expected)


def test_mv_dhel_identical_rows():
    """Σ_l (1/τ + log(M−1)) − (1/τ + log(V(V−1)/2))."""
    v, m, tau = 4, 5, 0.25
    expected = v * (1 / tau + math.log(m - 1)) - (1 / tau + math.log(v * (v - 1) / 2))
    closed_form_check(lambda t, be: F.mv_dhel_loss(t, tau, backend=be) if be else ref.mv_dhel_loss(t, tau),
                       identical_rows(m, 3, v=v), expected)


@pytest.mark.parametrize("name", ["mv_infonce", "mv_dhel"])
def test_permuting_views_and_instances_is_a_symmetry(name):
    (u,) = LOSSES[name].build(8, 5, seed=23)
    fast = LOSSES[name].fast
    permuted = u.detach()[[2, 0, 1]][:, torch.randperm(8, generator=torch.Generator().manual_seed(0))]
    assert_loss_close(fast(u, backend="torch"), fast(permuted, backend="torch").double(), torch.float32,
                      logit_bound=logit_bound_of(name))


def test_mv_infonce_two_views_is_not_ntxent():
    """docs/losses.md §8: with V = 2 both anchors of an instance share one log."""
    out0, out1 = views(2, 9, 6, seed=38)
    with torch.no_grad():
        mv = F.mv_infonce_loss([out0, out1], 0.5)
        ntx = F.ntxent_loss(out0, out1, 0.5)
    assert abs(float(mv) - float(ntx)) > 1e-3


@pytest.mark.parametrize("same_view_negatives", [True, False])
def test_mv_infonce_single_instance_is_zero(same_view_negatives):
    """M = 1: the normaliser holds only the instance's other views, LSE_l LSE_{m≠l} = LSE_{l≠m},
    so the loss is identically 0 (no error, like NT-Xent at N = 1); its gradient vanishes."""
    (u,) = LOSSES["mv_infonce"].build(1, 6, seed=42)
    loss = F.mv_infonce_loss(u, 0.1, same_view_negatives, backend="torch")
    assert abs(float(loss.detach())) <= 1e-6
    assert float(torch.autograd.grad(loss, [u])[0].abs().max()) <= 1e-5
    assert abs(float(ref.mv_infonce_loss(oracle(u), 0.1, same_view_negatives).detach())) <= 1e-12


# ----------------------------------------------------------------------------- bad inputs (one test each)


def test_multiview_list_check_finite_names_the_view():
    parts = [t.detach() for t in views(3, 5, 4, seed=95)]
    parts[2][1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"views\[2\]"):
        F.mv_dhel_loss(parts, check_finite=True)


@pytest.mark.parametrize("name", ["mv_infonce", "mv_dhel"])
def test_multiview_single_view(name):
    with pytest.raises(ValueError):
        LOSSES[name].fast(torch.randn(1, 5, 3))


@pytest.mark.parametrize("name", ["mv_infonce", "mv_dhel"])
def test_multiview_2d_tensor(name):
    with pytest.raises(ValueError):
        LOSSES[name].fast(torch.randn(5, 3))


@pytest.mark.parametrize("name", ["mv_infonce", "mv_dhel"])
def test_multiview_list_of_mismatched_views(name):
    with pytest.raises(ValueError):
        LOSSES[name].fast([torch.randn(5, 3), torch.randn(4, 3)])


@pytest.mark.parametrize("name", ["mv_infonce", "mv_dhel"])
def test_multiview_views_of_wrong_type(name):
    with pytest.raises(TypeError):
        LOSSES[name].fast({"a": torch.randn(5, 3)})


def test_mv_infonce_same_view_negatives_not_bool():
    with pytest.raises(TypeError):
        F.mv_infonce_loss(torch.randn(2, 5, 3), same_view_negatives="yes")
