"""torch.compile of the self-supervised family (docs/losses.md §4 NT-Xent, §5 SupCon, §6 DCL/DCLW,
§7 DHEL, §8 MV-InfoNCE / MV-DHEL, §12 HCL) — issue 8, item 6.

Every loss compiles with ``fullgraph=True, dynamic=True``; ten steps with batch sizes 3…12
compile once (the stance is ``fail_on_recompile`` after the first step, forward and backward);
each step's value and gradients equal eager mode under docs/design.md's fp32 rule. The losses run
under the AOTAutograd backend ("aot_eager": dynamo, fake tensors, the custom ops' fake kernels
and the autograd.Functions traced with symbolic shapes, without code generation, which would
cost ~30 s a loss on two cores); NT-Xent, which reaches every autograd.Function of
``mmloss/functional/ssl_common.py`` (the blocks every SSL loss is built of) and
``similarity_lse``, also runs under inductor. The modules
compile with their float attributes and ``check_finite=True`` (skipped while compiling).

This directory runs in its own pytest process (scripts/run_tests.sh, stage "compile").
"""
from __future__ import annotations

import pytest
import torch

import mmloss
from oracle import assert_grad_close, assert_loss_close

F = mmloss.functional

STEPS = range(3, 13)  # ten batch sizes; the first compiles, the other nine must not recompile


