"""Acceptance tests of the self-supervised family (docs/losses.md §4 NT-Xent, §5 SupCon, §6 DCL/DCLW,
§7 DHEL, §8 MV-InfoNCE / MV-DHEL, §12 HCL): functions, modules and dense references.

Every fast backend is compared with the float64 reference on the same (rounded) inputs, values and
gradients, with docs/design.md's tolerances (tests/oracle.py). Closed forms of degenerate inputs check
the reference and the fast path independently of each other; pytorch-metric-learning and lightly
are compared where they are installed. Inputs are *not* unit rows: every loss normalises inside.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re

import pytest
import torch

import mmloss
from _foundation_helpers import backend_param, upstream
from memtrack import grad_bytes, peak_bytes_above_start
from oracle import assert_grad_close, assert_loss_close, compare, oracle

ref = mmloss.reference
F = mmloss.functional

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


# ----------------------------------------------------------------------------- inputs


def _noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in reversed-dimension storage order (a strided, non-contiguous leaf)."""
    dims = list(range(t.dim()))
    out = t.permute(*dims[::-1]).contiguous().permute(*dims[::-1])
    assert not out.is_contiguous()
    return out


def views(v: int, n: int, d: int, *, dtype=torch.float32, seed: int = 0, noise: float = 0.7,
          stacked: bool = False, noncontig: bool = False):
    """V correlated views of n instances (base + noise), rows of random length in [0.3, 3]:
    a list of V (n, d) leaves, or one (V, n, d) leaf with ``stacked``."""
    g = torch.Generator().manual_seed(1000 + seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    parts = []
    for _ in range(v):
        t = base + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
        t = t * (0.3 + 2.7 * torch.rand(n, 1, generator=g, dtype=torch.float64))
        parts.append(t)
    if stacked:
        t = torch.stack(parts).to(dtype)
        return (_noncontiguous(t) if noncontig and n > 1 else t).requires_grad_()
    out = []
    for t in parts:
        t = t.to(dtype)
        out.append((_noncontiguous(t) if noncontig and n > 1 and d > 1 else t).requires_grad_())
    return out


def identical_rows(n: int, d: int, *, v: int = 2, dtype=torch.float64):
    """V views whose every row is the same direction, with different lengths."""
    direction = torch.nn.functional.normalize(torch.arange(1.0, d + 1, dtype=torch.float64), dim=0)
    lengths = torch.linspace(0.5, 4.0, n * v, dtype=torch.float64).reshape(v, n, 1)
    return [(lengths[k] * direction).to(dtype).requires_grad_() for k in range(v)]


# ----------------------------------------------------------------------------- the loss table
#
# Each entry: how to build inputs (a list of tensors) and how to call the fast function and the
# reference on them, with optional non-default options.


def _supcon2d_labels(n: int) -> torch.Tensor:
    return torch.arange(n) % max(2, n // 3)   # classes of ~3 rows; every class has negatives


class Loss:
    def __init__(self, name, build, fast, reference, options=None, min_rows=2):
        self.name, self.build, self.fast, self.reference = name, build, fast, reference
        self.options = options or {}
        self.min_rows = min_rows

    def run(self, inputs, backend, **opts):
        return self.fast(*inputs, backend=backend, **opts)

    def oracle(self, inputs, **opts):
        return self.reference(*inputs, **opts)


def _two(n, d, dtype=torch.float32, seed=0, noncontig=False):
    return views(2, n, d, dtype=dtype, seed=seed, noncontig=noncontig)


def _supcon3d(n, d, dtype=torch.float32, seed=0, noncontig=False):
    """(B, 3, D): three views per sample, built as (V, B, D) and transposed."""
    t = views(3, n, d, dtype=dtype, seed=seed, stacked=True, noncontig=False).detach()
    t = t.transpose(0, 1)
    return [(t if noncontig else t.contiguous()).requires_grad_()]


def _supcon2d(n, d, dtype=torch.float32, seed=0, noncontig=False):
    return views(1, n, d, dtype=dtype, seed=seed, noncontig=noncontig)


def _stacked3(n, d, dtype=torch.float32, seed=0, noncontig=False):
    return [views(3, n, d, dtype=dtype, seed=seed, stacked=True, noncontig=noncontig)]


def _weights_by_distance(a, b):
    """A user weight_fn as in lightly's docstring example."""
    return torch.sum((a - b) ** 2, dim=1)


LOSSES = {
    "ntxent": Loss("ntxent", _two, F.ntxent_loss, ref.ntxent_loss, {"temperature": 0.2}, min_rows=1),
    "supcon2d": Loss(
        "supcon2d", _supcon2d,
        lambda x, backend, **o: F.supcon_loss(x, _supcon2d_labels(x.shape[0]), backend=backend, **o),
        lambda x, **o: ref.supcon_loss(x, _supcon2d_labels(x.shape[0]), **o),
        {"temperature": 0.3, "base_temperature": 0.07}, min_rows=1),
    "supcon3d": Loss(
        "supcon3d", _supcon3d,
        lambda x, backend, **o: F.supcon_loss(x, backend=backend, **o),
        lambda x, **o: ref.supcon_loss(x, **o),
        {"temperature": 0.3, "base_temperature": 0.07}, min_rows=1),
    "dcl": Loss("dcl", _two, F.dcl_loss, ref.dcl_loss,
                {"temperature": 0.3, "weight_fn": _weights_by_distance}),
    "dclw": Loss("dclw", _two, F.dclw_loss, ref.dclw_loss, {"temperature": 0.3, "sigma": 0.8}),
    "dhel": Loss("dhel", _two, F.dhel_loss, ref.dhel_loss, {"temperature": 0.2, "include_augs": False}),
    "mv_infonce": Loss("mv_infonce", _stacked3, F.mv_infonce_loss, ref.mv_infonce_loss,
                       {"temperature": 0.4, "same_view_negatives": False}, min_rows=1),
    "mv_dhel": Loss("mv_dhel", _stacked3, F.mv_dhel_loss, ref.mv_dhel_loss, {"temperature": 0.4}),
    "hcl": Loss("hcl", _two, F.hcl_loss, ref.hcl_loss, {"temperature": 0.3, "tau_plus": 0.25, "beta": 0.5}),
}
NAMES = sorted(LOSSES)
TWO_VIEW = ["dcl", "dclw", "dhel", "hcl", "ntxent"]
NEEDS_NEGATIVES = ["dcl", "dclw", "dhel", "hcl", "mv_dhel"]   # N = 1 is a ValueError


# docs/losses.md defaults of the temperature (and HCL's β), for the logit bound of the oracle rule.
DEFAULT_TEMPERATURE = {"ntxent": 0.5, "supcon2d": 0.1, "supcon3d": 0.1, "dcl": 0.1, "dclw": 0.1, "dhel": 0.3,
                       "mv_infonce": 0.1, "mv_dhel": 0.1, "hcl": 0.5}


def logit_bound_of(name: str, opts=None) -> float:
    """docs/design.md's L (the largest |logit|) of a call: the losses normalise their rows, so a
    logit is at most 1/τ in magnitude — (1+β)/τ in HCL's first block."""
    opts = opts or {}
    tau = opts.get("temperature", DEFAULT_TEMPERATURE[name])
    return (1.0 + opts.get("beta", 1.0)) / tau if name == "hcl" else 1.0 / tau


def check(loss: Loss, inputs, dtype, backend="torch", weights=None, **opts):
    return compare(lambda *t: loss.run(t, backend, **opts), lambda *t: loss.oracle(t, **opts),
                   inputs, dtype, what=loss.name, weights=weights, logit_bound=logit_bound_of(loss.name, opts))


@pytest.fixture
def small_chunks(monkeypatch):
    """A tiny workspace: many row chunks per block, the last one ragged."""
    monkeypatch.setenv("MMLOSS_CHUNK_BYTES", "1KiB")


# ----------------------------------------------------------------------------- against the reference

SHAPES = [(2, 3), (7, 67), (33, 3), (33, 67)]


@backend_param()
@pytest.mark.parametrize("chunks", ["default", "small"])
@pytest.mark.parametrize("n,d", SHAPES, ids=[f"N{n}-D{d}" for n, d in SHAPES])
@pytest.mark.parametrize("name", NAMES)
def test_matches_reference(name, n, d, chunks, backend, monkeypatch):
    if chunks == "small":
        monkeypatch.setenv("MMLOSS_CHUNK_BYTES", "1KiB")
    loss = LOSSES[name]
    check(loss, loss.build(n, d, seed=n + d), torch.float32, backend)


@backend_param()
@pytest.mark.parametrize("name", NAMES)
def test_every_non_default_option(name, backend, small_chunks):
    loss = LOSSES[name]
    check(loss, loss.build(9, 5, seed=3), torch.float32, backend, **loss.options)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp64"])
@pytest.mark.parametrize("name", NAMES)
def test_dtypes(name, dtype):
    loss = LOSSES[name]
    out, _ = check(loss, loss.build(7, 67, dtype=DTYPES[dtype], seed=11), DTYPES[dtype])
    assert out.dtype == (torch.float64 if dtype == "fp64" else torch.float32)


@pytest.mark.parametrize("name", NAMES)
def test_noncontiguous_inputs(name, small_chunks):
    loss = LOSSES[name]
    inputs = loss.build(12, 10, seed=5, noncontig=True)
    assert not any(t.is_contiguous() for t in inputs)
    check(loss, inputs, torch.float32)


@pytest.mark.parametrize("name", NAMES)
def test_reference_backend_through_the_function(name):
    loss = LOSSES[name]
    check(loss, loss.build(6, 4, seed=2), torch.float32, backend="reference")


@pytest.mark.parametrize("name", NAMES)
def test_one_dimensional_features(name):
    """D = 1: every unit row is ±1, the loss is piecewise constant and its gradient exactly 0;
    the fast path must give the reference's value and a gradient at rounding level."""
    loss = LOSSES[name]
    inputs = loss.build(8, 1, seed=4)
    out = loss.run(inputs, "torch")
    assert_loss_close(out, loss.oracle([oracle(t) for t in inputs]), torch.float32, logit_bound=logit_bound_of(name))
    for g in torch.autograd.grad(out, inputs):
        assert float(g.abs().max()) <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_without_grad_matches(name):
    """Under no_grad the within-view blocks take their row-only path; values do not change."""
    loss = LOSSES[name]
    inputs = loss.build(10, 6, seed=8)
    with torch.no_grad():
        quiet = loss.run(inputs, "torch")
    assert_loss_close(quiet, loss.oracle([oracle(t) for t in inputs]), torch.float32,
                      logit_bound=logit_bound_of(name))


@pytest.mark.parametrize("name", TWO_VIEW)
def test_gradient_reaches_only_the_view_that_requires_it(name):
    """out1 as a constant (a stop-gradient branch): out0's gradient still matches."""
    loss = LOSSES[name]
    out0, out1 = loss.build(9, 7, seed=6)
    check(loss, [out0, out1.detach()], torch.float32)


def test_ntxent_reductions():
    loss = LOSSES["ntxent"]
    out0, out1 = loss.build(11, 9, seed=7)
    terms, _ = check(loss, [out0, out1], torch.float32, weights=upstream(22, 7), reduction="none")
    assert terms.shape == (22,)
    total, _ = check(loss, [out0, out1], torch.float32, reduction="sum")
    assert_loss_close(total, 22 * F.ntxent_loss(out0, out1), torch.float32, logit_bound=22 * logit_bound_of("ntxent"))


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


def test_autocast_bf16():
    out0, out1 = views(2, 7, 16, seed=12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = F.ntxent_loss(out0, out1, backend="torch")
    expected = ref.ntxent_loss(oracle(out0.to(torch.bfloat16)), oracle(out1.to(torch.bfloat16)))
    assert out.dtype == torch.float32
    assert_loss_close(out, expected, torch.bfloat16, logit_bound=logit_bound_of("ntxent"))


# ----------------------------------------------------------------------------- closed forms


def _closed_form_check(value_fn, inputs, expected: float):
    fast = value_fn(inputs, "torch").detach()
    slow = value_fn([oracle(t) for t in inputs], None).detach()
    assert math.isclose(float(slow), expected, rel_tol=1e-10, abs_tol=1e-10), (float(slow), expected)
    assert math.isclose(float(fast), expected, rel_tol=1e-10, abs_tol=1e-10), (float(fast), expected)


@pytest.mark.parametrize("n", [1, 2, 9])
def test_ntxent_identical_rows_is_log_2n_minus_1(n):
    """Every logit equals 1/τ: each anchor's LSE over 2N−1 others minus its positive."""
    _closed_form_check(lambda t, be: (F.ntxent_loss(*t, 0.3, backend=be) if be else ref.ntxent_loss(*t, 0.3)),
                       identical_rows(n, 5), math.log(2 * n - 1))


@pytest.mark.parametrize("n", [2, 9])
def test_dcl_identical_rows_is_log_2n_minus_2(n):
    """The positive leaves the normaliser: −1/τ + (1/τ + log(2N−2)); DCLW's weights are all 1."""
    for fast, slow in ((F.dcl_loss, ref.dcl_loss), (F.dclw_loss, ref.dclw_loss)):
        _closed_form_check(lambda t, be: fast(*t, 0.2, backend=be) if be else slow(*t, 0.2),
                           identical_rows(n, 4), math.log(2 * n - 2))


@pytest.mark.parametrize("include_augs", [True, False])
def test_dhel_identical_rows(include_augs):
    """log(N−1) from the anchors' view; include_augs adds LSE over N−1 logits 1/τ."""
    n, tau = 6, 0.3
    expected = math.log(n - 1) + (1 / tau + math.log(n - 1) if include_augs else 0.0)
    _closed_form_check(lambda t, be: (F.dhel_loss(*t, tau, include_augs, backend=be) if be
                                      else ref.dhel_loss(*t, tau, include_augs)),
                       identical_rows(n, 3), expected)


@pytest.mark.parametrize("beta,tau_plus", [(1.0, 0.1), (0.0, 0.0), (3.0, 0.6)])
def test_hcl_identical_rows_is_log_2n_minus_1(beta, tau_plus):
    """All negatives equal: E = e^{1/τ}, Ng = Ñ·e^{1/τ} whatever β, τ⁺: log(2N−1) as NT-Xent."""
    n = 5
    _closed_form_check(lambda t, be: (F.hcl_loss(*t, 0.5, tau_plus, beta, backend=be) if be
                                      else ref.hcl_loss(*t, 0.5, tau_plus, beta)),
                       identical_rows(n, 3), math.log(2 * n - 1))


def test_supcon_one_class_identical_rows_is_log_n_minus_1():
    """Every logit 1/τ: LSE over n−1 others minus the mean positive; scaled by τ/τ_base."""
    (x,) = identical_rows(7, 4, v=1)
    labels = torch.zeros(7, dtype=torch.long)
    _closed_form_check(lambda t, be: (F.supcon_loss(t[0], labels, 0.1, 0.05, backend=be) if be
                                      else ref.supcon_loss(t[0], labels, 0.1, 0.05)),
                       [x], 2.0 * math.log(6))


@pytest.mark.parametrize("same_view_negatives", [True, False])
def test_mv_infonce_identical_rows(same_view_negatives):
    """True: log(V(VM−1)) − log(V(V−1)); False: the inner LSE has (V−1)M logits: log M."""
    v, m = 3, 4
    expected = math.log((v * m - 1) / (v - 1)) if same_view_negatives else math.log(m)
    _closed_form_check(lambda t, be: (F.mv_infonce_loss(t, 0.25, same_view_negatives, backend=be) if be
                                      else ref.mv_infonce_loss(t, 0.25, same_view_negatives)),
                       identical_rows(m, 3, v=v), expected)


def test_mv_dhel_identical_rows():
    """Σ_l (1/τ + log(M−1)) − (1/τ + log(V(V−1)/2))."""
    v, m, tau = 4, 5, 0.25
    expected = v * (1 / tau + math.log(m - 1)) - (1 / tau + math.log(v * (v - 1) / 2))
    _closed_form_check(lambda t, be: F.mv_dhel_loss(t, tau, backend=be) if be else ref.mv_dhel_loss(t, tau),
                       identical_rows(m, 3, v=v), expected)


# ----------------------------------------------------------------------------- symmetry


@pytest.mark.parametrize("name", ["ntxent", "dcl", "dclw", "hcl", "dhel"])
def test_swapping_views_is_a_symmetry(name):
    """Symmetric in the views: NT-Xent, DCL/DCLW, HCL, and DHEL with include_augs (its default)."""
    out0, out1 = LOSSES[name].build(10, 6, seed=21)
    fast = LOSSES[name].fast
    a = fast(out0, out1, backend="torch")
    b = fast(out1, out0, backend="torch")
    assert_loss_close(a, b.double(), torch.float32, logit_bound=logit_bound_of(name))
    ga = torch.autograd.grad(a, [out0, out1])
    gb = torch.autograd.grad(b, [out0, out1])
    for x, y in zip(ga, gb):
        assert_grad_close(x, y.double(), torch.float32)


def test_dhel_without_augs_is_not_symmetric():
    out0, out1 = views(2, 10, 6, seed=22)
    with torch.no_grad():
        a = F.dhel_loss(out0, out1, include_augs=False)
        b = F.dhel_loss(out1, out0, include_augs=False)
    assert abs(float(a) - float(b)) > 1e-3


@pytest.mark.parametrize("name", ["mv_infonce", "mv_dhel"])
def test_permuting_views_and_instances_is_a_symmetry(name):
    (u,) = LOSSES[name].build(8, 5, seed=23)
    fast = LOSSES[name].fast
    permuted = u.detach()[[2, 0, 1]][:, torch.randperm(8, generator=torch.Generator().manual_seed(0))]
    assert_loss_close(fast(u, backend="torch"), fast(permuted, backend="torch").double(), torch.float32,
                      logit_bound=logit_bound_of(name))


def test_supcon_row_permutation_is_a_symmetry():
    (x,) = LOSSES["supcon2d"].build(15, 6, seed=24)
    labels = _supcon2d_labels(15)
    perm = torch.randperm(15, generator=torch.Generator().manual_seed(1))
    a = F.supcon_loss(x, labels)
    b = F.supcon_loss(x.detach()[perm], labels[perm])
    assert_loss_close(a, b.double(), torch.float32, logit_bound=logit_bound_of("supcon2d"))


# ----------------------------------------------------------------------------- relations between losses


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


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_supcon_two_views_without_labels_is_ntxent(tau):
    out0, out1 = views(2, 11, 7, seed=33)
    stacked = torch.stack([out0, out1], dim=1)                   # (B, 2, D)
    assert_loss_close(F.supcon_loss(stacked, temperature=tau),
                      F.ntxent_loss(out0, out1, tau).double(), torch.float32, logit_bound=1 / tau)
    assert_loss_close(ref.supcon_loss(oracle(stacked), temperature=tau),
                      ref.ntxent_loss(oracle(out0), oracle(out1), tau), torch.float64)


def test_supcon_views_are_flattened_view_major_like_hobbitlong():
    """(B, V, D) with labels (B,) is the 2-D loss of cat(unbind(x, 1)) with labels repeated V
    times: all samples of view 0 first (HobbitLong's contrast_feature order)."""
    x = views(3, 8, 5, seed=34, stacked=True).detach().transpose(0, 1).contiguous().requires_grad_()
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 3, 0])
    flat = torch.cat(torch.unbind(x, dim=1), dim=0)
    assert_loss_close(F.supcon_loss(x, labels), F.supcon_loss(flat, labels.repeat(3)).double(), torch.float32,
                      logit_bound=logit_bound_of("supcon3d"))
    check(LOSSES["supcon3d"], [x], torch.float32)
    compare(lambda t: F.supcon_loss(t, labels, backend="torch"), lambda t: ref.supcon_loss(t, labels), [x],
            torch.float32, what="supcon (B,V,D) with labels", logit_bound=logit_bound_of("supcon3d"))


def test_supcon_anchors_without_positive_are_skipped():
    """Singleton classes contribute no anchor; the mean runs over the others."""
    (x,) = views(1, 9, 6, seed=35)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4])
    kept = torch.tensor([0, 1, 3, 4, 5, 7, 8])
    compare(lambda t: F.supcon_loss(t, labels, backend="torch"), lambda t: ref.supcon_loss(t, labels), [x],
            torch.float32, what="supcon singletons", logit_bound=logit_bound_of("supcon2d"))
    # Removing the singleton rows changes every normaliser, so compare through the reference's terms.
    z = torch.nn.functional.normalize(x.detach().double(), dim=1)
    L = z @ z.T / 0.1
    L.fill_diagonal_(float("-inf"))
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(9, dtype=torch.bool)
    terms = torch.logsumexp(L, 1) - torch.where(same, L, 0.0).sum(1) / same.sum(1).clamp(min=1)
    assert_loss_close(F.supcon_loss(x, labels), terms[kept].mean(), torch.float32,
                      logit_bound=logit_bound_of("supcon2d"))


