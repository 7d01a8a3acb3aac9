"""NT-Xent (docs/losses.md §4; mmloss/functional/ntxent.py, mmloss/losses/ntxent.py): reductions,
closed forms, N = 1, lightly's and pytorch-metric-learning's values, and lightly's memory bank.
The tests run over every SSL loss are in tests/test_ssl_common.py."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import mmloss
from _foundation_helpers import upstream
from memtrack import peak_bytes_above_start
from oracle import assert_grad_close, assert_loss_close, oracle
from ssl_helpers import check, closed_form_check, identical_rows, logit_bound_of, LOSSES, pml_losses, views

ref = mmloss.reference
F = mmloss.functional


# ----------------------------------------------------------------------------- values


def test_ntxent_reductions():
    loss = LOSSES["ntxent"]
    out0, out1 = loss.build(11, 9, seed=7)
    terms, _ = check(loss, [out0, out1], torch.float32, weights=upstream(22, 7), reduction="none")
    assert terms.shape == (22,)
    total, _ = check(loss, [out0, out1], torch.float32, reduction="sum")
    assert_loss_close(total, 22 * F.ntxent_loss(out0, out1), torch.float32, logit_bound=22 * logit_bound_of("ntxent"))


def test_autocast_bf16():
    out0, out1 = views(2, 7, 16, seed=12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = F.ntxent_loss(out0, out1, backend="torch")
    expected = ref.ntxent_loss(oracle(out0.to(torch.bfloat16)), oracle(out1.to(torch.bfloat16)))
    assert out.dtype == torch.float32
    assert_loss_close(out, expected, torch.bfloat16, logit_bound=logit_bound_of("ntxent"))


@pytest.mark.parametrize("n", [1, 2, 9])
def test_ntxent_identical_rows_is_log_2n_minus_1(n):
    """Every logit equals 1/τ: each anchor's LSE over 2N−1 others minus its positive."""
    closed_form_check(lambda t, be: (F.ntxent_loss(*t, 0.3, backend=be) if be else ref.ntxent_loss(*t, 0.3)),
                       identical_rows(n, 5), math.log(2 * n - 1))


def test_ntxent_single_pair_is_a_connected_zero():
    out0, out1 = views(2, 1, 5, seed=41)
    loss = F.ntxent_loss(out0, out1, backend="torch")
    assert float(loss.detach()) == 0.0
    grads = torch.autograd.grad(loss, [out0, out1])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert torch.equal(F.ntxent_loss(out0, out1, reduction="none"), torch.zeros(2))
    assert float(ref.ntxent_loss(oracle(out0), oracle(out1)).detach()) == 0.0


# ----------------------------------------------------------------------------- peers


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


def test_pytorch_metric_learning_ntxent():
    """PML's NTXentLoss on [z0; z1] with labels (arange(N), arange(N)) is NT-Xent."""
    pml = pml_losses()
    out0, out1 = views(2, 12, 9, seed=53)
    labels = torch.arange(12).repeat(2)
    a0, a1 = oracle(out0), oracle(out1)
    expected = pml.NTXentLoss(temperature=0.3)(torch.cat([a0, a1]), labels)
    got = F.ntxent_loss(out0, out1, 0.3)
    assert_loss_close(got, expected, torch.float32, logit_bound=1 / 0.3)
    for g, e in zip(torch.autograd.grad(got, [out0, out1]), torch.autograd.grad(expected, [a0, a1])):
        assert_grad_close(g, e, torch.float32)


# ----------------------------------------------------------------------------- module and bad calls


def test_module_refuses_distributed_gather():
    """Without a process group, "gather" raises rather than return a rank-local loss."""
    with pytest.raises(RuntimeError):
        mmloss.NTXentLoss(distributed="gather")(*views(2, 4, 3))


def test_ntxent_unknown_reduction():
    with pytest.raises(ValueError):
        F.ntxent_loss(*views(2, 4, 3), reduction="batchmean")


def test_module_called_with_embeddings_and_labels():
    with pytest.raises(TypeError, match=r"ntxent_loss takes two views.*supcon_loss"):
        mmloss.NTXentLoss()(torch.randn(6, 4), torch.arange(6) % 2)


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


def test_gather_distributed_is_lightlys_flag():
    """Issue 10: gather_distributed=True (lightly: gather when world_size() > 1) is
    distributed="auto" — the local loss in a single process, bit for bit, memory bank included;
    an explicit distributed= wins; a non-bool is a TypeError. The gathered loss itself:
    tests/distributed/cases_ssl.py."""
    module = mmloss.NTXentLoss(gather_distributed=True)
    assert module.gather_distributed is True and module.distributed == "auto"
    assert mmloss.NTXentLoss(gather_distributed=True, distributed="gather").distributed == "gather"
    out0, out1 = views(2, 6, 5, seed=97)
    assert torch.equal(mmloss.NTXentLoss(0.3, 0, True)(out0, out1), F.ntxent_loss(out0, out1, 0.3))
    torch.manual_seed(3)
    local = mmloss.NTXentLoss(0.3, (4, 5))
    torch.manual_seed(3)
    flagged = mmloss.NTXentLoss(0.3, (4, 5), True)
    for _ in range(2):
        assert torch.equal(flagged(out0, out1), local(out0, out1))
        assert torch.equal(flagged.bank, local.bank) and torch.equal(flagged.bank_ptr, local.bank_ptr)
    with pytest.raises(TypeError, match="gather_distributed must be a bool"):
        mmloss.NTXentLoss(gather_distributed=1)


def test_memory_bank_of_wrong_dimension():
    out0, out1 = views(2, 3, 4, seed=98)
    with pytest.raises(ValueError, match="feature"):
        F.ntxent_loss(out0, out1, memory_bank=torch.randn(5, 3))
