"""LOSSES.md §11: ``isogclr_loss`` / ``ISogCLRLoss`` (iSogCLR, per-sample temperatures).

Two oracles:
- ``mmloss.reference.isogclr_loss``: dense, explicit softmax weights on every negative, same
  state layout (values, gradients, objective and the in-place state update, every form);
- ``mmloss.reference.GCLossReference``: a line-by-line transcription of LibAUC's GCLoss_v1 /
  GCLoss_v2 with ``enable_isogclr=True`` in its own state layout, run step by step beside the
  module (loss, gradients, u, τ, momentum after every step).
"""
from __future__ import annotations

import pytest
import torch

import mmloss
from oracle import assert_grad_close, assert_loss_close, features, oracle, cpu_fast_backends

ref = mmloss.reference
HALF = [torch.float16, torch.bfloat16]


FAST = cpu_fast_backends()
FP64_BACKENDS = ("torch", "cpu")   # DESIGN.md: the others take fp32/fp16/bf16


def fresh_state(size: int, bimodal: bool, dtype=torch.float64):
    sides = 2 if bimodal else 1
    tau = 0.01 if bimodal else 0.1
    return {"log_u": torch.zeros(size, sides, dtype=dtype), "tau": torch.full((size, sides), tau, dtype=dtype),
            "tau_momentum": torch.zeros(size, sides, dtype=dtype), "seen": torch.zeros(size, dtype=torch.bool),
            "running_max": torch.zeros(size, sides, dtype=dtype)}


def call(fn, x, y, index, state, **options):
    return fn(x, y, index, state["log_u"], state["tau"], state["tau_momentum"], state["seen"],
              running_max=state["running_max"], **options)


def assert_states_close(fast, dense, dtype, eta=0.01):
    """fp64: each state vector to DESIGN.md's gradient tolerance (relative to its largest entry).

    Lower precision: log u, b and the momentum m are sums and differences of logits h/τ, about
    300 in size at τ = 0.005, and inherit their fp32 rounding (LibAUC's fp32 state does too):
    their error is held to 1e-4 (fp32) or 1e-2 (fp16/bf16 inputs) of the largest such magnitude,
    and τ, which moves by η·m, to η times that.
    """
    visited = dense["seen"]
    assert torch.equal(fast["seen"], visited)
    names = ("log_u", "tau_momentum", "running_max")
    if dtype == torch.float64:
        for name in names + ("tau",):
            assert_grad_close(fast[name][visited], dense[name][visited], dtype, what=name)
        return
    factor = 1e-2 if dtype in HALF else 1e-4
    magnitude = max(float(dense[name][visited].abs().max()) for name in names)
    for name, tol in [(name, factor * magnitude) for name in names] + [("tau", factor * eta * magnitude)]:
        err = float((fast[name][visited].double() - dense[name][visited].double()).abs().max())
        assert err <= tol, f"{name} ({dtype}): max abs error {err:.3g} > {tol:.3g}"


def run_steps(bimodal, form, dtype, *, n, d, size, steps, seed=0, noncontig=False, backend="torch"):
    """Several steps of the fast functional and the dense reference on the same batches."""
    fast, dense = fresh_state(size, bimodal), fresh_state(size, bimodal)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = features(n, d, dtype=dtype, seed=seed + 10 * step, noncontig=noncontig)
        y = features(n, d, dtype=dtype, seed=seed + 10 * step + 1, noncontig=noncontig)
        index = torch.randperm(size, generator=g)[:n]             # mixes new and seen samples
        loss, objective = call(mmloss.isogclr_loss, x, y, index, fast, bimodal=bimodal, form=form, backend=backend)
        xr, yr = oracle(x), oracle(y)
        expected, expected_objective = call(ref.isogclr_loss, xr, yr, index, dense, bimodal=bimodal, form=form)
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_loss_close(loss, expected, dtype, what=f"loss at step {step}")
        assert_loss_close(objective, expected_objective, dtype, what=f"objective at step {step}")
        for a, e in zip(torch.autograd.grad(loss, [x, y]), torch.autograd.grad(expected, [xr, yr])):
            assert_grad_close(a, e, dtype, what=f"gradient at step {step}")
        assert_states_close(fast, dense, dtype)
    return fast


