"""Acceptance tests of docs/losses.md §2: ``infonce_loss`` / ``InfoNCELoss`` (one-directional InfoNCE).

Queries (N, D) against keys (M, D), M ≥ N allowed; positives from default targets (arange N),
explicit targets, query/key labels (multi-positive) or dense soft targets. Every fast backend is
compared with the float64 reference ``mmloss.reference.infonce_loss``; closed forms check both.
"""
from __future__ import annotations

import math

import pytest
import torch

import mmloss
from _foundation_helpers import (
    DTYPES,
    backend_dtype_param,
    backend_param,
    confident_pair,
    fp64_backend_param,
    gradcheck_inputs,
    ids,
    orthonormal_rows,
    pair,
    scalar_tensor,
    strided_rows,
    upstream,
)
from oracle import assert_loss_close, compare, features, oracle

ref = mmloss.reference



def check_infonce(backend, q, k, scale, dtype, *, seed=0, **options):
    reduction = options.get("reduction", "mean")
    weights = upstream(q.shape[0], seed) if reduction == "none" else None
    return compare(
        lambda a, b, s: mmloss.infonce_loss(a, b, s, backend=backend, **options),
        lambda a, b, s: ref.infonce_loss(a, b, s, **options),
        [q, k, scale], dtype, what="infonce_loss", weights=weights,
    )


def soft_targets(n: int, m: int, seed: int) -> torch.Tensor:
    """(n, m) rows summing to 1: mostly sparse-ish softmax rows, one one-hot row, one uniform row."""
    g = torch.Generator().manual_seed(50_000 + seed)
    logits = 3.0 * torch.randn(n, m, generator=g)
    q = torch.softmax(logits, dim=1)
    q[0] = 0.0
    q[0, m - 1] = 1.0
    if n > 1:
        q[1] = 1.0 / m
    return q


def key_labels_covering(m: int, classes: int, seed: int) -> torch.Tensor:
    """(m,) ids where every class in range(classes) occurs (m ≥ classes), in random order."""
    g = torch.Generator().manual_seed(60_000 + seed)
    return (torch.arange(m) % classes)[torch.randperm(m, generator=g)]


# ----------------------------------------------------------------------------- default targets


INFONCE_SHAPES = [(1, 1, 3), (1, 7, 130), (7, 129, 67), (129, 129, 1), (129, 300, 130), (300, 300, 3)]


@backend_param()
@pytest.mark.parametrize("chunks", ["default", "small"])
@pytest.mark.parametrize("n,m,d", INFONCE_SHAPES, ids=[f"N{n}-M{m}-D{d}" for n, m, d in INFONCE_SHAPES])
def test_infonce_shapes(backend, n, m, d, chunks, monkeypatch):
    if chunks == "small":
        monkeypatch.setenv("MMLOSS_CHUNK_BYTES", "1KiB")
    q, k = pair(n, m, d, seed=n + m + d)
    check_infonce(backend, q, k, scalar_tensor(14.0), torch.float32, seed=n, reduction="none")


@backend_param()
@pytest.mark.parametrize("scale_kind", ["float", "0d-tensor"])
def test_infonce_scale_kinds(backend, scale_kind, small_chunks):
    q, k = pair(129, 300, 67, seed=1)
    check_infonce(backend, q, k, 20.0 if scale_kind == "float" else scalar_tensor(20.0), torch.float32)


@backend_dtype_param(["fp16", "bf16", "fp64"])
def test_infonce_dtypes(backend, dtype, small_chunks):
    dt = DTYPES[dtype]
    q, k = pair(129, 300, 130, dtype=dt, seed=2)
    scale = scalar_tensor(30.0, torch.float64 if dt == torch.float64 else torch.float32)
    out, _ = check_infonce(backend, q, k, scale, dt, seed=2, reduction="none")
    assert out.dtype == (torch.float64 if dt == torch.float64 else torch.float32)


@backend_param()
@pytest.mark.parametrize("layout", ["colmajor", "strided"])
def test_infonce_noncontiguous(backend, layout, small_chunks):
    if layout == "colmajor":
        q, k = pair(129, 300, 67, seed=3, noncontig=True)
    else:
        q, k = strided_rows(129, 67, seed=4), strided_rows(300, 67, seed=5)
    assert not q.is_contiguous() and not k.is_contiguous()
    check_infonce(backend, q, k, scalar_tensor(10.0), torch.float32, seed=3, reduction="none")


@backend_dtype_param(["fp32", "bf16", "fp64"])
def test_infonce_confident_rows(backend, dtype, small_chunks):
    """scale 100; query i nearly equals key i; 171 extra random keys (a queue)."""
    dt = DTYPES[dtype]
    q, k_pos = confident_pair(129, 67, dtype=dt, seed=6)
    queue = features(171, 67, dtype=dt, seed=7)
    k = torch.cat([k_pos, queue])
    scale = scalar_tensor(100.0, torch.float64 if dt == torch.float64 else torch.float32)
    check_infonce(backend, q, k, scale, dt, seed=4, reduction="none")