@pytest.mark.parametrize("shape", ["2d-distinct-labels", "3d-one-view", "2d-one-row"])
def test_supcon_without_any_positive_is_a_connected_zero(shape):
    if shape == "2d-distinct-labels":
        (x,) = views(1, 6, 4, seed=36)
        labels = torch.arange(6)
    elif shape == "3d-one-view":
        x = views(1, 6, 4, seed=36, stacked=True).detach().transpose(0, 1).contiguous().requires_grad_()
        labels = None
    else:
        (x,) = views(1, 1, 4, seed=36)
        labels = torch.tensor([3])
    loss = F.supcon_loss(x, labels, backend="torch")
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    (g,) = torch.autograd.grad(loss, [x])
    assert torch.equal(g, torch.zeros_like(g))
    assert float(ref.supcon_loss(oracle(x), labels).detach()) == 0.0


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


def test_mv_infonce_two_views_is_not_ntxent():
    """docs/losses.md §8: with V = 2 both anchors of an instance share one log."""
    out0, out1 = views(2, 9, 6, seed=38)
    with torch.no_grad():
        mv = F.mv_infonce_loss([out0, out1], 0.5)
        ntx = F.ntxent_loss(out0, out1, 0.5)
    assert abs(float(mv) - float(ntx)) > 1e-3


