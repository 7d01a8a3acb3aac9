"""docs/losses.md §11: ``isogclr_loss`` / ``ISogCLRLoss`` (iSogCLR, per-sample temperatures).

Two oracles:
- ``mmloss.reference.isogclr_loss``: dense, explicit softmax weights on every negative, same
  state layout (values, gradients, objective and the in-place state update, every form);
- ``mmloss.reference.GCLossReference``: a line-by-line transcription of LibAUC's GCLoss_v1 /
  GCLoss_v2 with ``enable_isogclr=True`` in its own state layout, run step by step beside the
  module (loss, gradients, u, τ, momentum after every step).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import mmloss
from mmloss.functional.isogclr import isogclr_hyperparameters
from oracle import assert_grad_close, assert_loss_close, features, oracle, cpu_fast_backends

ref = mmloss.reference
HALF = [torch.float16, torch.bfloat16]


FAST = cpu_fast_backends()
FP64_BACKENDS = ("torch", "cpu")   # docs/design.md: the others take fp32/fp16/bf16


def fresh_state(size: int, bimodal: bool, dtype=torch.float64):
    sides = 2 if bimodal else 1
    tau = 0.01 if bimodal else 0.1
    return {"log_u": torch.zeros(size, sides, dtype=dtype), "tau": torch.full((size, sides), tau, dtype=dtype),
            "tau_momentum": torch.zeros(size, sides, dtype=dtype), "seen": torch.zeros(size, dtype=torch.bool),
            "running_max": torch.zeros(size, sides, dtype=dtype)}


def mode_of(bimodal: bool) -> str:
    """``isogclr_loss``'s ``mode`` for the dense reference's ``bimodal`` flag."""
    return "bimodal" if bimodal else "unimodal"


def call(fn, x, y, index, state, **options):
    return fn(x, y, index, state["log_u"], state["tau"], state["tau_momentum"], state["seen"],
              running_max=state["running_max"], **options)


def assert_states_close(fast, dense, dtype, eta=0.01):
    """fp64: each state vector to docs/design.md's gradient tolerance (relative to its largest entry).

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
        loss, objective = call(mmloss.isogclr_loss, x, y, index, fast, mode=mode_of(bimodal), form=form,
                               backend=backend)
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
    options = dict(form="paper", rho=2.0, gamma=0.5, beta=0.3, eta=0.05, tau_min=0.02, tau_max=0.2)
    fast, dense = fresh_state(10, True, torch.float32), fresh_state(10, True, torch.float32)
    for step in range(3):
        x = features(6, 3, dtype=torch.float64, seed=step, noncontig=True)
        y = features(6, 3, dtype=torch.float64, seed=step + 7, noncontig=True)
        index = torch.tensor([step, 3, 9, 5 + step, 8, 1])
        loss, objective = call(mmloss.isogclr_loss, x, y, index, fast, mode="bimodal", backend="torch", **options)
        expected, expected_objective = call(ref.isogclr_loss, oracle(x), oracle(y), index, dense, bimodal=True,
                                            **options)
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
    loss = mmloss.ISogCLRLoss(size, mode, backend="torch", state_dtype=torch.float64)
    assert bool((loss.tau == loss.tau_init).all())  # exact τ_init in fp64, as LibAUC's fp64 state
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
    fast = mmloss.ISogCLRLoss(2, tau_init=0.05, backend="torch", state_dtype=torch.float64)
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
    paper = mmloss.ISogCLRLoss(6, "bimodal", form="paper", backend="torch", state_dtype=torch.float64)
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


def test_module_refuses_a_distributed_loss_and_keeps_its_state():
    """iSogCLR has no distributed form: "gather" / "ring" (and "auto" under a world size > 1, see
    tests/distributed/test_defaults.py) raise a RuntimeError before the state is touched — never
    a silent rank-local loss. "auto" without a process group is the local loss."""
    x, y = unit_pairs(4, 3, seed=13)
    index = torch.tensor([0, 1, 2, 3])
    for mode in ("gather", "ring"):
        loss_fn = mmloss.ISogCLRLoss(6, distributed=mode)
        before = {k: b.clone() for k, b in loss_fn.state_dict().items()}
        with pytest.raises(RuntimeError, match=rf"distributed='{mode}' is not supported.*distributed=None"):
            loss_fn(x, y, index)
        after = loss_fn.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), mode
    assert torch.equal(mmloss.ISogCLRLoss(6, distributed="auto")(x, y, index), mmloss.ISogCLRLoss(6)(x, y, index))


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
        call(mmloss.isogclr_loss, features(3, 3), features(3, 3), torch.arange(3), _state(), mode="bimodal")