# ----------------------------------------------------------------------------- explicit targets


@backend_param()
@pytest.mark.parametrize("kind", ["permutation", "injective-into-more-keys", "repeated", "more-queries-than-keys"])
def test_infonce_explicit_targets(backend, kind, small_chunks):
    g = torch.Generator().manual_seed(8)
    if kind == "permutation":
        n, m = 129, 129
        targets = torch.randperm(m, generator=g)
    elif kind == "injective-into-more-keys":
        n, m = 129, 300
        targets = torch.randperm(m, generator=g)[:n]
    elif kind == "repeated":
        n, m = 129, 300
        targets = torch.randint(0, 5, (n,), generator=g)
    else:  # explicit targets lift the M ≥ N requirement of the default
        n, m = 300, 7
        targets = torch.randint(0, m, (n,), generator=g)
    q, k = pair(n, m, 67, seed=9)
    check_infonce(backend, q, k, scalar_tensor(12.0), torch.float32, seed=5, targets=targets, reduction="none")


@backend_param()
def test_infonce_identity_targets_equal_default(backend):
    q, k = pair(129, 300, 3, seed=10)
    a = mmloss.infonce_loss(q, k, 9.0, backend=backend)
    b = mmloss.infonce_loss(q, k, 9.0, targets=torch.arange(129), backend=backend)
    assert_loss_close(a, b, torch.float32, "targets=arange(N) vs default")


def test_infonce_default_targets_need_enough_keys():
    q, k = pair(129, 7, 3, seed=11)
    with pytest.raises(ValueError, match=r"keys"):
        mmloss.infonce_loss(q, k, 5.0)


# ----------------------------------------------------------------------------- multi-positive / soft


@backend_param()
@pytest.mark.parametrize("n,m,classes", [(129, 300, 10), (300, 129, 129), (7, 7, 2)],
                         ids=["N129-M300-C10", "N300-M129-C129", "N7-M7-C2"])
def test_infonce_query_key_labels(backend, n, m, classes, small_chunks):
    q, k = pair(n, m, 67, seed=12)
    query_labels = ids(n, classes, 7)
    key_labels = key_labels_covering(m, classes, 8)
    check_infonce(backend, q, k, scalar_tensor(11.0), torch.float32, seed=6, query_labels=query_labels,
                  key_labels=key_labels, reduction="none")


@backend_param()
@pytest.mark.parametrize("n,m", [(129, 300), (7, 7), (300, 129)], ids=["N129-M300", "N7-M7", "N300-M129"])
def test_infonce_soft_targets(backend, n, m, small_chunks):
    q, k = pair(n, m, 130, seed=13)
    check_infonce(backend, q, k, scalar_tensor(11.0), torch.float32, seed=7, soft_targets=soft_targets(n, m, 1),
                  reduction="none")


# ----------------------------------------------------------------------------- reductions


@backend_param()
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("positives", ["default", "targets", "labels", "soft"])
def test_infonce_reductions(backend, reduction, positives, small_chunks):
    n, m = 129, 300
    q, k = pair(n, m, 67, seed=14)
    options = {
        "default": {},
        "targets": dict(targets=torch.randperm(m, generator=torch.Generator().manual_seed(1))[:n]),
        "labels": dict(query_labels=ids(n, 9, 9), key_labels=key_labels_covering(m, 9, 10)),
        "soft": dict(soft_targets=soft_targets(n, m, 2)),
    }[positives]
    s = scalar_tensor(8.0)
    check_infonce(backend, q, k, s, torch.float32, seed=8, reduction=reduction, **options)
    mean = mmloss.infonce_loss(q, k, s, backend=backend, **options)
    out = mmloss.infonce_loss(q, k, s, backend=backend, reduction=reduction, **options)
    if reduction == "sum":
        assert out.shape == ()
        assert_loss_close(out, n * mean, torch.float32, "sum = N × mean")
    elif reduction == "none":
        assert out.shape == (n,)
        assert_loss_close(out.mean(), mean, torch.float32, "mean of none = mean")


@backend_dtype_param(["fp32", "bf16"])
def test_infonce_every_option(backend, dtype, small_chunks):
    """Strided rectangular inputs, tensor scale, multi-positive labels, reduction="none", small chunks."""
    dt = DTYPES[dtype]
    q, k = strided_rows(129, 130, dtype=dt, seed=15), strided_rows(300, 130, dtype=dt, seed=16)
    check_infonce(backend, q, k, scalar_tensor(25.0), dt, seed=9, query_labels=ids(129, 30, 11),
                  key_labels=key_labels_covering(300, 30, 12), reduction="none")


