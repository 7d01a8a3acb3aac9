"""Representation caching (mmloss.grad_cache_step): parameter gradients equal full-batch
training (float64, ≤ 1e-10), logit scale/bias included; dropout replays its RNG; BatchNorm
running statistics are updated once; DDP-style no_sync on every sub-batch but the last."""
from __future__ import annotations

import contextlib

import pytest
import torch

import mmloss
from memtrack import peak_bytes_above_start

DT = torch.float64


class Tower(torch.nn.Module):
    def __init__(self, d_in, d_out, dropout=0.0, batchnorm=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        layers = [torch.nn.Linear(d_in, 16)]
        if batchnorm:
            layers.append(torch.nn.BatchNorm1d(16))
        layers += [torch.nn.GELU(), torch.nn.Dropout(dropout), torch.nn.Linear(16, d_out)]
        self.net = torch.nn.Sequential(*layers).to(DT)

    def forward(self, x):
        return torch.nn.functional.normalize(self.net(x), dim=-1)


def _data(b=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 7, generator=g, dtype=DT), torch.randn(b, 5, generator=g, dtype=DT)


def _grads(*modules):
    return [p.grad.clone() for m in modules for p in m.parameters()]


def _zero(*modules):
    for m in modules:
        for p in m.parameters():
            p.grad = None


def _params():
    scale = torch.nn.Parameter(torch.tensor(2.3, dtype=DT))
    bias = torch.nn.Parameter(torch.tensor(-3.0, dtype=DT))
    return scale, bias


LOSSES = {
    "clip": lambda s, b: (lambda i, t: mmloss.clip_loss(i, t, s.exp(), backend="torch")),
    "siglip": lambda s, b: (lambda i, t: mmloss.siglip_loss(i, t, s.exp(), b, backend="torch")),
}


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("chunk", [5, 8, 24])
def test_gradients_equal_full_batch_training_fp64(loss_name, chunk):
    img, txt = _data()
    towers = Tower(7, 6, seed=1), Tower(5, 6, seed=2)
    scale, bias = _params()
    loss_fn = LOSSES[loss_name](scale, bias)

    full = loss_fn(towers[0](img), towers[1](txt))
    full.backward()
    expected = _grads(*towers) + [scale.grad.clone(), bias.grad.clone() if bias.grad is not None else None]
    _zero(*towers)
    scale.grad = bias.grad = None

    got_loss = mmloss.grad_cache_step(towers, [img, txt], loss_fn, chunk)
    got = _grads(*towers) + [scale.grad.clone(), bias.grad.clone() if bias.grad is not None else None]
    assert abs(float(got_loss) - float(full.detach())) <= 1e-12
    assert not got_loss.requires_grad
    for g, e in zip(got, expected):
        if e is None:
            assert g is None
            continue
        assert (g - e).abs().max() <= 1e-10 * max(1.0, e.abs().max())


def test_dropout_is_replayed_and_rng_ends_where_the_cache_pass_left_it():
    """With dropout, the replay draws the same masks: gradients equal a with-grad run over the
    same sub-batches in the same order (the RNG consumption of the cache pass)."""
    img, txt = _data(seed=3)
    towers = Tower(7, 6, dropout=0.3, seed=4), Tower(5, 6, dropout=0.3, seed=5)
    scale, _ = _params()
    loss_fn = LOSSES["clip"](scale, None)

    torch.manual_seed(123)
    reps = [torch.cat([t(c) for c in x.split(7)]) for t, x in zip(towers, (img, txt))]
    loss_fn(*reps).backward()
    after_reference = torch.get_rng_state()
    expected = _grads(*towers) + [scale.grad.clone()]
    _zero(*towers)
    scale.grad = None

    torch.manual_seed(123)
    mmloss.grad_cache_step(towers, [img, txt], loss_fn, 7)
    assert torch.equal(torch.get_rng_state(), after_reference)
    for g, e in zip(_grads(*towers) + [scale.grad], expected):
        assert (g - e).abs().max() <= 1e-10 * max(1.0, e.abs().max())

    # Without replay the masks differ, and so do the gradients (the test can see a mismatch).
    _zero(*towers)
    torch.manual_seed(123)
    mmloss.grad_cache_step(towers, [img, txt], loss_fn, 7, replay_rng=False)
    assert max((g - e).abs().max() for g, e in zip(_grads(*towers), expected)) > 1e-6


def test_batchnorm_running_stats_are_updated_once_per_sub_batch():
    """Rule: the cache pass updates the running statistics (once per sub-batch); the replay
    restores them. Gradients equal a with-grad run over the same sub-batches (BatchNorm uses
    sub-batch statistics, as per-GPU BatchNorm does under DDP)."""
    img, txt = _data(seed=6)
    towers = Tower(7, 6, batchnorm=True, seed=7), Tower(5, 6, batchnorm=True, seed=8)
    twins = Tower(7, 6, batchnorm=True, seed=7), Tower(5, 6, batchnorm=True, seed=8)
    scale, _ = _params()
    loss_fn = LOSSES["clip"](scale, None)

    reps = [torch.cat([t(c) for c in x.split(8)]) for t, x in zip(twins, (img, txt))]
    loss_fn(*reps).backward()
    expected = _grads(*twins)

    mmloss.grad_cache_step(towers, [img, txt], loss_fn, 8)
    for tower, twin in zip(towers, twins):
        bn, twin_bn = tower.net[1], twin.net[1]
        assert int(bn.num_batches_tracked) == 3 == int(twin_bn.num_batches_tracked)
        torch.testing.assert_close(bn.running_mean, twin_bn.running_mean, rtol=0, atol=1e-14)
        torch.testing.assert_close(bn.running_var, twin_bn.running_var, rtol=0, atol=1e-14)
    for g, e in zip(_grads(*towers), expected):
        assert (g - e).abs().max() <= 1e-10 * max(1.0, e.abs().max())


class _RecordingDDP(torch.nn.Module):
    """Stands in for DistributedDataParallel: records whether each forward ran in no_sync."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.syncing = True
        self.calls = []

    @contextlib.contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def forward(self, x):
        self.calls.append(torch.is_grad_enabled() and self.syncing)
        return self.module(x)


def test_ddp_encoders_sync_once_per_step():
    """Only the last replayed sub-batch of each DDP encoder runs outside no_sync (one all-reduce
    per step); a shared encoder (two views) syncs once, on its last use."""
    x0, x1 = _data(seed=9)[0], _data(seed=10)[0]
    shared = _RecordingDDP(Tower(7, 6, seed=11))
    mmloss.grad_cache_step([shared, shared], [x0, x1], lambda a, b: mmloss.ntxent_loss(a, b, 0.5), 10)
    # cache pass: 3 + 3 no-grad calls; replay: 5 in no_sync, the last one syncing.
    assert shared.calls == [False] * 6 + [False] * 5 + [True]


def test_works_with_mmloss_modules_and_tuple_inputs():
    img, txt = _data(seed=12)
    towers = Tower(7, 6, seed=13), Tower(5, 6, seed=14)
    loss = mmloss.ClipLoss(distributed=None)
    scale, _ = _params()
    fn = lambda i, t: loss(i, t, scale.exp())  # noqa: E731
    expected_loss = fn(towers[0](img), towers[1](txt))
    got = mmloss.grad_cache_step(towers, [(img,), {"x": txt}], fn, [6, 12])
    assert abs(float(got) - float(expected_loss.detach())) <= 1e-12


@pytest.mark.parametrize("kwargs,match", [
    ({"chunk_size": 0}, "chunk_size"),
    ({"chunk_size": [4]}, "chunk_size"),
    ({"inputs": "one"}, "one input per encoder"),
])
def test_bad_calls(kwargs, match):
    img, txt = _data(seed=15)
    args = {"encoders": [Tower(7, 6), Tower(5, 6)], "inputs": [img, txt],
            "loss_fn": lambda a, b: mmloss.clip_loss(a, b, 10.0), "chunk_size": 4}
    if kwargs.get("inputs") == "one":
        kwargs = {"inputs": [img]}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        mmloss.grad_cache_step(**args)


def test_peak_memory_is_one_sub_batch_of_activations():
    """Deterministic allocation tracking: a wide encoder's activations dominate; with chunk
    B/8 the step's peak is well under the full-batch step's."""
    torch.manual_seed(0)
    b, width = 512, 1024
    tower = torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.GELU(), torch.nn.Linear(width, width),
                                torch.nn.GELU(), torch.nn.Linear(width, 32))
    x0, x1 = torch.randn(b, 32), torch.randn(b, 32)
    fn = lambda a, c: mmloss.ntxent_loss(a, c, 0.5, backend="torch")  # noqa: E731

    def full():
        fn(tower(x0), tower(x1)).backward()

    def cached():
        mmloss.grad_cache_step([tower, tower], [x0, x1], fn, b // 8)

    full()
    cached()
    full_peak, _ = peak_bytes_above_start(full)
    cached_peak, _ = peak_bytes_above_start(cached)
    assert cached_peak < full_peak / 3, (cached_peak, full_peak)