def test_rejects_a_non_bool_seen():
    state = _state()
    state["seen"] = torch.zeros(8)
    with pytest.raises(TypeError, match="seen"):
        call(mmloss.isogclr_loss, features(3, 3), features(3, 3), torch.arange(3), state)


def test_bimodal_libauc_needs_the_running_max():
    state = _state(bimodal=True)
    with pytest.raises(ValueError, match="running_max"):
        mmloss.isogclr_loss(features(3, 3), features(3, 3), torch.arange(3), state["log_u"], state["tau"],
                            state["tau_momentum"], state["seen"], mode="bimodal")


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


# ----------------------------------------------------------------------------- state integrity (issue 8)


def _snapshot(module):
    return {name: buf.clone() for name, buf in module.state_dict().items()}


def _assert_unchanged(module, before):
    for name, buf in module.state_dict().items():
        assert torch.equal(buf, before[name]), f"{name} changed"


def _module_after_a_step(mode="unimodal", size=10, **options):
    loss_fn = mmloss.ISogCLRLoss(size, mode, backend="torch", **options)
    loss_fn(features(4, 3, seed=20), features(4, 3, seed=21), torch.tensor([0, 2, 4, 6]))
    return loss_fn


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.int8])
@pytest.mark.parametrize("mode", ["unimodal", "bimodal"])
def test_any_integer_index_dtype_gives_the_int64_result(mode, dtype):
    """Issue 8, item 3: an int32 index wrote log u, τ and m, then failed in ``seen.index_fill_``:
    the next correct call returned 7.4333 instead of 7.4369."""
    narrow, wide = _module_after_a_step(mode), _module_after_a_step(mode)
    x, y, index = features(4, 3, seed=22), features(4, 3, seed=23), torch.tensor([1, 2, 7, 9])
    assert torch.equal(narrow(x, y, index.to(dtype)), wide(x, y, index))
    for name, buf in wide.state_dict().items():
        assert torch.equal(narrow.state_dict()[name], buf), name
    x2, y2 = features(4, 3, seed=24), features(4, 3, seed=25)
    assert torch.equal(narrow(x2, y2, index), wide(x2, y2, index))


@pytest.mark.parametrize("bad_index, error, match", [
    (torch.tensor([0, 1, 10, 2]), ValueError, r"index must lie in \[0, 10\)"),
    (torch.tensor([0, -1, 3, 2]), ValueError, r"index must lie in \[0, 10\)"),
    (torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError, "index must be an integer tensor"),
    (torch.tensor([True, False, True, False]), TypeError, "index must be an integer tensor"),
    (torch.tensor([[0, 1, 2, 3]]), ValueError, r"index must have shape \(4,\)"),
    (torch.tensor([0, 1, 2]), ValueError, r"index must have shape \(4,\)"),
    ([0, 1, 2, 3], TypeError, "index must be a torch.Tensor, got list"),
])
def test_bad_index_raises_before_any_state_write(bad_index, error, match):
    """Issue 8, items 3 and 9 (a list index raised AttributeError)."""
    loss_fn = _module_after_a_step("bimodal")
    before = _snapshot(loss_fn)
    with pytest.raises(error, match=match):
        loss_fn(features(4, 3, seed=26), features(4, 3, seed=27), bad_index)
    _assert_unchanged(loss_fn, before)


