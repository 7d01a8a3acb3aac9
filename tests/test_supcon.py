"""SupCon (docs/losses.md §5; mmloss/functional/supcon.py, mmloss/losses/supcon.py): closed forms,
both call styles, anchors without positives, pytorch-metric-learning's values and reference set.
The tests run over every SSL loss are in tests/test_ssl_common.py."""
from __future__ import annotations

import math

import pytest
import torch

import mmloss
from oracle import assert_grad_close, assert_loss_close, compare, oracle
from ssl_helpers import (
    check, closed_form_check, identical_rows, logit_bound_of, LOSSES, pml_losses, supcon2d_labels, views,
)

ref = mmloss.reference
F = mmloss.functional


# ----------------------------------------------------------------------------- values


def test_supcon_one_class_identical_rows_is_log_n_minus_1():
    """Every logit 1/τ: LSE over n−1 others minus the mean positive; scaled by τ/τ_base."""
    (x,) = identical_rows(7, 4, v=1)
    labels = torch.zeros(7, dtype=torch.long)
    closed_form_check(lambda t, be: (F.supcon_loss(t[0], labels, 0.1, 0.05, backend=be) if be
                                      else ref.supcon_loss(t[0], labels, 0.1, 0.05)),
                       [x], 2.0 * math.log(6))


def test_supcon_row_permutation_is_a_symmetry():
    (x,) = LOSSES["supcon2d"].build(15, 6, seed=24)
    labels = supcon2d_labels(15)
    perm = torch.randperm(15, generator=torch.Generator().manual_seed(1))
    a = F.supcon_loss(x, labels)
    b = F.supcon_loss(x.detach()[perm], labels[perm])
    assert_loss_close(a, b.double(), torch.float32, logit_bound=logit_bound_of("supcon2d"))


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_supcon_two_views_without_labels_is_ntxent(tau):
    out0, out1 = views(2, 11, 7, seed=33)
    stacked = torch.stack([out0, out1], dim=1)                   # (B, 2, D)
    assert_loss_close(F.supcon_loss(stacked, temperature=tau),
                      F.ntxent_loss(out0, out1, tau).double(), torch.float32, logit_bound=1 / tau)
    assert_loss_close(ref.supcon_loss(oracle(stacked), temperature=tau),
                      ref.ntxent_loss(oracle(out0), oracle(out1), tau), torch.float64)


def test_supcon_views_are_flattened_view_major_like_hobbitlong():
    """(B, V, D) with labels (B,) is the 2-D loss of cat(unbind(x, 1)) with labels repeated V
    times: all samples of view 0 first (HobbitLong's contrast_feature order)."""
    x = views(3, 8, 5, seed=34, stacked=True).detach().transpose(0, 1).contiguous().requires_grad_()
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 3, 0])
    flat = torch.cat(torch.unbind(x, dim=1), dim=0)
    assert_loss_close(F.supcon_loss(x, labels), F.supcon_loss(flat, labels.repeat(3)).double(), torch.float32,
                      logit_bound=logit_bound_of("supcon3d"))
    check(LOSSES["supcon3d"], [x], torch.float32)
    compare(lambda t: F.supcon_loss(t, labels, backend="torch"), lambda t: ref.supcon_loss(t, labels), [x],
            torch.float32, what="supcon (B,V,D) with labels", logit_bound=logit_bound_of("supcon3d"))


def test_supcon_anchors_without_positive_are_skipped():
    """Singleton classes contribute no anchor; the mean runs over the others."""
    (x,) = views(1, 9, 6, seed=35)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4])
    kept = torch.tensor([0, 1, 3, 4, 5, 7, 8])
    compare(lambda t: F.supcon_loss(t, labels, backend="torch"), lambda t: ref.supcon_loss(t, labels), [x],
            torch.float32, what="supcon singletons", logit_bound=logit_bound_of("supcon2d"))
    # Removing the singleton rows changes every normaliser, so compare through the reference's terms.
    z = torch.nn.functional.normalize(x.detach().double(), dim=1)
    L = z @ z.T / 0.1
    L.fill_diagonal_(float("-inf"))
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(9, dtype=torch.bool)
    terms = torch.logsumexp(L, 1) - torch.where(same, L, 0.0).sum(1) / same.sum(1).clamp(min=1)
    assert_loss_close(F.supcon_loss(x, labels), terms[kept].mean(), torch.float32,
                      logit_bound=logit_bound_of("supcon2d"))


