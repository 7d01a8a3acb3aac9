"""The ring's statistics merge and backward-from-given-statistics on the triton backend under
the interpreter (tests/ring_blocks.py)."""
import pytest
import torch

from ring_blocks import check_ring_blocks


@pytest.mark.parametrize("shards", [(4, 1, 6), (11,)])
def test_triton_blocks_equal_one_call(shards):
    g = torch.Generator().manual_seed(3)
    x = torch.nn.functional.normalize(torch.randn(11, 5, generator=g), dim=1)
    y = torch.nn.functional.normalize(torch.randn(11, 5, generator=g), dim=1)
    check_ring_blocks(x, y, torch.tensor(20.0), torch.tensor(-1.0), shards, "triton", rtol=2e-5, atol=2e-5)


def test_triton_merge_keeps_empty_rows_and_nan():
    from mmloss.ops import triton as T

    inf = float("inf")
    a = torch.tensor([[1.0, -inf, float("nan")], [0.5, -inf, 0.0]])
    b = torch.tensor([[3.0, -inf, 0.0], [0.0, -inf, 0.0]])
    merged = T.merge_lse_stats(a, b)
    want = torch.log2(torch.exp2(torch.tensor(0.5 + 1.0 - 3.0)) + 1.0)
    assert merged[0, 0] == 3.0 and torch.isclose(merged[1, 0], want)
    assert merged[0, 1] == -inf and merged[1, 1] == -inf and T.lse_from_stats(merged)[1] == -inf
    assert torch.isnan(merged[:, 2]).any()
