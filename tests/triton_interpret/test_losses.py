"""The losses built on the primitives, run with backend="triton" under TRITON_INTERPRET=1."""
import pytest
import torch

import mmloss.functional as F
import mmloss.reference as reference
from mmloss import ops
from oracle import compare, features

F32 = torch.float32


def _labels(n, classes, seed):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["plain", "labels", "smoothing_bias"])
def test_clip_loss(variant):
    n, d = 27, 19
    x, y = features(n, d, seed=1), features(n, d, seed=2, noncontig=True)
    s = torch.tensor(14.0, requires_grad=True)
    kw = {}
    b = None
    if variant == "labels":
        kw["labels"] = _labels(n, 5, 3)
    if variant == "smoothing_bias":
        kw["label_smoothing"] = 0.1
        b = torch.tensor(0.3)  # a softmax no-op: its exact-zero gradient is not compared

    def fast(x, y, s, b):
        return F.clip_loss(x, y, s, b, backend="triton", **kw)

    def ref(x, y, s, b):
        return reference.clip_loss(x, y, s, b, **kw)

    compare(fast, ref, [x, y, s, b], F32, f"clip_loss[{variant}]")


@pytest.mark.parametrize("variant", ["diagonal", "shared_labels", "label_pair"])
def test_siglip_loss(variant):
    n, m, d = 23, 23, 11
    kw = {}
    if variant == "shared_labels":
        kw["labels"] = _labels(n, 4, 5)
    if variant == "label_pair":
        m = 30
        kw["labels"] = (_labels(n, 4, 6), _labels(m, 4, 7))
    x, y = features(n, d, seed=3), features(m, d, seed=4)
    s = torch.tensor(10.0, requires_grad=True)
    b = torch.tensor(-10.0, requires_grad=True)

    def fast(x, y, s, b):
        return F.siglip_loss(x, y, s, b, backend="triton", **kw)

    def ref(x, y, s, b):
        return reference.siglip_loss(x, y, s, b, **kw)

    compare(fast, ref, [x, y, s, b], F32, f"siglip_loss[{variant}]")


@pytest.mark.parametrize("variant", ["targets_queue", "labels"])
def test_infonce_loss(variant):
    n, m, d = 21, 34, 9
    x, y = features(n, d, seed=5), features(m, d, seed=6)
    s = torch.tensor(12.0, requires_grad=True)
    if variant == "targets_queue":
        kw = dict(targets=torch.randperm(m, generator=torch.Generator().manual_seed(8))[:n])
    else:
        kw = dict(query_labels=_labels(n, 6, 9), key_labels=_labels(m, 6, 10))

    def fast(x, y, s):
        return F.infonce_loss(x, y, s, backend="triton", **kw)

    def ref(x, y, s):
        return reference.infonce_loss(x, y, s, **kw)

    compare(fast, ref, [x, y, s], F32, f"infonce_loss[{variant}]")


def test_siglip_deterministic_false_matches():
    n, d = 25, 7
    x, y = features(n, d, seed=11), features(n, d, seed=12)
    s = torch.tensor(10.0, requires_grad=True)
    b = torch.tensor(-8.0, requires_grad=True)

    def fast(x, y, s, b):
        # the public op with deterministic=False: dy by atomics in the row-owner pass
        return ops.pairwise_sigmoid(x, y, s, b, backend="triton", reduction="sum", deterministic=False) / n

    def ref(x, y, s, b):
        return reference.siglip_loss(x, y, s, b)

    compare(fast, ref, [x, y, s, b], F32, "siglip (fast mode)")