@pytest.mark.parametrize("shape", ["2d-distinct-labels", "3d-one-view", "2d-one-row"])
def test_supcon_without_any_positive_is_a_connected_zero(shape):
    if shape == "2d-distinct-labels":
        (x,) = views(1, 6, 4, seed=36)
        labels = torch.arange(6)
    elif shape == "3d-one-view":
        x = views(1, 6, 4, seed=36, stacked=True).detach().transpose(0, 1).contiguous().requires_grad_()
        labels = None
    else:
        (x,) = views(1, 1, 4, seed=36)
        labels = torch.tensor([3])
    loss = F.supcon_loss(x, labels, backend="torch")
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    (g,) = torch.autograd.grad(loss, [x])
    assert torch.equal(g, torch.zeros_like(g))
    assert float(ref.supcon_loss(oracle(x), labels).detach()) == 0.0


# ----------------------------------------------------------------------------- peers


def test_pytorch_metric_learning_supcon():
    """PML's SupConLoss(temperature) with labels equals ours with τ_base = τ when every anchor
    has a positive (PML averages the non-zero anchor losses)."""
    pml = pml_losses()
    (x,) = views(1, 15, 9, seed=54)
    labels = torch.arange(15) % 4
    a = oracle(x)
    expected = pml.SupConLoss(temperature=0.2)(a, labels)
    got = mmloss.SupConLoss(temperature=0.2)(x, labels)
    assert_loss_close(got, expected, torch.float32, logit_bound=1 / 0.2)
    assert_grad_close(torch.autograd.grad(got, [x])[0], torch.autograd.grad(expected, [a])[0], torch.float32)


# ----------------------------------------------------------------------------- bad inputs (one test each)


def test_supcon_2d_without_labels():
    with pytest.raises(ValueError):
        F.supcon_loss(torch.randn(6, 4))


def test_supcon_labels_of_wrong_length():
    with pytest.raises(ValueError):
        F.supcon_loss(torch.randn(6, 4), torch.arange(5))


def test_supcon_3d_labels_per_row_instead_of_per_sample():
    with pytest.raises(ValueError):
        F.supcon_loss(torch.randn(6, 2, 4), torch.arange(12))


def test_supcon_float_labels():
    with pytest.raises(TypeError):
        F.supcon_loss(torch.randn(6, 4), torch.zeros(6))


@pytest.mark.parametrize("shape", [(6,), (2, 3, 4, 5)])
def test_supcon_embeddings_of_wrong_rank(shape):
    with pytest.raises(ValueError):
        F.supcon_loss(torch.randn(*shape), torch.zeros(shape[0], dtype=torch.long))


def test_supcon_embeddings_not_a_tensor():
    with pytest.raises(TypeError):
        F.supcon_loss([[1.0, 0.0]], torch.zeros(1, dtype=torch.long))


def test_supcon_bad_base_temperature():
    with pytest.raises(ValueError):
        F.supcon_loss(torch.randn(6, 4), torch.zeros(6, dtype=torch.long), base_temperature=-1.0)


def test_supcon_embeddings_without_views():
    """Issue 8 item 9: (B, 0, D) was an IndexError."""
    with pytest.raises(ValueError, match=r"embeddings.*\(4, 0, 3\)"):
        F.supcon_loss(torch.randn(4, 0, 3))


# ----------------------------------------------------------------------------- drop-in fidelity (issue 13): the reference set


