"""Acceptance tests of docs/losses.md §3: ``siglip_loss`` / ``SigLipLoss``.

``L = −(1/N) Σ_i Σ_j log sigmoid(z_ij·L_ij)`` with positives on the diagonal or by labels (ids
shared by both sides, or a pair (image_labels, text_labels) allowing N ≠ M). Every fast backend
is compared with the float64 reference ``mmloss.reference.siglip_loss`` (values and gradients of
features, logit scale and logit bias); closed forms check both; the module is checked against
open_clip's own ``SigLipLoss`` when open_clip is installed.
"""
from __future__ import annotations

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
    softplus,
    strided_rows,
    upstream,
)
from oracle import assert_grad_close, assert_loss_close, compare, oracle

ref = mmloss.reference



def check_siglip(backend, x, y, scale, bias, dtype, *, seed=0, **options):
    reduction = options.get("reduction", "mean")
    weights = upstream(x.shape[0], seed) if reduction == "none" else None
    return compare(
        lambda a, b, s, t: mmloss.siglip_loss(a, b, s, t, backend=backend, **options),
        lambda a, b, s, t: ref.siglip_loss(a, b, s, t, **options),
        [x, y, scale, bias], dtype, what="siglip_loss", weights=weights,
    )


# ----------------------------------------------------------------------------- against the reference


SIGLIP_SHAPES = [(1, 3), (7, 130), (129, 1), (300, 67)]


@backend_param()
@pytest.mark.parametrize("chunks", ["default", "small"])
@pytest.mark.parametrize("n,d", SIGLIP_SHAPES, ids=[f"N{n}-D{d}" for n, d in SIGLIP_SHAPES])
def test_siglip_shapes(backend, n, d, chunks, monkeypatch):
    if chunks == "small":
        monkeypatch.setenv("MMLOSS_CHUNK_BYTES", "1KiB")
    x, y = pair(n, n, d, seed=n + d)
    check_siglip(backend, x, y, scalar_tensor(10.0), scalar_tensor(-10.0), torch.float32, seed=n, reduction="none")


SCALES = {"float": lambda: 10.0, "0d-tensor": lambda: scalar_tensor(10.0)}
BIASES = {"none": lambda: None, "float": lambda: -10.0, "0d-tensor": lambda: scalar_tensor(-10.0)}


@backend_param()
@pytest.mark.parametrize("bias", list(BIASES), ids=[f"bias={b}" for b in BIASES])
@pytest.mark.parametrize("scale", list(SCALES), ids=[f"scale={s}" for s in SCALES])
def test_siglip_scale_and_bias_kinds(backend, scale, bias, small_chunks):
    x, y = pair(129, 129, 67, seed=1)
    check_siglip(backend, x, y, SCALES[scale](), BIASES[bias](), torch.float32, seed=1)


@backend_dtype_param(["fp16", "bf16", "fp64"])
def test_siglip_dtypes(backend, dtype, small_chunks):
    dt = DTYPES[dtype]
    x, y = pair(129, 129, 130, dtype=dt, seed=2)
    pdt = torch.float64 if dt == torch.float64 else torch.float32
    out, _ = check_siglip(backend, x, y, scalar_tensor(10.0, pdt), scalar_tensor(-10.0, pdt), dt, seed=2,
                          reduction="none")
    assert out.dtype == pdt


@backend_param()
@pytest.mark.parametrize("layout", ["colmajor", "strided"])
def test_siglip_noncontiguous(backend, layout, small_chunks):
    if layout == "colmajor":
        x, y = pair(129, 129, 67, seed=3, noncontig=True)
    else:
        x, y = strided_rows(129, 67, seed=4), strided_rows(129, 67, seed=5)
    assert not x.is_contiguous() and not y.is_contiguous()
    check_siglip(backend, x, y, scalar_tensor(10.0), scalar_tensor(-5.0), torch.float32, seed=3, reduction="none")


@backend_dtype_param(["fp32", "bf16", "fp64"])
def test_siglip_confident_rows(backend, dtype, small_chunks):
    dt = DTYPES[dtype]
    x, y = confident_pair(129, 67, dtype=dt, seed=6)
    pdt = torch.float64 if dt == torch.float64 else torch.float32
    check_siglip(backend, x, y, scalar_tensor(100.0, pdt), scalar_tensor(-10.0, pdt), dt, seed=4, reduction="none")


# ----------------------------------------------------------------------------- labels


@backend_param()
@pytest.mark.parametrize("n,classes", [(129, 10), (300, 300), (7, 1)], ids=["N129-C10", "N300-C300", "N7-C1"])
def test_siglip_label_ids(backend, n, classes, small_chunks):
    x, y = pair(n, n, 67, seed=7)
    check_siglip(backend, x, y, scalar_tensor(10.0), scalar_tensor(-10.0), torch.float32, seed=5,
                 labels=ids(n, classes, 1), reduction="none")