# ----------------------------------------------------------------------------- N = 1


def test_ntxent_single_pair_is_a_connected_zero():
    out0, out1 = views(2, 1, 5, seed=41)
    loss = F.ntxent_loss(out0, out1, backend="torch")
    assert float(loss.detach()) == 0.0
    grads = torch.autograd.grad(loss, [out0, out1])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert torch.equal(F.ntxent_loss(out0, out1, reduction="none"), torch.zeros(2))
    assert float(ref.ntxent_loss(oracle(out0), oracle(out1)).detach()) == 0.0


@pytest.mark.parametrize("same_view_negatives", [True, False])
def test_mv_infonce_single_instance_is_zero(same_view_negatives):
    """M = 1: the normaliser holds only the instance's other views, LSE_l LSE_{m≠l} = LSE_{l≠m},
    so the loss is identically 0 (no error, like NT-Xent at N = 1); its gradient vanishes."""
    (u,) = LOSSES["mv_infonce"].build(1, 6, seed=42)
    loss = F.mv_infonce_loss(u, 0.1, same_view_negatives, backend="torch")
    assert abs(float(loss.detach())) <= 1e-6
    assert float(torch.autograd.grad(loss, [u])[0].abs().max()) <= 1e-5
    assert abs(float(ref.mv_infonce_loss(oracle(u), 0.1, same_view_negatives).detach())) <= 1e-12