# ----------------------------------------------------------------------------- against the dense reference


@pytest.mark.parametrize("form", ["libauc", "paper"])
@pytest.mark.parametrize("bimodal", [False, True], ids=["unimodal", "bimodal"])
@pytest.mark.parametrize("n,d", [(2, 1), (5, 3), (9, 67)])
def test_steps_match_dense_reference_fp64(bimodal, form, n, d):
    run_steps(bimodal, form, torch.float64, n=n, d=d, size=2 * n + 1, steps=3, seed=n + d)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("bimodal", [False, True], ids=["unimodal", "bimodal"])
def test_fast_backends_match_dense_reference(backend, bimodal):
    dtype = torch.float64 if backend in FP64_BACKENDS else torch.float32
    run_steps(bimodal, "libauc", dtype, n=7, d=3, size=9, steps=2, seed=5, backend=backend)


@pytest.mark.parametrize("bimodal", [False, True], ids=["unimodal", "bimodal"])
def test_fp32_noncontiguous(bimodal):
    run_steps(bimodal, "libauc", torch.float32, n=11, d=130, size=15, steps=2, seed=3, noncontig=True)


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bimodal", [False, True], ids=["unimodal", "bimodal"])
def test_half_inputs(dtype, bimodal):
    run_steps(bimodal, "libauc", dtype, n=8, d=67, size=8, steps=1, seed=4)


def test_every_non_default_option_at_once():
    """Bimodal, paper form, custom ρ/γ/β/η/τ range, fp32 state, non-contiguous inputs."""
    options = dict(bimodal=True, form="paper", rho=2.0, gamma=0.5, beta=0.3, eta=0.05, tau_min=0.02, tau_max=0.2)
    fast, dense = fresh_state(10, True, torch.float32), fresh_state(10, True, torch.float32)
    for step in range(3):
        x = features(6, 3, dtype=torch.float64, seed=step, noncontig=True)
        y = features(6, 3, dtype=torch.float64, seed=step + 7, noncontig=True)
        index = torch.tensor([step, 3, 9, 5 + step, 8, 1])
        loss, objective = call(mmloss.isogclr_loss, x, y, index, fast, backend="torch", **options)
        expected, expected_objective = call(ref.isogclr_loss, oracle(x), oracle(y), index, dense, **options)
        assert_loss_close(loss, expected, torch.float64)
        assert_loss_close(objective, expected_objective, torch.float64)
    assert_states_close(fast, dense, torch.float32, eta=0.05)


# ----------------------------------------------------------------------------- LibAUC, step by step


def unit_pairs(n, d, seed, *, same=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    y = x.clone() if same else torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return x.requires_grad_(), y.requires_grad_()


def module_in_fp64(size, mode):
    loss = mmloss.ISogCLRLoss(size, mode, backend="torch").double()
    loss.tau.fill_(loss.tau_init)                 # exact τ_init in fp64, as LibAUC's fp64 state
    return loss


@pytest.mark.parametrize("mode", ["unimodal", "bimodal"])
def test_module_follows_libauc_step_by_step(mode):
    """Epoch-like index sequences (LibAUC initialises u batch-wise: homogeneous batches)."""
    n, d, size = 6, 5, 12
    fast, libauc = module_in_fp64(size, mode), ref.GCLossReference(size, mode, normalize=False)
    g = torch.Generator().manual_seed(1)
    batches = [torch.arange(n), torch.arange(n, 2 * n)] + [torch.randperm(size, generator=g)[:n] for _ in range(4)]
    for step, index in enumerate(batches):
        x, y = unit_pairs(n, d, seed=step, same=step in (1, 3))   # confident pairs: LibAUC's u floor engages
        xr, yr = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
        loss, expected = fast(x, y, index), libauc(xr, yr, index)
        assert_loss_close(loss, expected, torch.float64, what=f"loss at step {step}")
        for a, e in zip(torch.autograd.grad(loss, [x, y]), torch.autograd.grad(expected, [xr, yr])):
            assert_grad_close(a, e, torch.float64, what=f"gradient at step {step}")
        seen = fast.seen
        assert_loss_close(fast.log_u[seen], libauc.log_u()[seen], torch.float64, what="log u")
        assert_loss_close(fast.tau, libauc.temperatures(), torch.float64, what="tau")
        assert_loss_close(fast.tau_momentum, libauc.momentum(), torch.float64, what="momentum")


def test_unimodal_weight_floor_is_libauc_behaviour():
    """Antipodal negatives at τ = 0.05: u = e^{−20} < 1e-8, GCLoss_v1's floor in its weights."""
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64), dim=1)
    x = torch.cat([e, -e]).requires_grad_()
    y = torch.cat([e, -e]).requires_grad_()
    fast = mmloss.ISogCLRLoss(2, tau_init=0.05, backend="torch").double()
    fast.tau.fill_(0.05)
    libauc = ref.GCLossReference(2, tau=0.05, normalize=False)
    loss, expected = fast(x, y, torch.arange(2)), libauc(x, y, torch.arange(2))
    assert_loss_close(loss, expected, torch.float64)
    assert_loss_close(fast.tau_momentum, libauc.momentum(), torch.float64)