@pytest.mark.parametrize("mode", ["unimodal", "bimodal"])
def test_repeated_indices_get_their_first_occurrence_update(mode):
    """One update per distinct index, the one of its first occurrence; every row reads the
    state as it was before the step (issue 8, item 3: the last write used to win)."""
    size = 12
    x, y = features(5, 3, seed=30), features(5, 3, seed=31)
    for warm_up in (False, True):               # new indices, and indices seen before
        repeated, distinct = mmloss.ISogCLRLoss(size, mode, backend="torch"), \
            mmloss.ISogCLRLoss(size, mode, backend="torch")
        if warm_up:
            for m in (repeated, distinct):
                m(features(size, 3, seed=32), features(size, 3, seed=33), torch.arange(size))
            with torch.no_grad():                # rows 10 and 11 of the distinct run start as row 3
                for name in ("log_u", "tau", "tau_momentum", "running_max", "seen"):
                    getattr(distinct, name)[[10, 11]] = getattr(distinct, name)[3].clone()
        # rows 0, 2 and 4 share index 3; the distinct run gives rows 2 and 4 indices of their own
        loss = repeated(x, y, torch.tensor([3, 5, 3, 8, 3]))
        expected = distinct(x, y, torch.tensor([3, 5, 10, 8, 11]))
        assert torch.equal(loss, expected)                         # same state read by every row
        for name in ("log_u", "tau", "tau_momentum", "running_max", "seen"):
            got, want = getattr(repeated, name), getattr(distinct, name)
            for i in (3, 5, 8):
                assert torch.equal(got[i], want[i]), (name, i)
            if not warm_up:
                for i in (10, 11):                               # untouched by the repeated run
                    fresh = getattr(mmloss.ISogCLRLoss(size, mode), name)[i]
                    assert torch.equal(got[i], fresh), (name, i)
        assert not torch.equal(distinct.log_u[3], distinct.log_u[10])   # rows 0 and 2 differ: "first" matters


def test_repeated_indices_are_deterministic_in_the_write_order():
    """Every occurrence writes its group's first-occurrence values, so the scatter order of the
    duplicates cannot matter (on CUDA it is unspecified)."""
    from mmloss.functional.isogclr import first_occurrence

    index = torch.tensor([4, 1, 4, 4, 0, 1, 7])
    assert first_occurrence(index).tolist() == [0, 1, 0, 0, 4, 1, 6]


@pytest.mark.parametrize("mode", ["unimodal", "bimodal"])
def test_eval_mode_leaves_the_state_alone(mode):
    """Issue 8, item 4: under .eval() + no_grad ISogCLR updated τ, log u and seen."""
    loss_fn = _module_after_a_step(mode)
    trained = _module_after_a_step(mode)
    before = _snapshot(loss_fn)
    x, y, index = features(4, 3, seed=34), features(4, 3, seed=35), torch.tensor([0, 1, 2, 3])
    loss_fn.eval()
    with torch.no_grad():
        value = loss_fn(x, y, index)
    _assert_unchanged(loss_fn, before)
    assert torch.equal(value, trained(x, y, index).detach())    # the loss a training step would see
    assert torch.equal(loss_fn.objective, trained.objective)
    loss_fn.train()
    loss_fn(x, y, index)
    assert torch.equal(loss_fn.tau, trained.tau) and torch.equal(loss_fn.seen, trained.seen)


def test_update_state_in_eval_keeps_libauc_behaviour():
    loss_fn = _module_after_a_step(update_state_in_eval=True)
    trained = _module_after_a_step()
    x, y, index = features(4, 3, seed=36), features(4, 3, seed=37), torch.tensor([0, 1, 2, 3])
    loss_fn.eval()
    assert torch.equal(loss_fn(x, y, index), trained(x, y, index))
    for name, buf in trained.state_dict().items():
        assert torch.equal(loss_fn.state_dict()[name], buf), name


def test_functional_update_state_false_writes_nothing():
    state = fresh_state(8, True)
    before = {k: v.clone() for k, v in state.items()}
    x, y = features(4, 3, dtype=torch.float64, seed=38), features(4, 3, dtype=torch.float64, seed=39)
    loss, objective = call(mmloss.isogclr_loss, x, y, torch.arange(4), state, mode="bimodal", update_state=False)
    for name in state:
        assert torch.equal(state[name], before[name]), name
    expected, expected_objective = call(ref.isogclr_loss, oracle(x), oracle(y), torch.arange(4), fresh_state(8, True),
                                        bimodal=True)
    assert_loss_close(loss, expected, torch.float64)
    assert_loss_close(objective, expected_objective, torch.float64)


