"""``benchmarks/floor_ratio.py`` runs every loss and prints its medians (tiny sizes, one pair)."""
from __future__ import annotations

import pytest

import floor_ratio
import mmloss


@pytest.mark.parametrize("loss", ["clip", "siglip", "ntxent"])
def test_prints_the_loss_the_floor_and_their_ratio(loss, capsys):
    backend = "cpu" if mmloss.available_backends().get("cpu") is None else "torch"
    assert floor_ratio.main(["--loss", loss, "--size", "32", "--dim", "8", "--repeats", "1",
                             "--backend", backend]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{loss} 32x32 D=8 backend={backend}")
    assert f"({4 if loss == 'clip' else 3} GEMMs)" in line and "ratio" in line