def test_pytorch_metric_learning_supcon_ref_emb():
    """PML's ref_emb/ref_labels: anchors from embeddings, positives and negatives from ref_emb
    (no self-exclusion); anchors whose label is missing from ref_labels are skipped."""
    pml = pml_losses()
    (x,) = views(1, 10, 7, seed=99)
    (r,) = views(1, 13, 7, seed=100)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 5, 5])       # 5 is absent from ref_labels
    ref_labels = torch.arange(13) % 4
    a, b = oracle(x), oracle(r)
    expected = pml.SupConLoss(temperature=0.2)(a, labels, ref_emb=b, ref_labels=ref_labels)
    got = mmloss.SupConLoss(temperature=0.2)(x, labels, ref_emb=r, ref_labels=ref_labels)
    assert_loss_close(got, expected, torch.float32, logit_bound=1 / 0.2)
    for g, e in zip(torch.autograd.grad(got, [x, r]), torch.autograd.grad(expected, [a, b])):
        assert_grad_close(g, e, torch.float32)
    # Positional order is PML's: (embeddings, labels, indices_tuple, ref_emb, ref_labels).
    assert torch.equal(mmloss.SupConLoss(0.2)(x, labels, None, r, ref_labels),
                       F.supcon_loss(x, labels, 0.2, ref_emb=r, ref_labels=ref_labels))


@pytest.mark.parametrize("same_object", [False, True])
def test_supcon_ref_emb_equal_to_embeddings_like_pml(same_object):
    """ref_emb = embeddings keeps the self pairs (i, i) as positives — unless ref_labels is the
    labels tensor itself, which PML treats as the plain call (pairs (i, i) excluded)."""
    pml = pml_losses()
    (x,) = views(1, 9, 5, seed=101)
    (r,) = views(1, 9, 5, seed=106)
    labels = torch.arange(9) % 3
    ref_labels = labels if same_object else labels.clone()
    for ref in (x, r):
        a = oracle(x)
        b = a if ref is x else oracle(ref)
        expected = pml.SupConLoss(temperature=0.5)(a, labels, ref_emb=b, ref_labels=ref_labels)
        got = F.supcon_loss(x, labels, 0.5, ref_emb=ref, ref_labels=ref_labels, backend="torch")
        assert_loss_close(got, expected, torch.float32, logit_bound=1 / 0.5)
        leaves = [x] if ref is x else [x, ref]
        for g, e in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(expected, [a] if ref is x else [a, b])):
            assert_grad_close(g, e, torch.float32)
    if same_object:
        torch.testing.assert_close(F.supcon_loss(x, labels, 0.5, ref_emb=x, ref_labels=labels),
                                   F.supcon_loss(x, labels, 0.5), rtol=1e-6, atol=1e-6)


def test_supcon_ref_emb_without_any_positive_is_a_connected_zero():
    (x,) = views(1, 4, 3, seed=102)
    (r,) = views(1, 5, 3, seed=103)
    loss = F.supcon_loss(x, torch.full((4,), 9), ref_emb=r, ref_labels=torch.zeros(5, dtype=torch.long))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    gx, gr = torch.autograd.grad(loss, [x, r])
    assert not gx.any() and not gr.any()


def test_supcon_indices_tuple_names_what_is_supported():
    (x,) = views(1, 4, 3, seed=104)
    labels = torch.tensor([0, 0, 1, 1])
    pairs = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    with pytest.raises(NotImplementedError, match=r"indices_tuple.*labels.*ref_emb"):
        mmloss.SupConLoss()(x, labels, pairs)
    with pytest.raises(NotImplementedError, match="indices_tuple"):
        F.supcon_loss(x, labels, indices_tuple=pairs)


@pytest.mark.parametrize("kwargs,match", [
    ({"ref_emb": "r"}, "together"),
    ({"ref_labels": "l"}, "together"),
    ({"ref_emb": "r", "ref_labels": "l", "labels": None}, "labels"),
    ({"ref_emb": "r", "ref_labels": "l", "three_d": True}, "2-D"),
])
def test_supcon_ref_emb_bad_calls(kwargs, match):
    (x,) = views(1, 4, 3, seed=105)
    r = torch.randn(5, 3)
    ref_labels = torch.zeros(5, dtype=torch.long)
    args = {"labels": torch.zeros(4, dtype=torch.long)}
    for key, value in kwargs.items():
        if key == "ref_emb":
            args[key] = r
        elif key == "ref_labels":
            args[key] = ref_labels
        elif key == "labels":
            args[key] = value
    emb = x[:, None, :].expand(4, 2, 3) if kwargs.get("three_d") else x
    with pytest.raises(ValueError, match=match):
        F.supcon_loss(emb, **args)