@pytest.mark.parametrize("bad", ["nan", "inf", "overflow"])
@pytest.mark.parametrize("mode", ["unimodal", "bimodal"])
def test_non_finite_updates_are_refused_before_any_write(mode, bad):
    loss_fn = _module_after_a_step(mode)
    before = _snapshot(loss_fn)
    x, y = features(4, 3, seed=40), features(4, 3, seed=41)
    if bad == "overflow":                        # finite features whose similarities overflow fp32
        y = (y.detach() * 1e30).requires_grad_()
        x = (x.detach() * 1e30).requires_grad_()
        match = "features_a and features_b give a non-finite iSogCLR state update"
    else:
        with torch.no_grad():
            y[2, 1] = float(bad)
        match = r"features_b \(4, 3\) has non-finite entries \(features_b\[2, 1\]"
    with pytest.raises(ValueError, match=match):
        loss_fn(x, y, torch.tensor([0, 1, 2, 3]))
    _assert_unchanged(loss_fn, before)
    loss_fn.eval()                               # no write, no refusal: NaN/Inf propagate
    with torch.no_grad():
        assert not bool(torch.isfinite(loss_fn(x, y, torch.tensor([0, 1, 2, 3]))))
    _assert_unchanged(loss_fn, before)


def test_device_path_gates_the_write_when_the_assert_is_deferred(monkeypatch):
    """Accelerators and compiled code cannot raise before the write without a host sync: the
    refusal is a device-side assert, reported later, and the write is gated on the same flag.
    Simulated on the CPU with the value checks off and an assert that does not fire."""
    import mmloss._validation as validation

    fired = []
    monkeypatch.setattr(validation, "value_checks_enabled", lambda *values: False)
    monkeypatch.setattr(torch, "_assert_async", lambda flag, message: fired.append((bool(flag), message)))
    for mode in ("unimodal", "bimodal"):
        gated, eager = _module_after_a_step(mode), _module_after_a_step(mode)
        before = _snapshot(gated)
        x, y = features(4, 3, seed=42), features(4, 3, seed=43)
        bad_y = y.detach().clone()
        bad_y[0, 0] = float("nan")
        fired.clear()
        gated(x, bad_y, torch.tensor([0, 1, 2, 3]))          # NaN: asserts fire, nothing written
        assert any(not ok and "non-finite" in message for ok, message in fired)
        _assert_unchanged(gated, before)
        fired.clear()
        gated(x, y, torch.tensor([0, 1, 12, 3]))              # out of range: asserts fire, nothing written
        assert any(not ok and "index must lie in" in message for ok, message in fired)
        _assert_unchanged(gated, before)
        fired.clear()
        index = torch.tensor([0, 5, 0, 3])
        assert torch.equal(gated(x, y, index), eager(x, y, index))   # a good step writes as eagerly
        assert all(ok for ok, _ in fired)
        for name, buf in eager.state_dict().items():
            assert torch.equal(gated.state_dict()[name], buf), name


def test_check_finite_names_the_tensor_even_without_a_write():
    state = _state()
    x, y = features(3, 3), features(3, 3)
    with torch.no_grad():
        x[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"features_a .*features_a\[1, 2\]"):
        call(mmloss.isogclr_loss, x, y, torch.arange(3), state, update_state=False, check_finite=True)
    loss_fn = mmloss.ISogCLRLoss(8, check_finite=True, backend="torch").eval()
    with pytest.raises(ValueError, match="features_a"):
        loss_fn(x, y, torch.arange(3))
    assert loss_fn.check_finite and not mmloss.ISogCLRLoss(8).check_finite


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double", "to_float64", "to_meta_half"])
def test_state_keeps_its_dtype_under_module_casts(cast):
    loss_fn = _module_after_a_step("bimodal")
    before = _snapshot(loss_fn)
    if cast == "to_float64":
        loss_fn.to(torch.float64)
    elif cast == "to_meta_half":
        loss_fn.to(device="meta", dtype=torch.float16)
        assert all(buf.device.type == "meta" for buf in loss_fn.buffers())    # moves still apply
    else:
        getattr(loss_fn, cast)()
    for name in ("log_u", "tau", "tau_momentum", "running_max"):
        assert getattr(loss_fn, name).dtype == torch.float32, name
    assert loss_fn.seen.dtype == torch.bool
    if cast != "to_meta_half":
        _assert_unchanged(loss_fn, before)                        # no rounding through a lower precision


