"""Acceptance tests shared by the self-supervised family (docs/losses.md §4 NT-Xent, §5 SupCon,
§6 DCL/DCLW, §7 DHEL, §8 MV-InfoNCE / MV-DHEL, §12 HCL), run over every loss of the table in
tests/ssl_helpers.py: the machinery of mmloss/functional/ssl_common.py (blocks, normalisation,
two-view and temperature checks) and the modules' common options.

Every fast backend is compared with the float64 reference on the same (rounded) inputs, values and
gradients, with docs/design.md's tolerances (tests/oracle.py). Inputs are *not* unit rows: every
loss normalises inside. Tests of one loss are in tests/test_<loss>.py.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import mmloss
from _foundation_helpers import backend_param
from memtrack import grad_bytes, peak_bytes_above_start
from oracle import assert_grad_close, assert_loss_close, compare, oracle
from ssl_helpers import (
    check, DTYPES, logit_bound_of, LOSSES, NAMES, NEEDS_NEGATIVES, TWO_VIEW, views, weights_by_distance,
)

ref = mmloss.reference
F = mmloss.functional


# ----------------------------------------------------------------------------- against the reference


@pytest.fixture
def small_chunks(monkeypatch):
    """A tiny workspace: many row chunks per block, the last one ragged."""
    monkeypatch.setenv("MMLOSS_CHUNK_BYTES", "1KiB")


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


# ----------------------------------------------------------------------------- N = 1


@pytest.mark.parametrize("name", NEEDS_NEGATIVES)
def test_single_row_needs_negatives(name):
    loss = LOSSES[name]
    with pytest.raises(ValueError):
        loss.run(loss.build(1, 4, seed=43), "torch")


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
        (mmloss.DCLLoss(0.2, weights_by_distance)(out0, out1),
         F.dcl_loss(out0, out1, 0.2, weights_by_distance)),
        (mmloss.DCLWLoss(0.2, 0.9)(out0, out1), F.dclw_loss(out0, out1, 0.2, 0.9)),
        (mmloss.DHELLoss(0.4, False)(out0, out1), F.dhel_loss(out0, out1, 0.4, False)),
        (mmloss.MultiViewInfoNCELoss(0.2, False)(u), F.mv_infonce_loss(u, 0.2, False)),
        (mmloss.MultiViewDHELLoss(0.2)(u), F.mv_dhel_loss(u, 0.2)),
        (mmloss.HardNegativeLoss(0.4, 0.2, 0.5)(out0, out1), F.hcl_loss(out0, out1, 0.4, 0.2, 0.5)),
    ]
    for got, expected in pairs:
        assert torch.equal(got, expected)


def test_module_rejects_unknown_backend():
    with pytest.raises(ValueError):
        mmloss.DHELLoss(backend="nonexistent")


# ----------------------------------------------------------------------------- bad inputs of the two-view losses (one test each)


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


@pytest.mark.parametrize("name", TWO_VIEW)
def test_two_view_loss_called_with_embeddings_and_labels(name):
    """Issue 8 item 9: PML's (embeddings, labels) call style on a two-view loss says why it
    fails and where labels belong."""
    with pytest.raises(TypeError, match=r"two views out0, out1.*supcon_loss\(embeddings, labels\)"):
        LOSSES[name].fast(torch.randn(6, 4), torch.arange(6))


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


# ----------------------------------------------------------------------------- distributed keywords (single process)
# The gathered losses themselves run in spawned gloo ranks: tests/distributed/cases_ssl.py.


def _no_process_group():
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized())


@pytest.mark.parametrize("name", NAMES)
def test_distributed_none_and_auto_alone_are_the_local_loss(name):
    """Without a process group, None and "auto" (with or without uniform_shards) compute the
    loss of the given rows, bit for bit."""
    assert _no_process_group()
    loss = LOSSES[name]
    inputs = loss.build(6, 4, seed=71)
    plain = loss.run(inputs, "torch")
    for options in (dict(distributed=None), dict(distributed="auto"), dict(distributed="auto", uniform_shards=True)):
        assert torch.equal(loss.run(inputs, "torch", **options), plain), options


@pytest.mark.parametrize("name", NAMES)
def test_distributed_keywords_are_validated(name):
    """"ring" has no SSL form (ValueError naming it), unknown modes are refused, "gather" needs an
    initialised process group, group must be a ProcessGroup and uniform_shards a bool."""
    assert _no_process_group()
    loss = LOSSES[name]
    inputs = loss.build(6, 4, seed=72)
    with pytest.raises(ValueError, match="distributed='ring'"):
        loss.run(inputs, "torch", distributed="ring")
    with pytest.raises(ValueError, match=r"distributed must be one of .*'everywhere'"):
        loss.run(inputs, "torch", distributed="everywhere")
    with pytest.raises(RuntimeError, match="initialised"):
        loss.run(inputs, "torch", distributed="gather")
    with pytest.raises(TypeError, match=r"group must be .*ProcessGroup, got str"):
        loss.run(inputs, "torch", group="world")
    with pytest.raises(TypeError, match="uniform_shards must be a bool, got str"):
        loss.run(inputs, "torch", distributed="auto", uniform_shards="yes")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_distributed_options(name):
    """Modules: the mode is checked at construction; "ring" raises and "gather" needs a process
    group at forward; "auto" alone is the local loss; uniform_shards is stored."""
    assert _no_process_group()
    cls, _, loss_name = MODULES[name]
    inputs = LOSSES[loss_name].build(6, 4, seed=73)
    with pytest.raises(ValueError, match="distributed must be one of"):
        cls(distributed="everywhere")
    with pytest.raises(ValueError, match=rf"{name}: distributed='ring'"):
        cls(distributed="ring")(*inputs)
    with pytest.raises(RuntimeError, match=rf"{name}: distributed='gather' needs an initialised"):
        cls(distributed="gather")(*inputs)
    assert torch.equal(cls(distributed="auto", backend="torch")(*inputs), cls(backend="torch")(*inputs))
    assert cls(uniform_shards=True).uniform_shards is True and cls().uniform_shards is False
    with pytest.raises(TypeError, match="uniform_shards"):
        cls(uniform_shards=1)