def test_libauc_unimodal_normalises_inside():
    """GCLoss_v1 normalises its inputs: equal values for unit-norm features."""
    fast, libauc = module_in_fp64(8, "unimodal"), ref.GCLossReference(8, "unimodal")
    x, y = unit_pairs(8, 3, seed=2)
    assert_loss_close(fast(x, y, torch.arange(8)), libauc(x * 1.0, y * 1.0, torch.arange(8)), torch.float64)


def test_bimodal_clamp_is_libauc_behaviour():
    """Confident pairs at τ = 0.01: LibAUC's u floor (1e-20 in shifted units) sets the step;
    the paper form, without it, lands elsewhere."""
    x, y = unit_pairs(6, 4, seed=5, same=True)
    clamped = module_in_fp64(6, "bimodal")
    clamped(x, y, torch.arange(6))
    assert bool((clamped.log_u >= torch.log(torch.tensor(1e-20, dtype=torch.float64)) - 1e-9).all())
    paper = mmloss.ISogCLRLoss(6, "bimodal", form="paper", backend="torch").double()
    paper.tau.fill_(paper.tau_init)
    paper(x, y, torch.arange(6))
    assert not torch.allclose(clamped.log_u, paper.log_u)


# ----------------------------------------------------------------------------- module state


@pytest.mark.parametrize("mode", ["unimodal", "bimodal"])
def test_state_dict_round_trip(mode):
    size = 10
    first = mmloss.ISogCLRLoss(size, mode, backend="torch")
    for step in range(2):
        x, y = features(5, 3, seed=step), features(5, 3, seed=step + 4)
        first(x, y, torch.arange(step, step + 5))
    state = first.state_dict()
    assert set(state) == {"log_u", "tau", "tau_momentum", "seen", "running_max"}
    second = mmloss.ISogCLRLoss(size, mode, backend="torch")
    second.load_state_dict(state)
    x, y = features(5, 3, seed=9), features(5, 3, seed=10)
    index = torch.tensor([0, 2, 4, 6, 8])
    assert torch.equal(first(x, y, index), second(x, y, index))
    assert torch.equal(first.objective, second.objective)
    for name in state:
        assert torch.equal(getattr(first, name), getattr(second, name)), name


def test_defaults_follow_libauc():
    uni, bi = mmloss.ISogCLRLoss(4), mmloss.ISogCLRLoss(4, "bimodal")
    assert (uni.rho, uni.tau_min, uni.tau_max, uni.tau_init) == (0.3, 0.05, 0.7, 0.1)
    assert (bi.rho, bi.tau_min, bi.tau_max, bi.tau_init) == (6.0, 0.005, 0.05, 0.01)
    assert (uni.gamma, uni.beta, uni.eta, uni.form, uni.distributed) == (0.9, 0.9, 0.01, "libauc", None)
    assert uni.tau.shape == (4, 1) and bi.tau.shape == (4, 2)
    assert torch.allclose(bi.tau, torch.tensor(0.01))


