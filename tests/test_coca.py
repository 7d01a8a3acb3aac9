"""CoCa (contrastive + captioning) against open_clip's ``CoCaLoss`` (loaded by file path): same
constructor arguments and defaults, forward signature, values, gradients and return types."""
from __future__ import annotations

import inspect

import pytest
import torch

import mmloss
from _foundation_helpers import open_clip_loss_module
from oracle import assert_grad_close, assert_loss_close, oracle

F = mmloss.functional


def _batch(n=6, d=5, t=4, vocab=11, seed=0, dtype=torch.float32, pad_id=0):
    g = torch.Generator().manual_seed(500 + seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    logits = 2.0 * torch.randn(n, t, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (n, t), generator=g)
    labels[0, -2:] = pad_id          # some padding
    labels[3, -1] = pad_id
    leaves = [v.to(dtype).requires_grad_() for v in (x, y, logits)]
    return (*leaves, labels)


def test_constructor_and_forward_signatures_match_open_clip():
    oc = open_clip_loss_module()
    theirs, ours = inspect.signature(oc.CoCaLoss.__init__), inspect.signature(mmloss.CoCaLoss.__init__)
    for name, param in theirs.parameters.items():
        assert ours.parameters[name].default == param.default, name
    assert list(ours.parameters)[:len(theirs.parameters)] == list(theirs.parameters)
    fwd_theirs, fwd_ours = inspect.signature(oc.CoCaLoss.forward), inspect.signature(mmloss.CoCaLoss.forward)
    assert list(fwd_ours.parameters) == list(fwd_theirs.parameters)
    assert fwd_ours.parameters["output_dict"].default is False


@pytest.mark.parametrize("weights", [(2.0, 1.0), (1.0, 0.5), (1.5, 0.0)])
@pytest.mark.parametrize("pad_id", [0, 3])
@pytest.mark.parametrize("output_dict", [False, True])
def test_matches_open_clip(weights, pad_id, output_dict):
    oc = open_clip_loss_module()
    caption_w, clip_w = weights
    x, y, logits, labels = _batch(seed=1, pad_id=pad_id)
    scale = torch.tensor(7.0, requires_grad=True)
    a, b, lg, s = (oracle(t) for t in (x, y, logits, scale))
    expected = oc.CoCaLoss(caption_w, clip_w, pad_id=pad_id)(a, b, lg, labels, s, output_dict=output_dict)
    got = mmloss.CoCaLoss(caption_w, clip_w, pad_id=pad_id)(x, y, logits, labels, scale, output_dict=output_dict)
    if output_dict:
        assert type(got) is dict and list(got) == list(expected) == ["contrastive_loss", "caption_loss"]
        got, expected = tuple(got.values()), tuple(expected.values())
    else:
        assert type(got) is tuple and len(got) == 2
    for g, e in zip(got, expected):
        assert g.shape == e.shape == ()
        assert g.dtype == (e.dtype if e.dtype == torch.int64 else torch.float32)
        assert_loss_close(g, e, torch.float32, logit_bound=7.0)
    if clip_w:
        total_got, total_exp = sum(got), sum(expected)
        leaves_got, leaves_exp = [x, y, logits, scale], [a, b, lg, s]
    else:   # open_clip's torch.tensor(0) has no graph: compare the caption term
        assert got[0].item() == 0 and got[0].dtype == torch.int64
        total_got, total_exp = got[1], expected[1]
        leaves_got, leaves_exp = [logits], [lg]
    for g, e in zip(torch.autograd.grad(total_got, leaves_got), torch.autograd.grad(total_exp, leaves_exp)):
        assert_grad_close(g, e, torch.float32)


def test_fp64_matches_open_clip_closely():
    oc = open_clip_loss_module()
    x, y, logits, labels = _batch(seed=2, dtype=torch.float64)
    expected = oc.CoCaLoss(2.0, 1.0)(x, y, logits, labels, 10.0)
    got = mmloss.CoCaLoss(2.0, 1.0, backend="torch")(x, y, logits, labels, 10.0)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_functional_matches_module():
    x, y, logits, labels = _batch(seed=3)
    module = mmloss.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)(x, y, logits, labels, 5.0)
    functional = F.coca_loss(x, y, logits, labels, 5.0, caption_loss_weight=2.0, clip_loss_weight=1.0)
    for m, f in zip(module, functional):
        assert torch.equal(m, f)
    assert torch.equal(functional[0], mmloss.clip_loss(x, y, 5.0))


def test_caption_pad_none_ignores_nothing():
    _, _, logits, labels = _batch(seed=4)
    expected = torch.nn.functional.cross_entropy(logits.permute(0, 2, 1), labels)
    assert torch.equal(F.caption_loss(logits, labels, None), expected)


def test_module_refuses_silent_local_loss_under_world_size():
    x, y, logits, labels = _batch(seed=5)
    with pytest.raises(RuntimeError):
        mmloss.CoCaLoss(1.0, 1.0, world_size=2)(x, y, logits, labels, 5.0)
    local = mmloss.CoCaLoss(1.0, 1.0, world_size=2, distributed=None)(x, y, logits, labels, 5.0)
    assert torch.isfinite(local[0])


@pytest.mark.parametrize("change,error,match", [
    (lambda b: (b[0], b[1], b[2][:, :, 0], b[3]), ValueError, "B, T, V"),
    (lambda b: (b[0], b[1], b[2], b[3][:, :2]), ValueError, "labels must be"),
    (lambda b: (b[0], b[1], b[2], b[3].float()), TypeError, "integer"),
    (lambda b: (b[0], b[1], b[2].long(), b[3]), TypeError, "floating"),
])
def test_bad_caption_inputs(change, error, match):
    args = change(_batch(seed=6))
    with pytest.raises(error, match=match):
        mmloss.CoCaLoss(1.0, 1.0)(*args, 5.0)


def test_bad_weights():
    with pytest.raises(TypeError, match="caption_loss_weight"):
        mmloss.CoCaLoss("1", 1.0)
    with pytest.raises(ValueError, match="clip_loss_weight"):
        mmloss.CoCaLoss(1.0, float("nan"))


def test_check_finite_names_logits():
    x, y, logits, labels = _batch(seed=7)
    bad = logits.detach().clone()
    bad[1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="logits"):
        mmloss.CoCaLoss(1.0, 1.0, check_finite=True)(x, y, bad, labels, 5.0)
    assert torch.isnan(mmloss.CoCaLoss(1.0, 1.0)(x, y, bad, labels, 5.0)[1])