@pytest.mark.parametrize("name", NEEDS_NEGATIVES)
def test_single_row_needs_negatives(name):
    loss = LOSSES[name]
    with pytest.raises(ValueError):
        loss.run(loss.build(1, 4, seed=43), "torch")


# ----------------------------------------------------------------------------- peers


def _lightly_file(relative: str, module_name: str):
    """One lightly source file loaded by path (lightly's package import needs torchvision);
    skips, naming the missing package, when lightly or the file's own imports are missing."""
    spec = importlib.util.find_spec("lightly")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lightly is not installed: no lightly comparison")
    path = os.path.join(list(spec.submodule_search_locations)[0], *relative.split("/"))
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ModuleNotFoundError as exc:
        pytest.skip(f"lightly's {relative} cannot be imported without the missing package {exc.name!r}")
    return module


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")
def test_lightly_dcl_and_dclw():
    lightly = _lightly_file("loss/dcl_loss.py", "_mmloss_tests_lightly_dcl")
    out0, out1 = views(2, 10, 8, seed=51)
    cases = [  # (lightly, ours, L: 1/τ, times the largest weight; DCLW's weights are < 2)
        (lightly.DCLLoss(temperature=0.2), lambda a, b: F.dcl_loss(a, b, 0.2), 1 / 0.2),
        (lightly.DCLLoss(), lambda a, b: mmloss.DCLLoss()(a, b), 1 / 0.1),
        (lightly.DCLLoss(0.3, weight_fn=_weights_by_distance),
         lambda a, b: F.dcl_loss(a, b, 0.3, _weights_by_distance), 4 / 0.3),
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


def test_lightly_ntxent():
    """lightly's ntx_ent_loss.py imports its model zoo (torchvision); the benchmark's peer loader
    brings the file in without torchvision, so the comparison runs wherever lightly is installed."""
    if importlib.util.find_spec("lightly") is None:
        pytest.skip("lightly is not installed: no lightly comparison")
    from mmloss.bench.peers import load_peer

    ntxent_cls, _ = load_peer("lightly")
    out0, out1 = views(2, 10, 8, seed=52)
    expected = ntxent_cls(temperature=0.3)(oracle(out0), oracle(out1))
    assert_loss_close(mmloss.NTXentLoss(0.3)(out0, out1), expected, torch.float32, logit_bound=1 / 0.3)


def _pml_losses():
    if importlib.util.find_spec("pytorch_metric_learning") is None:
        pytest.skip("pytorch-metric-learning is not installed: no comparison")
    from pytorch_metric_learning import losses

    return losses


def test_pytorch_metric_learning_ntxent():
    """PML's NTXentLoss on [z0; z1] with labels (arange(N), arange(N)) is NT-Xent."""
    pml = _pml_losses()
    out0, out1 = views(2, 12, 9, seed=53)
    labels = torch.arange(12).repeat(2)
    a0, a1 = oracle(out0), oracle(out1)
    expected = pml.NTXentLoss(temperature=0.3)(torch.cat([a0, a1]), labels)
    got = F.ntxent_loss(out0, out1, 0.3)
    assert_loss_close(got, expected, torch.float32, logit_bound=1 / 0.3)
    for g, e in zip(torch.autograd.grad(got, [out0, out1]), torch.autograd.grad(expected, [a0, a1])):
        assert_grad_close(g, e, torch.float32)


def test_pytorch_metric_learning_supcon():
    """PML's SupConLoss(temperature) with labels equals ours with τ_base = τ when every anchor
    has a positive (PML averages the non-zero anchor losses)."""
    pml = _pml_losses()
    (x,) = views(1, 15, 9, seed=54)
    labels = torch.arange(15) % 4
    a = oracle(x)
    expected = pml.SupConLoss(temperature=0.2)(a, labels)
    got = mmloss.SupConLoss(temperature=0.2)(x, labels)
    assert_loss_close(got, expected, torch.float32, logit_bound=1 / 0.2)
    assert_grad_close(torch.autograd.grad(got, [x])[0], torch.autograd.grad(expected, [a])[0], torch.float32)


# ----------------------------------------------------------------------------- numerics and NaN policy (issue 8)


def _scale_rows(t: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(every other row of ``t`` times ``factor``, as a new leaf; the (…, 1) multiplier used).
    A row is a vector along the last dimension, whatever the leading dimensions are."""
    mult = torch.ones(t.shape[:-1], dtype=t.dtype).flatten()
    mult[::2] = factor
    mult = mult.reshape(*t.shape[:-1], 1)
    return (t.detach() * mult).requires_grad_(), mult


# Powers of two (exact scaling): ‖x‖² overflows fp32 from ‖x‖ ≈ 1.8e19 on, fp64 from ≈ 1.3e154.
LONG_ROWS = [("fp32", 2.0 ** 70), ("fp32", 2.0 ** 120), ("fp64", 2.0 ** 600)]


@pytest.mark.parametrize("dtype,factor", LONG_ROWS, ids=[f"{d}-2^{int(math.log2(f))}" for d, f in LONG_ROWS])
@pytest.mark.parametrize("name", NAMES)
def test_long_rows_are_normalised_without_overflow(name, dtype, factor):
    """Issue 8 item 7: every loss is invariant under a positive per-row scale, so rows whose
    squared norm overflows the compute dtype give the loss of the unscaled rows (the float64
    reference of the unscaled inputs) and gradients scaled by 1/factor; the fast path and the
    reference itself (run in the inputs' dtype) both."""
    loss = LOSSES[name]
    dt = DTYPES[dtype]
    inputs = loss.build(7, 5, dtype=dt, seed=92)
    long_rows = [_scale_rows(t, factor) for t in inputs]
    scaled = [t for t, _ in long_rows]
    ref_inputs = [oracle(t) for t in inputs]
    expected = loss.oracle(ref_inputs)
    expected_grads = torch.autograd.grad(expected, ref_inputs)
    bound = logit_bound_of(name)
    for what, fn in (("fast", lambda t: loss.run(t, "torch")), ("reference", loss.oracle)):
        got = fn(scaled)
        assert_loss_close(got, expected, dt, f"{what} {name}", logit_bound=bound)
        got_grads = torch.autograd.grad(got, scaled)
        for k, (g, e, (_, mult)) in enumerate(zip(got_grads, expected_grads, long_rows)):
            assert_grad_close(g * mult, e, dt, f"{what} {name}: grad of input {k} × factor")


@pytest.mark.parametrize("name", NAMES)
def test_short_and_zero_rows_are_normalised_like_f_normalize(name):
    """Rows shorter than eps = 1e-12 become x/eps (F.normalize), zero rows stay zero: the fast
    path gives the reference's values and gradients (one row of norm ~1e-30, one of zeros)."""
    loss = LOSSES[name]
    inputs = [t.detach().clone() for t in loss.build(7, 5, seed=93)]
    for t in inputs:
        rows = t.view(-1, t.shape[-1])
        rows[1] *= 1e-30
        rows[4] = 0.0
    check(loss, [t.requires_grad_() for t in inputs], torch.float32)


def _with_bad_entry(name: str, value: float) -> list[torch.Tensor]:
    inputs = [t.detach().clone() for t in LOSSES[name].build(6, 4, seed=94)]
    inputs[0].view(-1, inputs[0].shape[-1])[2, 1] = value
    return inputs


# The user's name of each loss's first input (the one given a NaN/Inf entry).
FIRST_INPUT = {"ntxent": "out0", "dcl": "out0", "dclw": "out0", "dhel": "out0", "hcl": "out0",
               "supcon2d": "embeddings", "supcon3d": "embeddings", "mv_infonce": "views", "mv_dhel": "views"}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_features_propagate_unless_check_finite(name, value):
    """Issue 8 item 8: NaN/±inf in a feature give a NaN loss (torch's convention, no error
    naming an internal argument); ``check_finite=True`` raises a ValueError naming the tensor."""
    loss = LOSSES[name]
    inputs = _with_bad_entry(name, value)
    assert bool(torch.isnan(loss.run(inputs, "torch")))
    with pytest.raises(ValueError, match=rf"{FIRST_INPUT[name]}\b.*non-finite"):
        loss.run(inputs, "torch", check_finite=True)
    assert bool(torch.isfinite(loss.run(LOSSES[name].build(6, 4, seed=94), "torch", check_finite=True)))


@pytest.mark.parametrize("name", NAMES)
def test_reference_propagates_non_finite_features(name):
    assert bool(torch.isnan(LOSSES[name].oracle([oracle(t) for t in _with_bad_entry(name, float("inf"))])))


def test_multiview_list_check_finite_names_the_view():
    parts = [t.detach() for t in views(3, 5, 4, seed=95)]
    parts[2][1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"views\[2\]"):
        F.mv_dhel_loss(parts, check_finite=True)


def _tau_floor(factor: float = 1.0) -> float:
    """The smallest accepted temperature in fp32: (factor)/(τ·1e-12) must be finite."""
    return 1.01 * factor / (1e-12 * torch.finfo(torch.float32).max)


def test_smallest_accepted_hyperparameters_give_finite_losses():
    """Issue 8 item 7: values that pass validation do not give NaN — at the smallest accepted
    τ (and σ, τ_base) a zero row and a short row still give finite losses, NaN-free gradients."""
    out0, out1 = [t.detach().clone() for t in views(2, 6, 4, seed=96)]
    out0[1] = 0.0
    out1[3] *= 1e-20
    calls = {
        "ntxent": lambda a, b: F.ntxent_loss(a, b, _tau_floor()),
        "dcl": lambda a, b: F.dcl_loss(a, b, _tau_floor()),
        "dclw": lambda a, b: F.dclw_loss(a, b, _tau_floor(), sigma=1.01 / torch.finfo(torch.float32).max),
        "dhel": lambda a, b: F.dhel_loss(a, b, _tau_floor()),
        "hcl": lambda a, b: F.hcl_loss(a, b, _tau_floor(1.5), beta=0.5),
        "supcon": lambda a, b: F.supcon_loss(torch.stack([a, b], 1), temperature=_tau_floor()),
        "supcon_base": lambda a, b: F.supcon_loss(torch.stack([a, b], 1), temperature=0.5, base_temperature=1e-37),
        "mv_infonce": lambda a, b: F.mv_infonce_loss([a, b], _tau_floor()),
        "mv_dhel": lambda a, b: F.mv_dhel_loss([a, b], _tau_floor()),
    }
    for name, call in calls.items():
        a, b = out0.clone().requires_grad_(), out1.clone().requires_grad_()
        loss = call(a, b)
        assert bool(torch.isfinite(loss)), (name, float(loss))
        if name == "supcon_base":  # the zero row's true gradient, ~(τ/τ_base)/eps = 5e48, exceeds fp32
            continue
        for g in torch.autograd.grad(loss, [a, b]):
            assert not bool(torch.isnan(g).any()), name


REFUSED_HYPERPARAMETERS = {
    "dclw-sigma-1e-45": (lambda x, y: F.dclw_loss(x, y, sigma=1e-45), "sigma"),
    "supcon-base-1e-45": (lambda x, y: F.supcon_loss(torch.stack([x, y], 1), base_temperature=1e-45),
                          "base_temperature"),
    "supcon-tau-1e-45": (lambda x, y: F.supcon_loss(torch.stack([x, y], 1), temperature=1e-45), "temperature"),
    "supcon-ratio": (lambda x, y: F.supcon_loss(torch.stack([x, y], 1), temperature=1e3, base_temperature=1e-36),
                     "temperature / base_temperature"),
    "ntxent-tau-1e-45": (lambda x, y: F.ntxent_loss(x, y, 1e-45), "temperature"),
    "ntxent-short-row-scale": (lambda x, y: F.ntxent_loss(x, y, _tau_floor() / 2), "temperature"),
    "dcl-tau-1e-45": (lambda x, y: F.dcl_loss(x, y, 1e-45), "temperature"),
    "dhel-tau-1e-45": (lambda x, y: F.dhel_loss(x, y, 1e-45), "temperature"),
    "hcl-beta": (lambda x, y: F.hcl_loss(x, y, 0.5, beta=1e30), "beta"),
    "mv_infonce-tau-1e-45": (lambda x, y: F.mv_infonce_loss([x, y], 1e-45), "temperature"),
    "mv_dhel-tau-1e-45": (lambda x, y: F.mv_dhel_loss([x, y], 1e-45), "temperature"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_HYPERPARAMETERS))
def test_hyperparameters_that_would_overflow_fp32_are_refused(case):
    """Issue 8 item 7: σ = 1e-45, τ_base = 1e-45 (and τ) passed a float64 check and gave NaN in
    fp32; now a ValueError names the argument. fp64 features accept the same values."""
    call, argument = REFUSED_HYPERPARAMETERS[case]
    x, y = views(2, 5, 4, seed=97)
    with pytest.raises(ValueError, match=re.escape(argument)):
        call(x, y)
    assert bool(torch.isfinite(call(x.double(), y.double())))


# ----------------------------------------------------------------------------- modules


MODULES = {
    "NTXentLoss": (mmloss.NTXentLoss, {"temperature": 0.5}, "ntxent"),
    "SupConLoss": (mmloss.SupConLoss, {"temperature": 0.1, "base_temperature": None}, "supcon3d"),
    "DCLLoss": (mmloss.DCLLoss, {"temperature": 0.1, "weight_fn": None}, "dcl"),
    "DCLWLoss": (mmloss.DCLWLoss, {"temperature": 0.1, "sigma": 0.5}, "dclw"),
    "DHELLoss": (mmloss.DHELLoss, {"temperature": 0.3, "include_augs": True}, "dhel"),
    "MultiViewInfoNCELoss": (mmloss.MultiViewInfoNCELoss, {"temperature": 0.1, "same_view_negatives": True},
                             "mv_infonce"),
    "MultiViewDHELLoss": (mmloss.MultiViewDHELLoss, {"temperature": 0.1}, "mv_dhel"),
    "HardNegativeLoss": (mmloss.HardNegativeLoss, {"temperature": 0.5, "tau_plus": 0.1, "beta": 1.0}, "hcl"),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_defaults_and_value(name):
    """docs/losses.md defaults as attributes; forward equals the reference with those defaults; no
    parameters or buffers; local (distributed=None) by default."""
    cls, defaults, loss_name = MODULES[name]
    module = cls(backend="torch")
    for key, value in defaults.items():
        assert getattr(module, key) == value, key
    assert module.distributed is None
    assert list(module.parameters()) == [] and module.state_dict() == {}
    loss = LOSSES[loss_name]
    inputs = loss.build(7, 6, seed=61)
    bound = logit_bound_of(loss_name, defaults)
    if loss_name == "supcon3d":
        compare(lambda *t: module(*t), lambda *t: ref.supcon_loss(*t), inputs, torch.float32, logit_bound=bound)
    else:
        compare(lambda *t: module(*t), lambda *t: loss.oracle(t), inputs, torch.float32, logit_bound=bound)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_check_finite(name):
    """Issue 8 item 8: a constructor keyword, stored and passed on; off by default (NaN out)."""
    cls, _, loss_name = MODULES[name]
    inputs = _with_bad_entry(loss_name, float("nan"))
    assert cls().check_finite is False
    assert bool(torch.isnan(cls(backend="torch")(*inputs)))
    with pytest.raises(ValueError, match=rf"{FIRST_INPUT[loss_name]}\b.*non-finite"):
        cls(backend="torch", check_finite=True)(*inputs)


def test_module_positional_arguments_follow_losses_md():
    out0, out1 = views(2, 8, 5, seed=62)
    e = torch.stack([out0, out1], dim=1)
    u = torch.stack([out0, out1])
    labels = torch.arange(8) % 3
    pairs = [
        (mmloss.NTXentLoss(0.3)(out0, out1), F.ntxent_loss(out0, out1, 0.3)),
        (mmloss.SupConLoss(0.2, 0.07)(e, labels), F.supcon_loss(e, labels, 0.2, 0.07)),
        (mmloss.SupConLoss(0.2)(out0, labels=labels), F.supcon_loss(out0, labels, 0.2)),
        (mmloss.DCLLoss(0.2, _weights_by_distance)(out0, out1),
         F.dcl_loss(out0, out1, 0.2, _weights_by_distance)),
        (mmloss.DCLWLoss(0.2, 0.9)(out0, out1), F.dclw_loss(out0, out1, 0.2, 0.9)),
        (mmloss.DHELLoss(0.4, False)(out0, out1), F.dhel_loss(out0, out1, 0.4, False)),
        (mmloss.MultiViewInfoNCELoss(0.2, False)(u), F.mv_infonce_loss(u, 0.2, False)),
        (mmloss.MultiViewDHELLoss(0.2)(u), F.mv_dhel_loss(u, 0.2)),
        (mmloss.HardNegativeLoss(0.4, 0.2, 0.5)(out0, out1), F.hcl_loss(out0, out1, 0.4, 0.2, 0.5)),
    ]
    for got, expected in pairs:
        assert torch.equal(got, expected)


def test_module_refuses_distributed_gather():
    with pytest.raises(RuntimeError):
        mmloss.NTXentLoss(distributed="gather")(*views(2, 4, 3))


def test_module_rejects_unknown_backend():
    with pytest.raises(ValueError):
        mmloss.DHELLoss(backend="nonexistent")


def test_module_rejects_bad_temperature_at_construction():
    with pytest.raises(ValueError):
        mmloss.HardNegativeLoss(temperature=0.0)


def test_module_rejects_bad_tau_plus_at_construction():
    with pytest.raises(ValueError):
        mmloss.HardNegativeLoss(tau_plus=1.0)


def test_module_rejects_non_callable_weight_fn():
    with pytest.raises(TypeError):
        mmloss.DCLLoss(weight_fn=3)


# ----------------------------------------------------------------------------- bad inputs (one test each)


@pytest.mark.parametrize("name", TWO_VIEW)
def test_views_of_different_shapes(name):
    with pytest.raises(ValueError):
        LOSSES[name].fast(torch.randn(5, 3), torch.randn(6, 3))


@pytest.mark.parametrize("name", TWO_VIEW)
def test_view_of_wrong_rank(name):
    with pytest.raises(ValueError):
        LOSSES[name].fast(torch.randn(5), torch.randn(5))


@pytest.mark.parametrize("name", TWO_VIEW)
def test_integer_views(name):
    with pytest.raises(TypeError):
        LOSSES[name].fast(torch.ones(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.long))


@pytest.mark.parametrize("name", TWO_VIEW)
def test_view_that_is_not_a_tensor(name):
    with pytest.raises(TypeError):
        LOSSES[name].fast([[1.0, 2.0]], torch.randn(1, 2))


@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), float("inf")])
@pytest.mark.parametrize("name", TWO_VIEW)
def test_bad_temperature_value(name, value):
    with pytest.raises(ValueError):
        LOSSES[name].fast(*views(2, 4, 3), temperature=value)


@pytest.mark.parametrize("name", TWO_VIEW)
def test_temperature_tensor(name):
    """Temperatures are Python floats (no learnable temperature in this family)."""
    with pytest.raises(TypeError):
        LOSSES[name].fast(*views(2, 4, 3), temperature=torch.tensor(0.5))


def test_ntxent_unknown_reduction():
    with pytest.raises(ValueError):
        F.ntxent_loss(*views(2, 4, 3), reduction="batchmean")


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


def test_dhel_include_augs_not_bool():
    with pytest.raises(TypeError):
        F.dhel_loss(*views(2, 4, 3), include_augs=1)


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


def test_supcon_2d_without_labels():
    with pytest.raises(ValueError):
        F.supcon_loss(torch.randn(6, 4))


def test_supcon_labels_of_wrong_length():
    with pytest.raises(ValueError):
        F.supcon_loss(torch.randn(6, 4), torch.arange(5))


def test_supcon_3d_labels_per_row_instead_of_per_sample():
    with pytest.raises(ValueError):
        F.supcon_loss(torch.randn(6, 2, 4), torch.arange(12))


def test_supcon_float_labels():
    with pytest.raises(TypeError):
        F.supcon_loss(torch.randn(6, 4), torch.zeros(6))


@pytest.mark.parametrize("shape", [(6,), (2, 3, 4, 5)])
def test_supcon_embeddings_of_wrong_rank(shape):
    with pytest.raises(ValueError):
        F.supcon_loss(torch.randn(*shape), torch.zeros(shape[0], dtype=torch.long))


def test_supcon_embeddings_not_a_tensor():
    with pytest.raises(TypeError):
        F.supcon_loss([[1.0, 0.0]], torch.zeros(1, dtype=torch.long))


def test_supcon_bad_base_temperature():
    with pytest.raises(ValueError):
        F.supcon_loss(torch.randn(6, 4), torch.zeros(6, dtype=torch.long), base_temperature=-1.0)


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


def test_supcon_embeddings_without_views():
    """Issue 8 item 9: (B, 0, D) was an IndexError."""
    with pytest.raises(ValueError, match=r"embeddings.*\(4, 0, 3\)"):
        F.supcon_loss(torch.randn(4, 0, 3))


@pytest.mark.parametrize("name", TWO_VIEW)
def test_two_view_loss_called_with_embeddings_and_labels(name):
    """Issue 8 item 9: PML's (embeddings, labels) call style on a two-view loss says why it
    fails and where labels belong."""
    with pytest.raises(TypeError, match=r"two views out0, out1.*supcon_loss\(embeddings, labels\)"):
        LOSSES[name].fast(torch.randn(6, 4), torch.arange(6))


def test_module_called_with_embeddings_and_labels():
    with pytest.raises(TypeError, match=r"ntxent_loss takes two views.*supcon_loss"):
        mmloss.NTXentLoss()(torch.randn(6, 4), torch.arange(6) % 2)


def test_check_finite_must_be_bool():
    with pytest.raises(TypeError, match="check_finite"):
        F.ntxent_loss(*views(2, 4, 3), check_finite=1)


# ----------------------------------------------------------------------------- memory


MEMORY_N, MEMORY_D = 512, 128
WORKSPACE = 256 << 10   # MMLOSS_CHUNK_BYTES for this test: the chunk buffers of one block
# N×D temporaries held at the peak beyond the workspace, in units of the inputs' own size
# (DESIGN: O(N·D) plus the workspace), with a quarter of the inputs for O(N) vectors and chunk
# temporaries: the unit-row copies the blocks read as y (one input's worth), the y-gradient of a
# cross-view block and one x-gradient before it joins the input's gradient (NT-Xent-like: 1.5);
# HCL's second cross-view block adds one view; SupCon adds the class sums and, for (B, V, D)
# input, the per-view gradients that unbind's backward stacks.
TEMPORARIES = {"ntxent": 1.5, "dcl": 1.5, "dclw": 1.5, "dhel": 0.75, "hcl": 2.0, "supcon2d": 3.0,
               "supcon3d": 3.0, "mv_infonce": 2.0, "mv_dhel": 0.75}


@pytest.mark.parametrize("name", NAMES)
def test_memory_is_rows_plus_workspace(name, monkeypatch):
    """Deterministic allocation tracking (tests/memtrack.py): forward + backward hold at most
    ``TEMPORARIES`` times the inputs' size, one block workspace and O(N) vectors above the inputs
    and their gradients; the similarity matrix (4 MiB for 2N×2N here) never exists."""
    monkeypatch.setenv("MMLOSS_CHUNK_BYTES", str(WORKSPACE))
    loss = LOSSES[name]
    rows = MEMORY_N // 2 if name in ("supcon3d", "mv_infonce", "mv_dhel") else MEMORY_N  # 3 views
    inputs = loss.build(rows, MEMORY_D, seed=71)

    def step():
        loss.run(inputs, "torch").backward()

    step()
    for t in inputs:
        t.grad = None
    peak, _ = peak_bytes_above_start(step)
    input_bytes = grad_bytes(*inputs)
    above = peak - input_bytes
    limit = (TEMPORARIES[name] + 0.25) * input_bytes + WORKSPACE
    assert above <= limit, (
        f"{name}: {above / 2**20:.2f} MiB above inputs and gradients > {limit / 2**20:.2f} MiB"
    )


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("name", ["ntxent", "supcon2d", "hcl", "mv_infonce"])
def test_traces_in_one_graph(name):
    """torch.compile(fullgraph=True) traces the loss (validation, autocast guard, custom autograd
    functions, primitives) without a graph break; the eager backend keeps this test fast."""
    loss = LOSSES[name]
    inputs = loss.build(6, 5, seed=81)
    compiled = torch.compile(lambda *t: loss.run(t, "torch"), fullgraph=True, backend="eager")
    got = compiled(*inputs)
    expected = loss.run(inputs, "torch")
    assert_loss_close(got, expected.detach().double(), torch.float32, logit_bound=logit_bound_of(name))
    for a, b in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(expected, inputs)):
        assert_grad_close(a, b.double(), torch.float32)