@backend_param()
@pytest.mark.parametrize("n,m", [(7, 129), (300, 129), (129, 129), (1, 7)],
                         ids=["N7-M129", "N300-M129", "N129-M129", "N1-M7"])
def test_siglip_label_pair(backend, n, m, small_chunks):
    x, y = pair(n, m, 130, seed=8)
    labels = (ids(n, 6, 2), ids(m, 6, 3))
    check_siglip(backend, x, y, scalar_tensor(10.0), scalar_tensor(-10.0), torch.float32, seed=6,
                 labels=labels, reduction="none")
    # A list works like a tuple.
    a = mmloss.siglip_loss(x, y, 10.0, -10.0, labels=list(labels), backend=backend)
    b = mmloss.siglip_loss(x, y, 10.0, -10.0, labels=labels, backend=backend)
    assert_loss_close(a, b, torch.float32, "labels as a list")


@backend_param()
def test_siglip_identity_labels_equal_default(backend):
    x, y = pair(129, 129, 3, seed=9)
    a = mmloss.siglip_loss(x, y, 10.0, -10.0, backend=backend)
    b = mmloss.siglip_loss(x, y, 10.0, -10.0, labels=torch.arange(129), backend=backend)
    c = mmloss.siglip_loss(x, y, 10.0, -10.0, labels=(torch.arange(129), torch.arange(129)), backend=backend)
    assert_loss_close(b, a, torch.float32, "labels=arange vs default")
    assert_loss_close(c, a, torch.float32, "label pair of aranges vs default")


# ----------------------------------------------------------------------------- reductions


@backend_param()
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_siglip_reductions(backend, reduction, small_chunks):
    n = 129
    x, y = pair(n, n, 130, seed=10)
    s, b = scalar_tensor(10.0), scalar_tensor(-10.0)
    check_siglip(backend, x, y, s, b, torch.float32, seed=7, reduction=reduction)
    mean = mmloss.siglip_loss(x, y, s, b, backend=backend)
    out = mmloss.siglip_loss(x, y, s, b, backend=backend, reduction=reduction)
    if reduction == "sum":
        assert out.shape == ()
        assert_loss_close(out, n * mean, torch.float32, "sum = N × mean")
    elif reduction == "none":
        assert out.shape == (n,)
        assert_loss_close(out.mean(), mean, torch.float32, "mean of none = mean")


@backend_dtype_param(["fp32", "bf16"])
def test_siglip_every_option(backend, dtype, small_chunks):
    """Strided N ≠ M inputs, tensor scale and bias, a label pair, reduction="none", small chunks."""
    dt = DTYPES[dtype]
    x, y = strided_rows(300, 130, dtype=dt, seed=11), strided_rows(129, 130, dtype=dt, seed=12)
    check_siglip(backend, x, y, scalar_tensor(20.0), scalar_tensor(-7.0), dt, seed=8,
                 labels=(ids(300, 40, 4), ids(129, 40, 5)), reduction="none")


GRADCHECK_OPTIONS = {
    "plain": {},
    "label-ids": dict(labels=torch.tensor([0, 1, 0, 2, 1])),
    "label-pair-N5-M4+none": dict(labels=(torch.tensor([0, 1, 0, 2, 1]), torch.tensor([1, 1, 2, 0])),
                                  reduction="none"),
}


