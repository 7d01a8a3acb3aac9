"""docs/losses.md §9: ``symile_loss`` / ``SymileLoss`` (multilinear inner product, K ≥ 2 modalities).

The fast path (shuffled keys rebuilt in backward; "n_squared" streamed in candidate blocks) is
compared with the dense float64 reference ``mmloss.reference.symile_loss``, which builds the full
logits (for "n_squared" the whole N^{K−1} candidate table). Both draw the "n" permutations from
identically seeded generators.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mmloss
from oracle import assert_grad_close, assert_loss_close, compare, features, oracle, cpu_fast_backends

ref = mmloss.reference
HALF = [torch.float16, torch.bfloat16]


FAST = cpu_fast_backends()
FP64_BACKENDS = ("torch", "cpu", "reference")   # docs/design.md: the others take fp32/fp16/bf16


def reps_for(k: int, n: int, d: int, *, dtype=torch.float32, seed: int = 0, noncontig: bool = False):
    return [features(n, d, dtype=dtype, seed=seed + 17 * m, noncontig=noncontig) for m in range(k)]


def check(reps, scale, mode, dtype, *, backend="torch", seed=5, reduction="mean"):
    """Fast vs reference on the same inputs and identically seeded generators."""
    k = len(reps)
    weights = None
    if reduction == "none":
        weights = torch.linspace(0.5, 1.5, reps[0].shape[0], dtype=torch.float64)
    return compare(
        lambda *a: mmloss.symile_loss(list(a[:k]), a[k], mode, torch.Generator().manual_seed(seed),
                                      reduction=reduction, backend=backend),
        lambda *a: ref.symile_loss(list(a[:k]), a[k], mode, torch.Generator().manual_seed(seed), reduction=reduction),
        [*reps, scale], dtype, what=f"symile {mode} K={k}", weights=weights,
    )


def scale_tensor(value=4.0, dtype=torch.float32):
    return torch.tensor(value, dtype=dtype, requires_grad=True)


# ----------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("backend", FAST + ["reference"])
@pytest.mark.parametrize("mode", ["n", "n_squared"])
@pytest.mark.parametrize("k,n,d", [(2, 13, 67), (3, 5, 3), (3, 9, 1), (4, 4, 3)])
def test_matches_reference(backend, mode, k, n, d):
    dtype = torch.float64 if backend in FP64_BACKENDS else torch.float32
    check(reps_for(k, n, d, dtype=dtype, seed=n + d), scale_tensor(3.0, dtype), mode, dtype, backend=backend)


@pytest.mark.parametrize("mode", ["n", "n_squared"])
@pytest.mark.parametrize("k,n,d", [(2, 37, 130), (3, 11, 67)])
def test_matches_reference_fp32_noncontiguous(mode, k, n, d):
    check(reps_for(k, n, d, seed=1, noncontig=True), scale_tensor(10.0), mode, torch.float32)


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", ["n", "n_squared"])
def test_half_inputs_accumulate_in_fp32(dtype, mode):
    reps = reps_for(3, 10, 67, dtype=dtype, seed=3)
    out, _ = check(reps, scale_tensor(8.0), mode, dtype)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_reductions(reduction):
    check(reps_for(3, 7, 3, dtype=torch.float64, seed=2), scale_tensor(2.0, torch.float64), "n", torch.float64,
          reduction=reduction)


def test_every_non_default_option_at_once():
    """n_squared, K = 4, a (K, N, D) tensor input, non-contiguous, reduction="sum", fp32."""
    stacked = torch.stack([features(6, 67, seed=m).detach() for m in range(4)]).transpose(1, 2).contiguous()
    stacked = stacked.transpose(1, 2).requires_grad_()          # (K, N, D) with transposed strides
    assert not stacked.is_contiguous()
    scale = scale_tensor(5.0)
    out = mmloss.symile_loss(stacked, scale, negative_sampling="n_squared", reduction="sum", backend="torch")
    leaf_x, leaf_s = oracle(stacked), oracle(scale)
    expected = ref.symile_loss(leaf_x, leaf_s, "n_squared", reduction="sum")
    assert_loss_close(out, expected, torch.float32)
    got = torch.autograd.grad(out, [stacked, scale])
    for a, e in zip(got, torch.autograd.grad(expected, [leaf_x, leaf_s])):
        assert_grad_close(a, e, torch.float32)


def test_mixed_dtypes_promote():
    a = features(6, 3, dtype=torch.float16, seed=1)
    b = features(6, 3, dtype=torch.float32, seed=2)
    out = mmloss.symile_loss([a, b], 2.0, "n_squared", backend="torch")
    assert out.dtype == torch.float32
    expected = ref.symile_loss([oracle(a), oracle(b)], 2.0, "n_squared")
    assert_loss_close(out, expected, torch.float32)


# ----------------------------------------------------------------------------- closed forms


def test_two_modalities_n_squared_is_one_directional_infonce_per_anchor():
    x, y = features(9, 5, dtype=torch.float64, seed=1), features(9, 5, dtype=torch.float64, seed=2)
    out = mmloss.symile_loss([x, y], 6.0, "n_squared", backend="torch")
    expected = 0.5 * (ref.infonce_loss(x, y, 6.0) + ref.infonce_loss(y, x, 6.0))
    assert_loss_close(out, expected, torch.float64)


@pytest.mark.parametrize("mode,k", [("n", 3), ("n_squared", 3), ("n_squared", 4)])
def test_identical_rows_give_log_candidate_count(mode, k):
    """Every candidate equals the positive: CE = log(number of candidates)."""
    n = 5
    row = torch.nn.functional.normalize(torch.randn(1, 4, dtype=torch.float64), dim=1)
    reps = [row.expand(n, 4).clone().requires_grad_() for _ in range(k)]
    out = mmloss.symile_loss(reps, 3.0, mode, torch.Generator().manual_seed(0), backend="torch")
    candidates = n if mode == "n" else n ** (k - 1)
    assert abs(out.item() - math.log(candidates)) < 1e-12


def test_single_row_has_no_negatives_and_zero_loss():
    reps = reps_for(3, 1, 3, dtype=torch.float64)
    for mode in ("n", "n_squared"):
        out = mmloss.symile_loss(reps, scale_tensor(2.0, torch.float64), mode, backend="torch")
        assert out.item() == 0.0
        grads = torch.autograd.grad(out, reps)
        assert all(bool(torch.isfinite(g).all()) and float(g.abs().max()) == 0.0 for g in grads)


# ----------------------------------------------------------------------------- randomness


def test_n_is_reproducible_with_a_seeded_generator():
    reps = reps_for(3, 16, 8, dtype=torch.float64, seed=4)
    one = mmloss.symile_loss(reps, 5.0, "n", torch.Generator().manual_seed(11), backend="torch")
    two = mmloss.symile_loss(reps, 5.0, "n", torch.Generator().manual_seed(11), backend="torch")
    other = mmloss.symile_loss(reps, 5.0, "n", torch.Generator().manual_seed(12), backend="torch")
    assert torch.equal(one, two)
    assert not torch.equal(one, other)


def test_n_draws_k_times_k_minus_one_permutations_in_order():
    """The documented draw order: K·(K−1) randperm(N) calls, anchors in order, then others."""
    k, n = 3, 6
    reps = reps_for(k, n, 4, dtype=torch.float64, seed=9)
    gen = torch.Generator().manual_seed(21)
    out = mmloss.symile_loss(reps, 2.0, "n", gen, backend="torch")
    replay = torch.Generator().manual_seed(21)
    perms = [torch.randperm(n, generator=replay) for _ in range(k * (k - 1))]
    assert torch.equal(gen.get_state(), replay.get_state())
    # rebuild anchor 0's shuffled keys from the first K−1 draws and check its loss term
    s = 2.0
    terms = []
    for a in range(k):
        others = [reps[m] for m in range(k) if m != a]
        keys = torch.ones_like(reps[a])
        for r, p in zip(others, perms[a * (k - 1):(a + 1) * (k - 1)]):
            keys = keys * r[p]
        logits = s * reps[a] @ keys.T
        pos = s * (reps[0] * reps[1] * reps[2]).sum(1)
        logits = logits.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
        terms.append(torch.nn.functional.softplus(torch.logsumexp(logits, 1) - pos))
    assert_loss_close(out, torch.stack(terms).mean(0).mean(), torch.float64)


def test_default_generator_follows_the_global_seed():
    reps = reps_for(3, 8, 4, dtype=torch.float64, seed=2)
    torch.manual_seed(3)
    one = mmloss.symile_loss(reps, 2.0, "n", backend="torch")
    torch.manual_seed(3)
    two = mmloss.symile_loss(reps, 2.0, "n", backend="torch")
    assert torch.equal(one, two)


# ----------------------------------------------------------------------------- memory shape


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_n_squared_streams_without_the_candidate_table():
    """N = 64, K = 3: no tensor of N²·D elements (the Hadamard table) in forward or backward."""
    n, d = 64, 67
    reps = reps_for(3, n, d, seed=6)
    scale = scale_tensor(4.0)
    with LargestTensor() as mode:
        out = mmloss.symile_loss(reps, scale, "n_squared", backend="torch")
        grads = torch.autograd.grad(out, [*reps, scale])
    assert mode.largest < n * n * d // 4, f"largest tensor has {mode.largest} elements (table: {n * n * d})"
    leaves = [oracle(r) for r in reps] + [oracle(scale)]
    expected = ref.symile_loss(leaves[:3], leaves[3], "n_squared")
    assert_loss_close(out, expected, torch.float32)
    for a, e in zip(grads, torch.autograd.grad(expected, leaves)):
        assert_grad_close(a, e, torch.float32)


# ----------------------------------------------------------------------------- module


def test_module_matches_functional_and_reports_options():
    reps = reps_for(3, 7, 5, dtype=torch.float64, seed=8)
    loss = mmloss.SymileLoss(negative_sampling="n_squared", reduction="sum", backend="torch")
    assert torch.equal(loss(reps, 3.0), mmloss.symile_loss(reps, 3.0, "n_squared", reduction="sum", backend="torch"))
    assert "n_squared" in repr(loss)
    default = mmloss.SymileLoss()
    assert default.negative_sampling == "n" and default.distributed is None
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(default(reps, 3.0, generator=g1), mmloss.symile_loss(reps, 3.0, "n", g2))


@pytest.mark.parametrize("mode", ["n", "n_squared"])
def test_distributed_keywords_without_a_process_group(mode):
    """"auto" without a process group is the local loss, bit for bit (the same generator draws);
    "gather" needs a process group; "ring" has no form (ValueError naming "gather"). The
    gathered loss itself is checked by tests/distributed (spawned gloo ranks)."""
    reps = reps_for(3, 6, 4, dtype=torch.float64, seed=9)
    for call in (lambda **kw: mmloss.symile_loss(reps, 3.0, mode, torch.Generator().manual_seed(2), **kw),
                 lambda **kw: mmloss.SymileLoss(mode, **kw)(reps, 3.0, torch.Generator().manual_seed(2))):
        assert torch.equal(call(distributed="auto"), call(distributed=None))
        with pytest.raises(RuntimeError, match="init_process_group"):
            call(distributed="gather")
        with pytest.raises(ValueError, match=r"ring.*gather"):
            call(distributed="ring")
        with pytest.raises(TypeError, match="uniform_shards"):
            call(uniform_shards=1)
    with pytest.raises(ValueError, match="distributed must be one of"):
        mmloss.SymileLoss(distributed="ddp")
    module = mmloss.SymileLoss(distributed="gather", uniform_shards=True)
    assert (module.distributed, module.uniform_shards) == ("gather", True)


# ----------------------------------------------------------------------------- bad inputs


def test_rejects_a_bare_matrix():
    with pytest.raises(ValueError, match="representations"):
        mmloss.symile_loss(features(4, 3), 1.0)


def test_rejects_a_non_sequence():
    with pytest.raises(TypeError, match="representations"):
        mmloss.symile_loss({"a": features(4, 3)}, 1.0)


def test_rejects_one_modality():
    with pytest.raises(ValueError, match="at least 2"):
        mmloss.symile_loss([features(4, 3)], 1.0)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        mmloss.symile_loss([features(4, 3), features(5, 3)], 1.0)


def test_rejects_integer_features():
    with pytest.raises(TypeError, match="float"):
        mmloss.symile_loss([features(4, 3), torch.ones(4, 3, dtype=torch.long)], 1.0)


def test_rejects_non_positive_scale():
    with pytest.raises(ValueError, match="logit_scale"):
        mmloss.symile_loss([features(4, 3), features(4, 3)], 0.0)


def test_rejects_unknown_sampling():
    with pytest.raises(ValueError, match="negative_sampling"):
        mmloss.symile_loss([features(4, 3), features(4, 3)], 1.0, "n_cubed")


def test_rejects_non_generator():
    with pytest.raises(TypeError, match="generator"):
        mmloss.symile_loss([features(4, 3), features(4, 3)], 1.0, "n", generator=3)


def test_rejects_bad_reduction():
    with pytest.raises(ValueError, match="reduction"):
        mmloss.symile_loss([features(4, 3), features(4, 3)], 1.0, reduction="max")


def test_module_rejects_unknown_sampling():
    with pytest.raises(ValueError, match="negative_sampling"):
        mmloss.SymileLoss(negative_sampling="all")


# ----------------------------------------------------------------------------- NaN policy and scale range (issue 8)


@pytest.mark.parametrize("scale", [1e39, torch.tensor(1e39, dtype=torch.float64)])
def test_rejects_a_scale_that_overflows_the_compute_dtype(scale):
    """Issue 8, item 7: 1e39 passed the float64 finiteness check and gave NaN in fp32."""
    with pytest.raises(ValueError, match="logit_scale"):
        mmloss.symile_loss(reps_for(3, 4, 3), scale, "n", backend="torch")


def test_non_finite_inputs_propagate_unless_check_finite():
    reps = reps_for(3, 5, 3)
    with torch.no_grad():
        reps[1][3, 0] = float("nan")
    for mode in ("n", "n_squared"):
        assert torch.isnan(mmloss.symile_loss(reps, 2.0, mode, backend="torch"))
        with pytest.raises(ValueError, match=r"representations\[1\] .*representations\[1\]\[3, 0\]"):
            mmloss.symile_loss(reps, 2.0, mode, check_finite=True, backend="torch")
    scale = torch.tensor(float("inf"))
    with pytest.raises(ValueError, match="logit_scale"):
        mmloss.symile_loss(reps_for(3, 5, 3), scale, check_finite=True, backend="torch")
    module = mmloss.SymileLoss(check_finite=True, backend="torch")
    assert module.check_finite
    with pytest.raises(ValueError, match=r"representations\[1\]"):
        module(reps, 2.0)