# ----------------------------------------------------------------------------- drop-in fidelity (issue 13)


def _lightly_ntxent_class():
    if importlib.util.find_spec("lightly") is None:
        pytest.skip("lightly is not installed: no lightly comparison")
    from mmloss.bench.peers import load_peer

    return load_peer("lightly")[0]


def test_lightly_ntxent_defaults_and_signature():
    """NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False), positionally."""
    module = mmloss.NTXentLoss()
    assert (module.temperature, module.memory_bank_size, module.gather_distributed) == (0.5, 0, False)
    out0, out1 = views(2, 6, 5, seed=90)
    assert torch.equal(mmloss.NTXentLoss(0.3, 0, False)(out0, out1), F.ntxent_loss(out0, out1, 0.3))
    assert mmloss.NTXentLoss().state_dict() == {}


def test_lightly_ntxent_memory_bank_matches_over_steps():
    """lightly's memory bank: same initial bank from the same seed, same loss and gradients,
    same bank and pointer after every step, including a batch that reaches the end of the bank
    (its remaining rows are dropped and the pointer wraps to 0)."""
    lightly_cls = _lightly_ntxent_class()
    size = (12, 6)
    torch.manual_seed(7)
    theirs = lightly_cls(temperature=0.3, memory_bank_size=size)
    torch.manual_seed(7)
    ours = mmloss.NTXentLoss(temperature=0.3, memory_bank_size=size, backend="torch")
    assert ours.bank.dtype == torch.float32 and torch.equal(ours.bank, theirs.memory_bank.bank)
    for step, n in enumerate((5, 5, 4, 9)):   # pointers 0 → 5 → 10 → wrap (0) → wrap (0)
        out0, out1 = views(2, n, 6, seed=91 + step)
        a0, a1 = out0.detach().clone().requires_grad_(), out1.detach().clone().requires_grad_()
        expected = theirs(a0, a1)
        got = ours(out0, out1)
        assert got.shape == expected.shape == ()
        assert_loss_close(got, expected, torch.float32, logit_bound=1 / 0.3)
        for g, e in zip(torch.autograd.grad(got, [out0, out1]), torch.autograd.grad(expected, [a0, a1])):
            assert_grad_close(g, e, torch.float32)
        assert torch.equal(ours.bank, theirs.memory_bank.bank), step
        assert int(ours.bank_ptr) == int(theirs.memory_bank.bank_ptr), step