@fp64_backend_param()
@pytest.mark.parametrize("options", list(GRADCHECK_OPTIONS))
def test_siglip_gradcheck(backend, options):
    """torch.autograd.gradcheck in float64 w.r.t. features, logit_scale and logit_bias."""
    kw = GRADCHECK_OPTIONS[options]
    m = 4 if options.startswith("label-pair") else 5
    inputs = gradcheck_inputs(5, m, 3, seed=2)
    assert torch.autograd.gradcheck(lambda x, y, s, b: mmloss.siglip_loss(x, y, s, b, backend=backend, **kw),
                                    inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@backend_param()
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_siglip_double_backward_raises(backend, reduction):
    """docs/design.md: double backward through the fused primitives raises a clear RuntimeError
    (never a silently missing second-order term)."""
    x, y = pair(7, 7, 3, seed=15)
    loss = mmloss.siglip_loss(x, y, 10.0, -10.0, reduction=reduction, backend=backend).sum()
    with pytest.raises(RuntimeError, match=r"(?i)double backward|higher.order|second.order|create_graph"):
        (gx,) = torch.autograd.grad(loss, [x], create_graph=True)
        gx.pow(2).sum().backward()


# ----------------------------------------------------------------------------- closed forms


@backend_param()
@pytest.mark.parametrize("n,d,s,b", [(1, 3, 5.0, None), (7, 67, 3.0, -2.0), (129, 130, 10.0, -10.0),
                                     (7, 67, 4.0, None)],
                         ids=["N1-nobias", "N7-b-2", "N129-b-10", "N7-nobias"])
def test_siglip_closed_form_identity(backend, n, d, s, b):
    """x = y = orthonormal rows: L_ii = s + b, L_ij = b, so the loss is
    softplus(−s−b) + (N−1)·softplus(b) (docs/losses.md §3; b = 0 without a bias)."""
    bias = 0.0 if b is None else b
    expected = torch.tensor(softplus(-s - bias) + (n - 1) * softplus(bias), dtype=torch.float64)
    x, y = orthonormal_rows(n, d), orthonormal_rows(n, d)
    assert_loss_close(mmloss.siglip_loss(x, y, s, b, backend=backend), expected, torch.float32, "closed form")
    assert_loss_close(ref.siglip_loss(oracle(x), oracle(y), s, b), expected, torch.float64, "reference")


@backend_param()
def test_siglip_closed_form_labels(backend):
    """With ids, row i has its own pair (s + b), k_i − 1 other positives (logit b) and N − k_i
    negatives (logit b): softplus(−s−b) + (k_i−1)·softplus(−b) + (N−k_i)·softplus(b)."""
    n, d, s, b = 7, 67, 6.0, -3.0
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    counts = [int((labels == labels[i]).sum()) for i in range(n)]
    terms = [softplus(-s - b) + (k - 1) * softplus(-b) + (n - k) * softplus(b) for k in counts]
    expected = torch.tensor(terms, dtype=torch.float64)
    x, y = orthonormal_rows(n, d), orthonormal_rows(n, d)
    got = mmloss.siglip_loss(x, y, s, b, labels=labels, backend=backend, reduction="none")
    assert_loss_close(got, expected, torch.float32, "closed form (terms)")
    assert_loss_close(ref.siglip_loss(oracle(x), oracle(y), s, b, labels=labels, reduction="none"), expected,
                      torch.float64, "reference")


# ----------------------------------------------------------------------------- the module


@backend_param()
def test_siglip_module(backend, small_chunks):
    x, y = pair(129, 129, 67, seed=13)
    s, b = scalar_tensor(10.0), scalar_tensor(-10.0)
    labels = ids(129, 20, 6)
    loss_fn = mmloss.SigLipLoss(False, 0, 1, None, backend=backend)  # open_clip's positional style
    out = loss_fn(x, y, s, b, output_dict=True)
    assert isinstance(out, dict) and set(out) == {"contrastive_loss"}, out
    assert torch.equal(out["contrastive_loss"], loss_fn(x, y, s, b))
    assert_loss_close(out["contrastive_loss"], mmloss.siglip_loss(x, y, s, b), torch.float32, "module")
    compare(lambda a, c, t, u: loss_fn(a, c, t, u, False, labels),
            lambda a, c, t, u: ref.siglip_loss(a, c, t, u, labels=labels),
            [x, y, s, b], torch.float32, what="SigLipLoss with labels")
    for impl in ("bidir", "shift", "reduce", "gather"):
        mmloss.SigLipLoss(dist_impl=impl)  # open_clip's dist_impl values are accepted


@backend_param()
def test_siglip_matches_open_clip(backend, small_chunks):
    """mmloss.SigLipLoss (fp32) against open_clip's SigLipLoss evaluated in float64."""
    oc = open_clip_loss_module()
    x, y = pair(129, 129, 67, seed=14)
    s, b = scalar_tensor(10.0), scalar_tensor(-10.0)
    ours = mmloss.SigLipLoss(backend=backend)(x, y, s, b, output_dict=True)
    rx, ry, rs, rb = oracle(x), oracle(y), oracle(s), oracle(b)
    theirs = oc.SigLipLoss()(rx, ry, rs, rb, output_dict=True)
    assert set(ours) == set(theirs) == {"contrastive_loss"}
    assert_loss_close(ours["contrastive_loss"], theirs["contrastive_loss"], torch.float32, "vs open_clip")
    got = torch.autograd.grad(ours["contrastive_loss"], [x, y, s, b])
    want = torch.autograd.grad(theirs["contrastive_loss"], [rx, ry, rs, rb])
    for name, a, e in zip(("image", "text", "logit_scale", "logit_bias"), got, want):
        assert_grad_close(a, e, torch.float32, f"grad {name} vs open_clip")