def _views(v: int, n: int, d: int, seed: int):
    """V correlated (n, d) leaves with rows of random length (not unit rows)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g)
    return [((base + 0.7 * torch.randn(n, d, generator=g)) * (0.3 + 2.7 * torch.rand(n, 1, generator=g)))
            .requires_grad_() for _ in range(v)]


def _labels(n: int) -> torch.Tensor:
    return torch.arange(n) % 3


# name: (loss of a list of views, number of views, the largest |logit| L = (1+β)/τ of the case)
LOSSES = {
    "ntxent": (lambda t: F.ntxent_loss(t[0], t[1], 0.2), 2, 1 / 0.2),
    "supcon2d": (lambda t: F.supcon_loss(t[0], _labels(t[0].shape[0]), 0.3, 0.07), 1, 1 / 0.3),
    "supcon3d": (lambda t: F.supcon_loss(torch.stack(t, dim=1), temperature=0.3), 3, 1 / 0.3),
    "dcl": (lambda t: F.dcl_loss(t[0], t[1], 0.3, lambda a, b: ((a - b) ** 2).sum(1)), 2, 1 / 0.3),
    "dclw": (lambda t: F.dclw_loss(t[0], t[1], 0.3, 0.8), 2, 1 / 0.3),
    "dhel": (lambda t: F.dhel_loss(t[0], t[1], 0.2), 2, 1 / 0.2),
    "hcl": (lambda t: F.hcl_loss(t[0], t[1], 0.3, 0.25, 0.5), 2, 1.5 / 0.3),
    "mv_infonce": (lambda t: F.mv_infonce_loss(t, 0.4, same_view_negatives=False), 3, 1 / 0.4),
    "mv_dhel": (lambda t: F.mv_dhel_loss(torch.stack(t), 0.4), 3, 1 / 0.4),
}


@pytest.fixture
def fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.set_stance("default")
    torch.compiler.reset()


def _steps_compile_once(loss_fn, n_views: int, L: float, backend: str, seed: int = 0):
    """Ten steps of ``loss_fn`` compiled (fullgraph, dynamic) against eager: values and
    gradients per step; after the first step any recompilation raises."""
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True, backend=backend)
    for step, n in enumerate(STEPS):
        inputs = _views(n_views, n, 5, seed + n)
        eager_inputs = [t.detach().clone().requires_grad_() for t in inputs]
        got = compiled(inputs)
        want = loss_fn(eager_inputs)
        assert_loss_close(got, want.detach().double(), torch.float32, f"compiled vs eager (N={n})",
                          logit_bound=L)
        w = 0.5 + torch.rand(got.shape, generator=torch.Generator().manual_seed(n))
        got_grads = torch.autograd.grad((got * w).sum(), inputs)
        want_grads = torch.autograd.grad((want * w).sum(), eager_inputs)
        for k, (a, e) in enumerate(zip(got_grads, want_grads)):
            assert_grad_close(a, e.double(), torch.float32, f"compiled grad of view {k} (N={n})")
        if step == 0:  # forward and backward graphs exist now
            torch.compiler.set_stance("fail_on_recompile")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_compiles_once_with_dynamic_batch_and_matches_eager(name, fresh_dynamo):
    loss_fn, n_views, L = LOSSES[name]
    _steps_compile_once(loss_fn, n_views, L, "aot_eager")


def test_ntxent_under_inductor(fresh_dynamo):
    """Generated code, with per-anchor terms (reduction="none") and a non-uniform upstream."""
    _steps_compile_once(lambda t: F.ntxent_loss(t[0], t[1], 0.3, reduction="none"), 2, 1 / 0.3, "inductor",
                        seed=100)


# name: (constructor, number of views, L)
MODULES = {
    "NTXentLoss": (lambda: mmloss.NTXentLoss(0.3, check_finite=True), 2, 1 / 0.3),
    "SupConLoss": (lambda: mmloss.SupConLoss(0.3, 0.07, check_finite=True), 2, 1 / 0.3),
    "DCLLoss": (lambda: mmloss.DCLLoss(0.3, check_finite=True), 2, 1 / 0.3),
    "DCLWLoss": (lambda: mmloss.DCLWLoss(0.3, 0.8, check_finite=True), 2, 1 / 0.3),
    "DHELLoss": (lambda: mmloss.DHELLoss(0.3, False, check_finite=True), 2, 1 / 0.3),
    "HardNegativeLoss": (lambda: mmloss.HardNegativeLoss(0.3, 0.2, 0.5, check_finite=True), 2, 1.5 / 0.3),
    "MultiViewInfoNCELoss": (lambda: mmloss.MultiViewInfoNCELoss(0.3, check_finite=True), 3, 1 / 0.3),
    "MultiViewDHELLoss": (lambda: mmloss.MultiViewDHELLoss(0.3, check_finite=True), 3, 1 / 0.3),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_compiles_once_with_dynamic_batch(name, fresh_dynamo):
    """Module float attributes (τ, σ, τ⁺, β) and check_finite=True inside one graph; the
    dynamo-only backend keeps this fast (the losses' graphs are checked above)."""
    make, n_views, L = MODULES[name]
    module = make()
    if name == "SupConLoss":
        call = lambda t: module(torch.stack(t, dim=1))  # noqa: E731
    elif n_views == 3:
        call = module
    else:
        call = lambda t: module(*t)  # noqa: E731
    compiled = torch.compile(call, fullgraph=True, dynamic=True, backend="eager")
    for step, n in enumerate(STEPS[:4]):
        inputs = _views(n_views, n, 4, 200 + n)
        got = compiled(inputs)
        assert_loss_close(got, call(inputs).detach().double(), torch.float32, f"{name} (N={n})",
                          logit_bound=L)
        got.backward()
        if step == 0:
            torch.compiler.set_stance("fail_on_recompile")


def test_function_with_float_temperature_argument(fresh_dynamo):
    """The temperature as an argument of the compiled function (a symbolic float under
    dynamic=True) rather than a constant of the traced code."""
    compiled = torch.compile(F.hcl_loss, fullgraph=True, dynamic=True, backend="eager")
    for step, n in enumerate(STEPS[:4]):
        a, b = _views(2, n, 4, 300 + n)
        got = compiled(a, b, 0.3, 0.2, 0.5)
        assert_loss_close(got, F.hcl_loss(a, b, 0.3, 0.2, 0.5).detach().double(), torch.float32,
                          logit_bound=1.5 / 0.3)
        got.backward()
        if step == 0:
            torch.compiler.set_stance("fail_on_recompile")


# ----------------------------------------------------------------------------- upstream pin

_EPS = 1e-12  # a module-level float, as functional/ssl.py (now ssl_common.py) had (_NORM_EPS) before the fix


class _ClampWithGlobalFloat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.sum(1).clamp_min(_EPS)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, None].expand(-1, 3)


def test_upstream_bug_module_float_read_in_two_autograd_functions(fresh_dynamo):
    """The root cause of the SSL compile crash (issue 8, item 6), pinned on torch's side: under
    dynamic=True dynamo makes a module-level float a symbolic input; realised inside the first
    application's forward subgraph, the second application reuses that proxy and dynamo fails
    with "lift_tracked_freevar_to_input should not be called on root SubgraphTracer" (torch 2.13,
    even with fullgraph=False). The SSL modules (functional/ssl_common.py and the losses built on
    it) therefore read no module-level float inside an autograd.Function (``norm_eps()`` returns a
    literal; Functions receive tensors).

    When this test fails, torch has fixed the bug: the rule in functional/ssl_common.py's
    docstring may be relaxed (keep the compile tests above)."""
    compiled = torch.compile(lambda a, b: _ClampWithGlobalFloat.apply(a) + _ClampWithGlobalFloat.apply(b),
                             dynamic=True, backend="eager")
    x, y = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    with pytest.raises(Exception, match="lift_tracked_freevar_to_input"):
        compiled(x, y)