def test_objective_attribute_and_no_grad_update():
    loss_fn = module_in_fp64(8, "unimodal")
    x, y = unit_pairs(4, 3, seed=3)
    with torch.no_grad():
        value = loss_fn(x, y, torch.arange(4))
    assert value.requires_grad is False and loss_fn.objective is not None
    dense = fresh_state(8, False)
    expected, expected_objective = call(ref.isogclr_loss, x.detach(), y.detach(), torch.arange(4), dense)
    assert_loss_close(value, expected, torch.float64)
    assert_loss_close(loss_fn.objective, expected_objective, torch.float64)
    assert bool(loss_fn.seen[:4].all()) and not bool(loss_fn.seen[4:].any())
    assert_loss_close(loss_fn.tau[:4], dense["tau"][:4], torch.float64)


def test_temperatures_stay_in_range():
    loss_fn = mmloss.ISogCLRLoss(6, "unimodal", eta=10.0, backend="torch")
    for step in range(3):
        loss_fn(features(6, 3, seed=step), features(6, 3, seed=step + 3), torch.arange(6))
    assert bool((loss_fn.tau >= 0.05).all()) and bool((loss_fn.tau <= 0.7).all())


# ----------------------------------------------------------------------------- bad inputs


def _state(size=8, bimodal=False):
    return fresh_state(size, bimodal, torch.float32)


def test_rejects_a_single_row():
    with pytest.raises(ValueError, match="at least 2"):
        call(mmloss.isogclr_loss, features(1, 3), features(1, 3), torch.tensor([0]), _state())


def test_rejects_index_out_of_range():
    with pytest.raises(ValueError, match="index"):
        call(mmloss.isogclr_loss, features(3, 3), features(3, 3), torch.tensor([0, 1, 8]), _state())


def test_rejects_floating_index():
    with pytest.raises(TypeError, match="index"):
        call(mmloss.isogclr_loss, features(3, 3), features(3, 3), torch.tensor([0.0, 1.0, 2.0]), _state())


def test_rejects_index_of_another_length():
    with pytest.raises(ValueError, match="index"):
        call(mmloss.isogclr_loss, features(3, 3), features(3, 3), torch.tensor([0, 1]), _state())


def test_rejects_mismatched_views():
    with pytest.raises(ValueError, match="same shape"):
        call(mmloss.isogclr_loss, features(3, 3), features(4, 3), torch.tensor([0, 1, 2]), _state())


def test_rejects_state_of_the_wrong_mode():
    with pytest.raises(ValueError, match="log_u"):
        call(mmloss.isogclr_loss, features(3, 3), features(3, 3), torch.arange(3), _state(), bimodal=True)


def test_rejects_a_non_bool_seen():
    state = _state()
    state["seen"] = torch.zeros(8)
    with pytest.raises(TypeError, match="seen"):
        call(mmloss.isogclr_loss, features(3, 3), features(3, 3), torch.arange(3), state)


def test_bimodal_libauc_needs_the_running_max():
    state = _state(bimodal=True)
    with pytest.raises(ValueError, match="running_max"):
        mmloss.isogclr_loss(features(3, 3), features(3, 3), torch.arange(3), state["log_u"], state["tau"],
                            state["tau_momentum"], state["seen"], bimodal=True)


def test_rejects_gamma_out_of_range():
    with pytest.raises(ValueError, match="gamma"):
        call(mmloss.isogclr_loss, features(3, 3), features(3, 3), torch.arange(3), _state(), gamma=0.0)


def test_rejects_inverted_temperature_range():
    with pytest.raises(ValueError, match="tau_min"):
        mmloss.ISogCLRLoss(8, tau_min=0.5, tau_max=0.1)


def test_rejects_unknown_form():
    with pytest.raises(ValueError, match="form"):
        mmloss.ISogCLRLoss(8, form="v3")


def test_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        mmloss.ISogCLRLoss(8, "trimodal")


def test_rejects_empty_dataset():
    with pytest.raises(ValueError, match="dataset_size"):
        mmloss.ISogCLRLoss(0)


def test_rejects_string_rho():
    with pytest.raises(TypeError, match="rho"):
        mmloss.ISogCLRLoss(8, rho="0.3")