def test_memory_bank_loss_against_dense_formula_in_fp64():
    out0, out1 = views(2, 7, 5, dtype=torch.float64, seed=95)
    bank = torch.nn.functional.normalize(torch.randn(11, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3)), dim=1)
    u0, u1 = torch.nn.functional.normalize(out0, dim=1), torch.nn.functional.normalize(out1, dim=1)
    logits = torch.cat([(u0 * u1).sum(1, keepdim=True), u0 @ bank.T], dim=1) / 0.2
    expected = torch.nn.functional.cross_entropy(logits, torch.zeros(7, dtype=torch.long), reduction="none")
    for backend in ("torch", "reference"):
        got = F.ntxent_loss(out0, out1, 0.2, memory_bank=bank, reduction="none", backend=backend)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    got = F.ntxent_loss(out0, out1, 0.2, memory_bank=bank)
    for g, e in zip(torch.autograd.grad(got, [out0, out1]), torch.autograd.grad(expected.mean(), [out0, out1])):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_memory_bank_updates_only_when_training_with_grad():
    """lightly updates when out0 requires grad; mmloss also needs training mode (or
    update_state_in_eval=True), the project's rule for stateful losses."""
    out0, out1 = views(2, 3, 4, seed=96)
    module = mmloss.NTXentLoss(memory_bank_size=(8, 4))
    before = module.bank.clone()
    with torch.no_grad():   # model outputs made without grad do not require it
        module(out0 * 1.0, out1 * 1.0)
    module(out0.detach(), out1.detach())
    assert torch.equal(module.bank, before) and int(module.bank_ptr) == 0
    module.eval()
    module(out0, out1)
    assert torch.equal(module.bank, before)
    kept = mmloss.NTXentLoss(memory_bank_size=(8, 4), update_state_in_eval=True).eval()
    kept(out0, out1)
    assert int(kept.bank_ptr) == 3
    module.train()
    module(out0, out1)
    assert int(module.bank_ptr) == 3
    torch.testing.assert_close(module.bank[:3], torch.nn.functional.normalize(out1.detach(), dim=1))


