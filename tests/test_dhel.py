"""DHEL (docs/losses.md §7; mmloss/functional/dhel.py, mmloss/losses/dhel.py): closed forms and
``include_augs``. The tests run over every SSL loss are in tests/test_ssl_common.py."""
from __future__ import annotations

import math

import pytest
import torch

import mmloss
from ssl_helpers import closed_form_check, identical_rows, views

ref = mmloss.reference
F = mmloss.functional


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("include_augs", [True, False])
def test_dhel_identical_rows(include_augs):
    """log(N−1) from the anchors' view; include_augs adds LSE over N−1 logits 1/τ."""
    n, tau = 6, 0.3
    expected = math.log(n - 1) + (1 / tau + math.log(n - 1) if include_augs else 0.0)
    closed_form_check(lambda t, be: (F.dhel_loss(*t, tau, include_augs, backend=be) if be
                                      else ref.dhel_loss(*t, tau, include_augs)),
                       identical_rows(n, 3), expected)


def test_dhel_without_augs_is_not_symmetric():
    out0, out1 = views(2, 10, 6, seed=22)
    with torch.no_grad():
        a = F.dhel_loss(out0, out1, include_augs=False)
        b = F.dhel_loss(out1, out0, include_augs=False)
    assert abs(float(a) - float(b)) > 1e-3


# ----------------------------------------------------------------------------- bad inputs


def test_dhel_include_augs_not_bool():
    with pytest.raises(TypeError):
        F.dhel_loss(*views(2, 4, 3), include_augs=1)
