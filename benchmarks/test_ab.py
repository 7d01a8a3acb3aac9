"""``benchmarks/ab.py``'s verdict logic on made-up timings (no worker, no git, no timing)."""
from __future__ import annotations

import argparse

import pytest

import ab
from mmloss.bench.cases import CASES

SHAPES = [("small", 32, 16)]


def _rounds(ratio: float, rounds: int = 7, calls: int = 4) -> dict:
    """Every pair: base 1 ms, head ``ratio`` ms (one round a noisy outlier the median ignores)."""
    pairs = [[(1e-3, ratio * 1e-3)] * calls for _ in range(rounds)]
    pairs[0] = [(1e-3, 3 * ratio * 1e-3)] * calls
    return {"clip/small": pairs}


@pytest.mark.parametrize("ratio,slower", [(1.04, False), (1.06, True), (0.8, False)])
def test_a_loss_is_flagged_only_beyond_the_threshold(ratio, slower):
    values = {"base": {"clip/small": 1.5}, "head": {"clip/small": 1.5}}
    lines, is_slower = ab.loss_table(CASES["clip"], SHAPES, _rounds(ratio), values, 0.05)
    assert is_slower is slower
    assert ("SLOWER" in lines[-1]) is slower
    assert f"{ratio:.3f}" in lines[-1] and lines[-1].split()[-1 - slower] == "="


def test_ntxent_rows_show_the_halved_batch():
    lines, _ = ab.loss_table(CASES["ntxent"], [("small", 32, 16)], {"ntxent/small": [[(1.0, 1.0)]]},
                             {"base": {}, "head": {}}, 0.05)
    assert "16×16" in lines[-1] and "?" in lines[-1]


def test_shapes_option():
    assert ab.parse_shapes("small=32x16, medium=96X32") == [("small", 32, 16), ("medium", 96, 32)]
    for bad in ("small", "small=32", "=32x16", "tiny=2x8"):
        with pytest.raises(argparse.ArgumentTypeError):
            ab.parse_shapes(bad)