def test_memory_bank_peak_memory_has_no_n_by_k_tensor():
    """The bank is scored by one similarity_lse call (rows only): with a K far above the
    torch backend's chunk, the peak above inputs stays O((N+K)·D), not N×K."""
    n, k, d = 256, 8192, 16
    out0, out1 = views(2, n, d, seed=97)
    module = mmloss.NTXentLoss(memory_bank_size=(k, d), backend="torch")
    step = lambda: module(out0, out1).backward()  # noqa: E731
    step()
    out0.grad = out1.grad = None
    peak, _ = peak_bytes_above_start(step)
    dense = n * k * 4
    assert peak < dense / 2, f"peak {peak} bytes vs one dense N×K fp32 matrix {dense} bytes"


@pytest.mark.parametrize("size,error", [(5, ValueError), (-1, ValueError), ((4, -2), ValueError),
                                        ((1, 2, 3), ValueError), ((4.0, 2), TypeError), (True, TypeError)])
def test_memory_bank_size_is_validated_like_lightly(size, error):
    with pytest.raises(error):
        mmloss.NTXentLoss(memory_bank_size=size)


def test_gather_distributed_raises_until_supported():
    with pytest.raises(NotImplementedError, match="gather_distributed"):
        mmloss.NTXentLoss(gather_distributed=True)


