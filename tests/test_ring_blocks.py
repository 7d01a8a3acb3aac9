"""The ring's statistics merge and backward-from-given-statistics on the torch backend, in one
process (tests/ring_blocks.py): uneven shards, a shard whose rows are all excluded on the
diagonal, large logits."""
import pytest
import torch

from ring_blocks import check_ring_blocks


@pytest.mark.parametrize("shards", [(4, 1, 6), (1, 10), (11,)])
def test_torch_blocks_equal_one_call_fp64(shards):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 5, generator=g, dtype=torch.float64)
    y = torch.randn(11, 5, generator=g, dtype=torch.float64)
    check_ring_blocks(x, y, torch.tensor(3.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64), shards,
                      "torch", rtol=1e-12, atol=1e-12)


def test_torch_blocks_large_logits_fp32():
    """Logits ~1e4: the merge keeps the exact maxima, so probabilities stay fp32-accurate."""
    g = torch.Generator().manual_seed(2)
    x = torch.nn.functional.normalize(torch.randn(9, 4, generator=g), dim=1)
    y = torch.nn.functional.normalize(torch.randn(9, 4, generator=g), dim=1)
    check_ring_blocks(x, y, torch.tensor(1e4), torch.tensor(0.5), (2, 3, 4), "torch", rtol=1e-4, atol=1e-3)


def test_torch_merge_propagates_nan_and_keeps_empty_rows():
    from mmloss.ops import torch_chunked as T

    a = torch.tensor([[1.0, 0.0, float("nan")], [2.0, 0.0, 1.0]])
    b = torch.tensor([[3.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
    merged = T.merge_lse_stats(a, b)
    assert merged[0, 0] == 3.0 and torch.isclose(merged[1, 0], 1.0 + 2.0 * torch.exp(torch.tensor(-2.0)))
    assert merged[1, 1] == 0 and torch.isinf(T.lse_from_stats(merged)[1])  # nothing allowed on either side
    assert torch.isnan(merged[:, 2]).any()
