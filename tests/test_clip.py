"""Acceptance tests of docs/losses.md §1: ``clip_loss`` / ``ClipLoss`` (symmetric InfoNCE).

Every fast backend is compared with the float64 reference ``mmloss.reference.clip_loss`` on the
same (rounded) inputs, values and gradients (features and logit scale), with docs/design.md's
tolerances; closed forms check the reference and the fast paths independently; the module is
checked against open_clip's own ``ClipLoss`` when open_clip is installed.
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
    open_clip_loss_module,
    orthonormal_rows,
    pair,
    scalar_tensor,
    strided_rows,
    upstream,
)
from oracle import assert_grad_close, assert_loss_close, compare, oracle

ref = mmloss.reference



def check_clip(backend, x, y, scale, dtype, *, bias=None, seed=0, **options):
    """Compare clip_loss with the reference; ``bias`` is passed as a constant (its gradient is
    checked separately: it must be exactly zero)."""
    reduction = options.get("reduction", "mean")
    weights = upstream(x.shape[0], seed) if reduction == "none" else None
    return compare(
        lambda a, b, s: mmloss.clip_loss(a, b, s, bias, backend=backend, **options),
        lambda a, b, s: ref.clip_loss(a, b, s, bias, **options),
        [x, y, scale], dtype, what="clip_loss", weights=weights,
    )


# ----------------------------------------------------------------------------- against the reference


CLIP_SHAPES = [(1, 3), (7, 130), (129, 1), (300, 67)]


@backend_param()
@pytest.mark.parametrize("chunks", ["default", "small"])
@pytest.mark.parametrize("n,d", CLIP_SHAPES, ids=[f"N{n}-D{d}" for n, d in CLIP_SHAPES])
def test_clip_shapes(backend, n, d, chunks, monkeypatch):
    if chunks == "small":
        monkeypatch.setenv("MMLOSS_CHUNK_BYTES", "1KiB")
    x, y = pair(n, n, d, seed=n + d)
    check_clip(backend, x, y, scalar_tensor(14.0), torch.float32)


@backend_param()
@pytest.mark.parametrize("scale_kind", ["float", "0d-tensor"])
def test_clip_scale_kinds(backend, scale_kind, small_chunks):
    x, y = pair(129, 129, 67, seed=1)
    scale = 20.0 if scale_kind == "float" else scalar_tensor(20.0)
    check_clip(backend, x, y, scale, torch.float32, seed=1)


@backend_dtype_param(["fp16", "bf16", "fp64"])
def test_clip_dtypes(backend, dtype, small_chunks):
    dt = DTYPES[dtype]
    x, y = pair(129, 129, 130, dtype=dt, seed=2)
    scale = scalar_tensor(30.0, torch.float64 if dt == torch.float64 else torch.float32)
    out, _ = check_clip(backend, x, y, scale, dt, seed=2)
    assert out.dtype == (torch.float64 if dt == torch.float64 else torch.float32)


@backend_param()
@pytest.mark.parametrize("layout", ["colmajor", "strided"])
def test_clip_noncontiguous(backend, layout, small_chunks):
    if layout == "colmajor":
        x, y = pair(129, 129, 67, seed=3, noncontig=True)
    else:
        x, y = strided_rows(129, 67, seed=6), strided_rows(129, 67, seed=7)
    assert not x.is_contiguous() and not y.is_contiguous()
    check_clip(backend, x, y, scalar_tensor(10.0), torch.float32, seed=3, reduction="none")


@backend_dtype_param(["fp32", "bf16", "fp64"])
def test_clip_confident_rows(backend, dtype, small_chunks):
    """scale 100 on near-identical pairs: per-row losses around e^{-60} keep relative precision
    and the positives' gradients do not cancel (softplus form, docs/design.md numerics).
    (fp16 is left out: gradients of order 1e-25 underflow fp16, whatever the kernel does.)"""
    dt = DTYPES[dtype]
    x, y = confident_pair(129, 67, dtype=dt, seed=4)
    scale_dtype = torch.float64 if dt == torch.float64 else torch.float32
    check_clip(backend, x, y, scalar_tensor(100.0, scale_dtype), dt, seed=4, reduction="none")
    out, expected = check_clip(backend, x, y, 100.0, dt, seed=5)
    # The absolute floor of the tolerance makes the value check vacuous at this size: the
    # softplus form keeps relative precision, which a cancelling LSE_all − L_ii form cannot.
    value, expected = float(out.detach()), float(expected.detach())
    assert 0 < expected < 1e-20
    rel = abs(value - expected) / expected
    assert rel <= (1e-10 if dt == torch.float64 else 1e-4), f"relative error {rel:.3g} of a confident loss"


# ----------------------------------------------------------------------------- options


@backend_param()
@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_clip_label_smoothing(backend, eps, small_chunks):
    x, y = pair(129, 129, 67, seed=5)
    check_clip(backend, x, y, scalar_tensor(12.0), torch.float32, seed=6, label_smoothing=eps,
               reduction="none")


@backend_param()
@pytest.mark.parametrize("classes", [3, 40, 129], ids=lambda c: f"classes={c}")
def test_clip_multi_positive_labels(backend, classes, small_chunks):
    x, y = pair(129, 129, 67, seed=6)
    check_clip(backend, x, y, scalar_tensor(12.0), torch.float32, seed=7, labels=ids(129, classes, 3),
               reduction="none")


@backend_param()
def test_clip_labels_with_label_smoothing(backend, small_chunks):
    x, y = pair(300, 300, 3, seed=7)
    check_clip(backend, x, y, scalar_tensor(12.0), torch.float32, seed=8, labels=ids(300, 25, 4),
               label_smoothing=0.2, reduction="none")


@backend_param()
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_clip_reductions(backend, reduction, small_chunks):
    n = 129
    x, y = pair(n, n, 130, seed=8)
    s = scalar_tensor(9.0)
    check_clip(backend, x, y, s, torch.float32, seed=9, reduction=reduction)
    mean = mmloss.clip_loss(x, y, s, backend=backend)
    out = mmloss.clip_loss(x, y, s, backend=backend, reduction=reduction)
    if reduction == "sum":
        assert out.shape == ()
        assert_loss_close(out, n * mean, torch.float32, "sum = N × mean")
    elif reduction == "none":
        assert out.shape == (n,)
        assert_loss_close(out.mean(), mean, torch.float32, "mean of none = mean")
    else:
        assert out.shape == ()


@backend_param()
def test_clip_logit_bias_has_zero_gradient_in_graph(backend):
    """logit_bias is a softmax no-op accepted for DDP: in the graph, gradient exactly 0."""
    x, y = pair(129, 129, 67, seed=9)
    s, b = scalar_tensor(10.0), scalar_tensor(-3.0)
    with_bias = mmloss.clip_loss(x, y, s, b, backend=backend)
    without = mmloss.clip_loss(x, y, s, backend=backend)
    assert_loss_close(with_bias, without, torch.float32, "bias is a no-op")
    with_bias.backward()
    assert b.grad is not None, "logit_bias is not part of the autograd graph"
    assert torch.equal(b.grad, torch.zeros_like(b)), f"logit_bias gradient {b.grad}"
    # With labels and smoothing too.
    b.grad = None
    mmloss.clip_loss(x, y, s, b, labels=ids(129, 10, 1), label_smoothing=0.1, backend=backend).backward()
    assert b.grad is not None and torch.equal(b.grad, torch.zeros_like(b))


@backend_dtype_param(["fp32", "bf16"])
def test_clip_every_option(backend, dtype, small_chunks):
    """Strided features, tensor scale, logit_bias, labels, label_smoothing, reduction="none",
    small chunks, all at once."""
    dt = DTYPES[dtype]
    x, y = strided_rows(300, 130, dtype=dt, seed=10), strided_rows(300, 130, dtype=dt, seed=11)
    check_clip(backend, x, y, scalar_tensor(25.0), dt, bias=-4.0, seed=10, labels=ids(300, 60, 5),
               label_smoothing=0.15, reduction="none")


GRADCHECK_OPTIONS = {
    "plain": {},
    "smoothing": dict(label_smoothing=0.2),
    "labels": dict(labels=torch.tensor([0, 1, 0, 2, 1])),
    "labels+smoothing+none": dict(labels=torch.tensor([0, 1, 0, 2, 1]), label_smoothing=0.1, reduction="none"),
}


@fp64_backend_param()
@pytest.mark.parametrize("options", list(GRADCHECK_OPTIONS))
def test_clip_gradcheck(backend, options):
    """torch.autograd.gradcheck in float64 w.r.t. features, logit_scale and logit_bias."""
    inputs = gradcheck_inputs(5, 5, 3, seed=1)
    kw = GRADCHECK_OPTIONS[options]
    assert torch.autograd.gradcheck(lambda x, y, s, b: mmloss.clip_loss(x, y, s, b, backend=backend, **kw),
                                    inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@backend_param()
@pytest.mark.parametrize("options", ["plain", "labels+smoothing"])
def test_clip_double_backward_raises(backend, options):
    """docs/design.md: double backward through the fused primitives raises a clear RuntimeError."""
    x, y = pair(7, 7, 3, seed=17)
    kw = {} if options == "plain" else dict(labels=torch.tensor([0, 1, 0, 2, 1, 1, 3]), label_smoothing=0.1)
    loss = mmloss.clip_loss(x, y, 10.0, backend=backend, **kw)
    with pytest.raises(RuntimeError, match=r"(?i)double backward|higher.order|second.order|create_graph"):
        (gx,) = torch.autograd.grad(loss, [x], create_graph=True)
        gx.pow(2).sum().backward()


# ----------------------------------------------------------------------------- closed forms


def _identity_logits_lse(n: int, s: float) -> float:
    """LSE of a row with logit s once and 0 on the other n−1 columns."""
    return s + math.log1p((n - 1) * math.exp(-s))


@backend_param()
@pytest.mark.parametrize("n,d,s", [(1, 3, 5.0), (7, 67, 3.0), (129, 130, 8.0), (3, 3, 40.0)],
                         ids=["N1-D3", "N7-D67", "N129-D130", "N3-D3-s40"])
def test_clip_closed_form_identity(backend, n, d, s):
    """x = y = orthonormal rows: L_ii = s, L_ij = 0, so each row and column costs
    LSE − s = log(1 + (N−1)·e^{−s}) and so does the mean (docs/losses.md §1)."""
    expected = torch.tensor(math.log1p((n - 1) * math.exp(-s)), dtype=torch.float64)
    x, y = orthonormal_rows(n, d), orthonormal_rows(n, d)
    got = mmloss.clip_loss(x, y, s, backend=backend)
    assert_loss_close(got, expected, torch.float32, "clip closed form")
    assert_loss_close(ref.clip_loss(oracle(x), oracle(y), s), expected, torch.float64, "reference closed form")


@backend_param()
@pytest.mark.parametrize("eps", [0.0, 0.3])
@pytest.mark.parametrize("with_labels", [False, True], ids=["one-hot", "labels"])
def test_clip_closed_form_targets(backend, eps, with_labels):
    """Orthonormal rows with target (1−ε)·q + ε/N: each row costs LSE − [(1−ε)·s/k_i + ε·s/N],
    k_i the number of same-id columns (k_i = 1 without labels)."""
    n, d, s = 7, 67, 3.0
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    counts = [int((labels == labels[i]).sum()) if with_labels else 1 for i in range(n)]
    terms = [_identity_logits_lse(n, s) - ((1 - eps) * s / k + eps * s / n) for k in counts]
    expected = torch.tensor(terms, dtype=torch.float64)
    x, y = orthonormal_rows(n, d), orthonormal_rows(n, d)
    kw = dict(label_smoothing=eps, labels=labels if with_labels else None)
    got = mmloss.clip_loss(x, y, s, backend=backend, reduction="none", **kw)
    assert_loss_close(got, expected, torch.float32, "clip closed form (terms)")
    assert_loss_close(mmloss.clip_loss(x, y, s, backend=backend, **kw), expected.mean(), torch.float32, "mean")
    assert_loss_close(ref.clip_loss(oracle(x), oracle(y), s, reduction="none", **kw), expected, torch.float64,
                      "reference closed form")


# ----------------------------------------------------------------------------- the module


@backend_param()
def test_clip_module_output_dict(backend):
    x, y = pair(129, 129, 67, seed=12)
    s = scalar_tensor(10.0)
    loss_fn = mmloss.ClipLoss(backend=backend)
    out = loss_fn(x, y, s, output_dict=True)
    assert isinstance(out, dict) and set(out) == {"contrastive_loss"}, out
    plain = loss_fn(x, y, s)
    assert torch.equal(out["contrastive_loss"], plain)
    assert_loss_close(plain, mmloss.clip_loss(x, y, s, backend=backend), torch.float32, "module vs function")


@backend_param()
def test_clip_module_options(backend, small_chunks):
    """label_smoothing in the constructor, labels in forward, logit_bias positional."""
    x, y = pair(129, 129, 67, seed=13)
    labels = ids(129, 30, 6)
    loss_fn = mmloss.ClipLoss(label_smoothing=0.1, backend=backend)
    compare(lambda a, b, s: loss_fn(a, b, s, -2.0, False, labels),
            lambda a, b, s: ref.clip_loss(a, b, s, -2.0, labels=labels, label_smoothing=0.1),
            [x, y, scalar_tensor(10.0)], torch.float32, what="ClipLoss")


def test_clip_module_open_clip_positional_constructor():
    """open_clip's call style: ClipLoss(local_loss, gather_with_grad, cache_labels, rank,
    world_size, use_horovod) — all positional, single process."""
    x, y = pair(7, 7, 3, seed=14)
    loss_fn = mmloss.ClipLoss(True, True, True, 0, 1, False)
    assert_loss_close(loss_fn(x, y, 5.0), mmloss.clip_loss(x, y, 5.0), torch.float32, "positional ClipLoss")
    loss_fn = mmloss.ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=False, rank=0,
                              world_size=1, use_horovod=False)
    assert_loss_close(loss_fn(x, y, 5.0), mmloss.clip_loss(x, y, 5.0), torch.float32, "keyword ClipLoss")


def test_clip_module_horovod_raises():
    with pytest.raises((ValueError, RuntimeError, NotImplementedError), match=r"(?i)horovod"):
        mmloss.ClipLoss(use_horovod=True)


@pytest.mark.parametrize("module", ["ClipLoss", "SigLipLoss"])
def test_configured_world_size_guard(module):
    """world_size > 1 in the constructor: distributed="auto" raises a clear RuntimeError at
    forward (no silent local loss); distributed=None computes the local loss."""
    x, y = pair(7, 7, 3, seed=15)
    cls, fn = (mmloss.ClipLoss, mmloss.clip_loss) if module == "ClipLoss" else (mmloss.SigLipLoss, mmloss.siglip_loss)
    args = (x, y, 5.0, -1.0)
    with pytest.raises(RuntimeError, match=r"(?i)world.size|distributed|ranks"):
        cls(rank=1, world_size=2)(*args)
    local = cls(rank=1, world_size=2, distributed=None)(*args)
    assert_loss_close(local, fn(*args), torch.float32, f"{module} local loss")


# ----------------------------------------------------------------------------- open_clip


@backend_param()
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_clip_matches_open_clip(backend, with_bias, small_chunks):
    """mmloss.ClipLoss (fp32) against open_clip's ClipLoss evaluated in float64 on the same inputs."""
    oc = open_clip_loss_module()
    x, y = pair(129, 129, 67, seed=16)
    s = scalar_tensor(1 / 0.07)
    b = -5.0 if with_bias else None
    ours = mmloss.ClipLoss(backend=backend)(x, y, s, b, output_dict=True)
    rx, ry, rs = oracle(x), oracle(y), oracle(s)
    theirs = oc.ClipLoss()(rx, ry, rs, b, output_dict=True)
    assert set(ours) == set(theirs) == {"contrastive_loss"}
    assert_loss_close(ours["contrastive_loss"], theirs["contrastive_loss"], torch.float32, "vs open_clip")
    got = torch.autograd.grad(ours["contrastive_loss"], [x, y, s])
    want = torch.autograd.grad(theirs["contrastive_loss"], [rx, ry, rs])
    for name, a, e in zip(("image", "text", "logit_scale"), got, want):
        assert_grad_close(a, e, torch.float32, f"grad {name} vs open_clip")


def test_group_must_be_a_process_group():
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    for kw in (dict(distributed="auto", group="world"), dict(distributed=None, group=0)):
        with pytest.raises(TypeError, match="ProcessGroup"):
            mmloss.clip_loss(x, y, 2.0, **kw)
