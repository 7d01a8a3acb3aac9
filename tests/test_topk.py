"""similarity_topk: chunked top-k columns per row, deterministic ties, no gradient."""
from __future__ import annotations

import pytest
import torch

from oracle import assert_loss_close, features

from mmloss import reference as R
from mmloss.ops import similarity_topk

F64, F32 = torch.float64, torch.float32


def _dense(x, y, k, scale=1.0):
    """Stable descending sort of the float64 logits: ties to the lower index."""
    s = scale[:, None] if isinstance(scale, torch.Tensor) and scale.dim() == 1 else scale
    L = (x.detach().double() @ y.detach().double().T) * (s.double() if isinstance(s, torch.Tensor) else s)
    values, indices = torch.sort(L, dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (37, 23, 3), (23, 70, 67), (5, 4, 130)])
@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_matches_dense_sort(n, m, d, chunk):
    x = features(n, d, dtype=F64, seed=1)
    y = features(m, d, dtype=F64, seed=2)
    for k in sorted({1, min(2, m), m}):
        values, indices = similarity_topk(x, y, k, scale=3.0, chunk_size=chunk)
        ref_values, ref_indices = _dense(x, y, k, 3.0)
        assert values.shape == (n, k) and indices.dtype == torch.long
        assert torch.equal(indices, ref_indices)
        assert_loss_close(values, ref_values, F64, f"top-{k} values")


def test_fp32_values_and_indices():
    x = features(37, 67, dtype=F32, seed=3)
    y = features(29, 67, dtype=F32, seed=4)
    values, indices = similarity_topk(x, y, 4, scale=torch.tensor(2.0), chunk_size=6)
    ref_values, ref_indices = _dense(x, y, 4, 2.0)
    assert values.dtype == F32
    assert torch.equal(indices, ref_indices)
    assert_loss_close(values, ref_values, F32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_fp32_values(dtype):
    x = features(13, 8, dtype=dtype, seed=5)
    y = features(11, 8, dtype=dtype, seed=6)
    values, indices = similarity_topk(x, y, 3)
    ref_values, ref_indices = _dense(x, y, 3)
    assert values.dtype == F32
    assert torch.equal(indices, ref_indices)
    assert_loss_close(values, ref_values, dtype)


def test_ties_go_to_the_lower_index():
    """Duplicate columns give bitwise-equal logits: argmax and the stable sort pick the lower
    column first, in every chunking."""
    base = features(4, 3, dtype=F32, seed=7, requires_grad=False)
    y = torch.stack([base[1], base[0], base[1], base[2], base[1], base[3]])  # column 0, 2, 4 tie
    x = base[[1, 1, 0, 1]]
    for chunk in (None, 1, 3):
        _, top1 = similarity_topk(x, y, 1, chunk_size=chunk)
        assert top1[[0, 1, 3], 0].tolist() == [0, 0, 0]
        _, top3 = similarity_topk(x, y, 3, chunk_size=chunk)
        assert top3[0].tolist() == [0, 2, 4]


def test_many_ties_keep_index_order():
    """Hundreds of tied columns (where an unstable sort or topk reorders them): the k best are
    the lowest tied indices, in increasing order."""
    x = torch.ones(3, 1)
    y = torch.zeros(3000, 1)
    y[::7] = 1.0
    for chunk in (None, 2):
        values, indices = similarity_topk(x, y, 10, chunk_size=chunk)
        assert indices.tolist() == [list(range(0, 70, 7))] * 3
        assert bool((values == 1).all())
        assert similarity_topk(x, y, 1, chunk_size=chunk)[1].flatten().tolist() == [0, 0, 0]


def test_per_row_scale_with_a_negative_row():
    x = features(6, 5, dtype=F64, seed=8)
    y = features(9, 5, dtype=F64, seed=9)
    scale = torch.tensor([1.0, -2.0, 3.0, 0.5, 1.0, -1.0], dtype=F64)
    values, indices = similarity_topk(x, y, 3, scale=scale, chunk_size=4)
    ref_values, ref_indices = _dense(x, y, 3, scale)
    assert torch.equal(indices, ref_indices)
    assert_loss_close(values, ref_values, F64)


def test_no_gradient_and_grad_mode_untouched():
    x = features(7, 4, dtype=F32, seed=10)
    y = features(5, 4, dtype=F32, seed=11)
    values, indices = similarity_topk(x, y, 2, scale=torch.tensor(2.0, requires_grad=True))
    assert not values.requires_grad and not indices.requires_grad
    assert torch.is_grad_enabled()


def test_noncontiguous_inputs():
    x = features(17, 6, dtype=F64, seed=12, noncontig=True)
    y = features(13, 6, dtype=F64, seed=13, noncontig=True)
    _, indices = similarity_topk(x, y, 5, chunk_size=4)
    assert torch.equal(indices, _dense(x, y, 5)[1])


def test_small_budget_from_environment(monkeypatch):
    monkeypatch.setenv("MMLOSS_CHUNK_BYTES", "1")
    x = features(40, 3, dtype=F64, seed=14)
    y = features(21, 3, dtype=F64, seed=15)
    for k in (1, 4):
        assert torch.equal(similarity_topk(x, y, k)[1], _dense(x, y, k)[1])


def test_reference_agrees():
    x = features(11, 3, dtype=F64, seed=16)
    y = features(9, 3, dtype=F64, seed=17)
    fast = similarity_topk(x, y, 4, scale=2.5)
    ref = R.similarity_topk(x, y, 4, scale=2.5)
    assert torch.equal(fast[1], ref[1])
    assert_loss_close(fast[0], ref[0], F64)


def _xy():
    return torch.randn(5, 3), torch.randn(4, 3)


def test_error_k_too_large():
    with pytest.raises(ValueError, match="k must satisfy"):
        similarity_topk(*_xy(), 5)


def test_error_k_zero():
    with pytest.raises(ValueError, match="k must satisfy"):
        similarity_topk(*_xy(), 0)


def test_error_k_not_int():
    with pytest.raises(TypeError, match="k must be an int"):
        similarity_topk(*_xy(), 1.5)


def test_error_chunk():
    with pytest.raises(ValueError, match="chunk_size"):
        similarity_topk(*_xy(), 1, chunk_size=0)


def test_chunk_is_a_deprecated_alias_of_chunk_size():
    x, y = _xy()
    with pytest.warns(DeprecationWarning, match="chunk_size"):
        old = similarity_topk(x, y, 2, chunk=1)
    new = similarity_topk(x, y, 2, chunk_size=1)
    assert torch.equal(old[0], new[0]) and torch.equal(old[1], new[1])
    with pytest.raises(TypeError, match="both"):
        similarity_topk(x, y, 2, chunk=1, chunk_size=1)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="chunk_size"):
        similarity_topk(x, y, 1, chunk=0)


def test_error_chunk_type():
    with pytest.raises(TypeError, match="chunk"):
        similarity_topk(*_xy(), 1, chunk_size=2.0)


def test_error_dims_differ():
    with pytest.raises(ValueError, match="same feature"):
        similarity_topk(torch.randn(5, 3), torch.randn(4, 2), 1)


def test_error_scale_shape():
    with pytest.raises(ValueError, match="scale"):
        similarity_topk(*_xy(), 1, scale=torch.ones(3))


def test_error_integer_features():
    with pytest.raises(TypeError, match="x must be"):
        similarity_topk(torch.ones(5, 3, dtype=torch.long), torch.randn(4, 3), 1)