def test_half_module_scores_half_features_with_an_fp32_state():
    half, plain = _module_after_a_step("bimodal").half(), _module_after_a_step("bimodal")
    x, y = features(4, 3, dtype=torch.float16, seed=44), features(4, 3, dtype=torch.float16, seed=45)
    index = torch.tensor([0, 1, 2, 3])
    assert torch.equal(half(x, y, index), plain(x, y, index))
    assert torch.equal(half.log_u, plain.log_u) and half.log_u.dtype == torch.float32


def test_state_survives_deepcopy_and_state_dict():
    import copy

    loss_fn = _module_after_a_step("bimodal", state_dtype=torch.float64)
    clone = copy.deepcopy(loss_fn)
    restored = mmloss.ISogCLRLoss(10, "bimodal", backend="torch", state_dtype=torch.float64)
    restored.load_state_dict(loss_fn.state_dict())
    x, y, index = features(4, 3, seed=46), features(4, 3, seed=47), torch.tensor([9, 2, 4, 1])
    expected = loss_fn(x, y, index)
    for other in (clone, restored):
        assert torch.equal(other(x, y, index), expected)
        for name, buf in loss_fn.state_dict().items():
            assert torch.equal(other.state_dict()[name], buf), name
    assert clone.log_u.data_ptr() != loss_fn.log_u.data_ptr()


def test_rejects_an_unsupported_state_dtype():
    with pytest.raises(TypeError, match="state_dtype"):
        mmloss.ISogCLRLoss(8, state_dtype=torch.float16)


def test_rejects_tau_min_whose_reciprocal_overflows_the_compute_dtype():
    """Issue 8, item 7: values that pass validation must not give NaN."""
    with pytest.raises(ValueError, match="tau_min"):
        call(mmloss.isogclr_loss, features(3, 3), features(3, 3), torch.arange(3), _state(), tau_min=1e-39)
    with pytest.raises(ValueError, match="tau_min"):
        mmloss.ISogCLRLoss(8, tau_min=1e-39, tau_max=0.5)


def test_bimodal_large_logits_are_as_accurate_as_dense_fp32():
    """Issue 8, item 7: τ = 0.01, ‖x‖ = 5 (|h|/τ up to 5000): the weights g/u were formed as
    exp(log g − log u) of two numbers of the logits' size, a loss error of ~8e-5 where the
    dense fp32 computation has ~1e-7. Held to 4× dense fp32's error + 1e-6 relative."""
    n, d, size = 12, 8, 12
    g = torch.Generator().manual_seed(0)
    fast, dense32, dense64 = (fresh_state(size, True, dt) for dt in (torch.float32, torch.float32, torch.float64))
    for step in range(4):
        x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1) * 5
        y = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1) * 5
        index = torch.randperm(size, generator=g)[:n]
        got, _ = call(mmloss.isogclr_loss, x, y, index, fast, mode="bimodal", backend="torch")
        rounded, _ = call(ref.isogclr_loss, x, y, index, dense32, bimodal=True)
        exact, _ = call(ref.isogclr_loss, x.double(), y.double(), index, dense64, bimodal=True)
        err, dense_err = abs(float(got) - float(exact)), abs(float(rounded) - float(exact))
        assert err <= 4 * dense_err + 1e-6 * abs(float(exact)), (
            f"step {step}: loss {float(got)!r} vs {float(exact)!r}: error {err:.3g}, dense fp32 {dense_err:.3g}")


def test_reference_paper_form_does_not_overflow_when_u_dwarfs_the_batch():
    """The dense reference shifted u by the batch's row max only: exp(log u_old − shift)
    overflowed (fp64) once the old u exceeded the batch by e^709, at τ = 0.01 and ‖x‖ = 5."""
    n, d, size = 12, 8, 12
    g = torch.Generator().manual_seed(0)
    fast, dense = fresh_state(size, True), fresh_state(size, True)
    for step in range(4):
        x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1) * 5
        y = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1) * 5
        index = torch.randperm(size, generator=g)[:n]
        got, _ = call(mmloss.isogclr_loss, x, y, index, fast, mode="bimodal", form="paper", backend="torch")
        expected, _ = call(ref.isogclr_loss, x, y, index, dense, bimodal=True, form="paper")
        assert_loss_close(got, expected, torch.float64, what=f"loss at step {step}")
        assert bool(torch.isfinite(dense["log_u"]).all())