def test_memory_bank_of_wrong_dimension():
    out0, out1 = views(2, 3, 4, seed=98)
    with pytest.raises(ValueError, match="feature"):
        F.ntxent_loss(out0, out1, memory_bank=torch.randn(5, 3))


def test_pytorch_metric_learning_supcon_ref_emb():
    """PML's ref_emb/ref_labels: anchors from embeddings, positives and negatives from ref_emb
    (no self-exclusion); anchors whose label is missing from ref_labels are skipped."""
    pml = _pml_losses()
    (x,) = views(1, 10, 7, seed=99)
    (r,) = views(1, 13, 7, seed=100)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 5, 5])       # 5 is absent from ref_labels
    ref_labels = torch.arange(13) % 4
    a, b = oracle(x), oracle(r)
    expected = pml.SupConLoss(temperature=0.2)(a, labels, ref_emb=b, ref_labels=ref_labels)
    got = mmloss.SupConLoss(temperature=0.2)(x, labels, ref_emb=r, ref_labels=ref_labels)
    assert_loss_close(got, expected, torch.float32, logit_bound=1 / 0.2)
    for g, e in zip(torch.autograd.grad(got, [x, r]), torch.autograd.grad(expected, [a, b])):
        assert_grad_close(g, e, torch.float32)
    # Positional order is PML's: (embeddings, labels, indices_tuple, ref_emb, ref_labels).
    assert torch.equal(mmloss.SupConLoss(0.2)(x, labels, None, r, ref_labels),
                       F.supcon_loss(x, labels, 0.2, ref_emb=r, ref_labels=ref_labels))


@pytest.mark.parametrize("same_object", [False, True])
def test_supcon_ref_emb_equal_to_embeddings_like_pml(same_object):
    """ref_emb = embeddings keeps the self pairs (i, i) as positives — unless ref_labels is the
    labels tensor itself, which PML treats as the plain call (pairs (i, i) excluded)."""
    pml = _pml_losses()
    (x,) = views(1, 9, 5, seed=101)
    (r,) = views(1, 9, 5, seed=106)
    labels = torch.arange(9) % 3
    ref_labels = labels if same_object else labels.clone()
    for ref in (x, r):
        a = oracle(x)
        b = a if ref is x else oracle(ref)
        expected = pml.SupConLoss(temperature=0.5)(a, labels, ref_emb=b, ref_labels=ref_labels)
        got = F.supcon_loss(x, labels, 0.5, ref_emb=ref, ref_labels=ref_labels, backend="torch")
        assert_loss_close(got, expected, torch.float32, logit_bound=1 / 0.5)
        leaves = [x] if ref is x else [x, ref]
        for g, e in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(expected, [a] if ref is x else [a, b])):
            assert_grad_close(g, e, torch.float32)
    if same_object:
        torch.testing.assert_close(F.supcon_loss(x, labels, 0.5, ref_emb=x, ref_labels=labels),
                                   F.supcon_loss(x, labels, 0.5), rtol=1e-6, atol=1e-6)


def test_supcon_ref_emb_without_any_positive_is_a_connected_zero():
    (x,) = views(1, 4, 3, seed=102)
    (r,) = views(1, 5, 3, seed=103)
    loss = F.supcon_loss(x, torch.full((4,), 9), ref_emb=r, ref_labels=torch.zeros(5, dtype=torch.long))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    gx, gr = torch.autograd.grad(loss, [x, r])
    assert not gx.any() and not gr.any()


def test_supcon_indices_tuple_names_what_is_supported():
    (x,) = views(1, 4, 3, seed=104)
    labels = torch.tensor([0, 0, 1, 1])
    pairs = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    with pytest.raises(NotImplementedError, match=r"indices_tuple.*labels.*ref_emb"):
        mmloss.SupConLoss()(x, labels, pairs)
    with pytest.raises(NotImplementedError, match="indices_tuple"):
        F.supcon_loss(x, labels, indices_tuple=pairs)


@pytest.mark.parametrize("kwargs,match", [
    ({"ref_emb": "r"}, "together"),
    ({"ref_labels": "l"}, "together"),
    ({"ref_emb": "r", "ref_labels": "l", "labels": None}, "labels"),
    ({"ref_emb": "r", "ref_labels": "l", "three_d": True}, "2-D"),
])
def test_supcon_ref_emb_bad_calls(kwargs, match):
    (x,) = views(1, 4, 3, seed=105)
    r = torch.randn(5, 3)
    ref_labels = torch.zeros(5, dtype=torch.long)
    args = {"labels": torch.zeros(4, dtype=torch.long)}
    for key, value in kwargs.items():
        if key == "ref_emb":
            args[key] = r
        elif key == "ref_labels":
            args[key] = ref_labels
        elif key == "labels":
            args[key] = value
    emb = x[:, None, :].expand(4, 2, 3) if kwargs.get("three_d") else x
    with pytest.raises(ValueError, match=match):
        F.supcon_loss(emb, **args)