GRADCHECK_OPTIONS = {
    "default-M7": dict(),
    "targets": dict(targets=torch.tensor([6, 0, 0, 3, 1])),
    "labels": dict(query_labels=torch.tensor([0, 1, 0, 2, 1]), key_labels=torch.tensor([2, 0, 1, 1, 0, 2, 0])),
    "soft+none": dict(soft_targets=torch.softmax(torch.arange(35, dtype=torch.float64).reshape(5, 7).sin(), dim=1),
                      reduction="none"),
}


@fp64_backend_param()
@pytest.mark.parametrize("options", list(GRADCHECK_OPTIONS))
def test_infonce_gradcheck(backend, options):
    """torch.autograd.gradcheck in float64 w.r.t. query, keys and logit_scale."""
    kw = GRADCHECK_OPTIONS[options]
    x, y, s, _ = gradcheck_inputs(5, 7, 3, seed=3)
    assert torch.autograd.gradcheck(lambda a, b, t: mmloss.infonce_loss(a, b, t, backend=backend, **kw),
                                    (x, y, s), eps=1e-6, atol=1e-8, rtol=1e-6)


# ----------------------------------------------------------------------------- closed forms


@backend_param()
@pytest.mark.parametrize("n,m,d,s", [(1, 1, 3, 5.0), (7, 67, 67, 3.0), (129, 130, 130, 8.0)],
                         ids=["N1-M1", "N7-M67", "N129-M130"])
def test_infonce_closed_form_identity(backend, n, m, d, s):
    """Orthonormal rows, query i = key i: L_ii = s, other logits 0, so each query costs
    log(1 + (M−1)·e^{−s}) (docs/losses.md §2)."""
    expected = torch.tensor(math.log1p((m - 1) * math.exp(-s)), dtype=torch.float64)
    q, k = orthonormal_rows(n, d), orthonormal_rows(m, d)
    assert_loss_close(mmloss.infonce_loss(q, k, s, backend=backend), expected, torch.float32, "closed form")
    assert_loss_close(ref.infonce_loss(oracle(q), oracle(k), s), expected, torch.float64, "reference")


@backend_param()
def test_infonce_closed_form_targets_labels_soft(backend):
    """Query i = e_{π(i)} against keys I_M: one logit s per row at key π(i), zeros elsewhere."""
    n, m, s = 7, 67, 4.0
    perm = [5, 0, 66, 3, 3, 12, 40]
    q, k = orthonormal_rows(n, 67, rows=perm), orthonormal_rows(m, 67)
    lse = s + math.log1p((m - 1) * math.exp(-s))
    # Explicit targets at the hot key: LSE − s.
    got = mmloss.infonce_loss(q, k, s, targets=torch.tensor(perm), backend=backend, reduction="none")
    assert_loss_close(got, torch.full((n,), lse - s, dtype=torch.float64), torch.float32, "targets")
    # Labels: the positives of query i are the keys with its id; target uniform over them.
    key_labels = torch.arange(m) % 4
    query_labels = torch.tensor([1, 0, 2, 3, 0, 0, 0])
    want = []
    for i in range(n):
        members = (key_labels == query_labels[i]).nonzero().flatten().tolist()
        want.append(lse - (s if perm[i] in members else 0.0) / len(members))
    got = mmloss.infonce_loss(q, k, s, query_labels=query_labels, key_labels=key_labels, backend=backend,
                              reduction="none")
    assert_loss_close(got, torch.tensor(want, dtype=torch.float64), torch.float32, "labels")
    # Soft targets: LSE − s·q_{i, π(i)}.
    soft = soft_targets(n, m, 3)
    got = mmloss.infonce_loss(q, k, s, soft_targets=soft, backend=backend, reduction="none")
    want = torch.tensor([lse - s * float(soft[i, perm[i]]) for i in range(n)], dtype=torch.float64)
    assert_loss_close(got, want, torch.float32, "soft targets")


# ----------------------------------------------------------------------------- the module


@backend_param()
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_infonce_module(backend, reduction, small_chunks):
    n, m = 129, 300
    q, k = pair(n, m, 67, seed=17)
    s = scalar_tensor(10.0)
    loss_fn = mmloss.InfoNCELoss(reduction=reduction, backend=backend)
    targets = torch.randperm(m, generator=torch.Generator().manual_seed(2))[:n]
    labels = dict(query_labels=ids(n, 9, 13), key_labels=key_labels_covering(m, 9, 14))
    soft = soft_targets(n, m, 4)
    pairs = [
        (loss_fn(q, k, s), mmloss.infonce_loss(q, k, s, reduction=reduction)),
        (loss_fn(q, k, s, targets), mmloss.infonce_loss(q, k, s, targets=targets, reduction=reduction)),
        (loss_fn(q, k, s, None, labels["query_labels"], labels["key_labels"]),
         mmloss.infonce_loss(q, k, s, reduction=reduction, **labels)),
        (loss_fn(q, k, s, soft_targets=soft), mmloss.infonce_loss(q, k, s, soft_targets=soft, reduction=reduction)),
    ]
    for got, want in pairs:
        assert_loss_close(got, want, torch.float32, "InfoNCELoss vs infonce_loss")