# ----------------------------------------------------------------------------- mode and its deprecated alias (issue 9)


@pytest.mark.parametrize("mode", ["unimodal", "bimodal"])
def test_bimodal_alias_warns_and_behaves_as_mode(mode):
    """``isogclr_loss(bimodal=)`` is the deprecated spelling of ``mode=`` (the module's name):
    same loss, gradient, objective and state update, plus a DeprecationWarning."""
    x, y = features(5, 3, dtype=torch.float64, seed=50), features(5, 3, dtype=torch.float64, seed=51)
    index = torch.tensor([4, 0, 7, 2, 5])
    new, old = fresh_state(8, mode == "bimodal"), fresh_state(8, mode == "bimodal")
    for step in range(2):                                       # a first visit, then a seen one
        loss, objective = call(mmloss.isogclr_loss, x, y, index, new, mode=mode, backend="torch")
        with pytest.warns(DeprecationWarning, match="bimodal"):
            old_loss, old_objective = call(mmloss.isogclr_loss, x, y, index, old, bimodal=mode == "bimodal",
                                           backend="torch")
        assert torch.equal(loss, old_loss) and torch.equal(objective, old_objective), step
        for a, e in zip(torch.autograd.grad(loss, [x, y]), torch.autograd.grad(old_loss, [x, y])):
            assert torch.equal(a, e), step
        for name in new:
            assert torch.equal(new[name], old[name]), (step, name)


def test_mode_defaults_to_unimodal_without_a_warning():
    x, y = features(4, 3, dtype=torch.float64, seed=52), features(4, 3, dtype=torch.float64, seed=53)
    default, explicit = fresh_state(6, False), fresh_state(6, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # neither call nor the module warns
        got, _ = call(mmloss.isogclr_loss, x, y, torch.arange(4), default, backend="torch")
        expected, _ = call(mmloss.isogclr_loss, x, y, torch.arange(4), explicit, mode="unimodal", backend="torch")
        mmloss.ISogCLRLoss(6, "bimodal", backend="torch")(x, y, torch.arange(4))
    assert torch.equal(got, expected)


def test_mode_and_its_alias_together_are_a_type_error():
    with pytest.raises(TypeError, match="both mode= and its deprecated alias bimodal="):
        call(mmloss.isogclr_loss, features(3, 3), features(3, 3), torch.arange(3), _state(), mode="unimodal",
             bimodal=False)
    with pytest.raises(TypeError, match="both mode= and its deprecated alias bimodal="):
        isogclr_hyperparameters("bimodal", bimodal=True)


def test_bad_mode_and_bad_alias_are_rejected():
    with pytest.raises(ValueError, match="mode must be one of"):
        call(mmloss.isogclr_loss, features(3, 3), features(3, 3), torch.arange(3), _state(), mode="trimodal")
    with pytest.raises(TypeError, match="bimodal must be a bool"):
        call(mmloss.isogclr_loss, features(3, 3), features(3, 3), torch.arange(3), _state(), bimodal=1)


def test_hyperparameters_take_mode_and_the_deprecated_alias():
    assert isogclr_hyperparameters() == isogclr_hyperparameters("unimodal") == (0.3, 0.9, 0.9, 0.01, 0.05, 0.7)
    assert isogclr_hyperparameters(mode="bimodal") == (6.0, 0.9, 0.9, 0.01, 0.005, 0.05)
    for flag, mode in ((True, "bimodal"), (False, "unimodal")):
        with pytest.warns(DeprecationWarning, match="bimodal"):
            assert isogclr_hyperparameters(bimodal=flag, rho=1.0) == isogclr_hyperparameters(mode, rho=1.0)
        with pytest.warns(DeprecationWarning, match="bimodal"):           # the old positional flag
            assert isogclr_hyperparameters(flag) == isogclr_hyperparameters(mode)
