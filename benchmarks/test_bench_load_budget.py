"""``python -m mmloss.bench`` options for issue 12's measurements, run in-process on tiny sizes:
``--busy N`` (competing busy processes for the duration of the measurement), ``--logit-budget``
(one mmloss row per budget) and the ``lse`` case (the primitive ``similarity_lse`` against the
floor of its 4 GEMMs)."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

from mmloss.bench import cli
from mmloss.bench.busy import CompetingLoad
from mmloss.bench.cases import CASES
from mmloss.bench.implementations import mmloss_implementation
from mmloss.ops import torch_chunked

TINY = ["--sizes", "16", "--dim", "8", "--repeats", "2", "--no-checks"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_competing_load_spins_and_stops():
    with CompetingLoad(2) as load:
        pids = load.pids
        assert len(pids) == 2 and load.running() == 2 and load.kind in ("numpy", "python")
        if os.path.exists(f"/proc/{pids[0]}/stat"):
            start = [_cpu_seconds(p) for p in pids]
            time.sleep(1.0)
            assert all(_cpu_seconds(p) > s for p, s in zip(pids, start))  # they burn CPU
        assert "2 competing busy processes" in load.describe()
    assert not any(_alive(p) for p in pids)


def test_competing_load_stops_when_the_block_raises():
    with pytest.raises(KeyError):
        with CompetingLoad(1) as load:
            pids = load.pids
            raise KeyError("boom")
    assert not any(_alive(p) for p in pids)


def test_zero_busy_processes_is_a_no_op():
    with CompetingLoad(0) as load:
        assert load.pids == [] and load.describe() == "none"


def test_busy_and_budgets_run_and_are_recorded(tmp_path, capsys, monkeypatch):
    kept = []
    real = torch_chunked.similarity_lse_forward

    def spy(spec, rows, cols):
        out = real(spec, rows, cols)
        kept.append(out[4].numel() > 0)
        return out

    monkeypatch.setattr(torch_chunked, "similarity_lse_forward", spy)
    path = str(tmp_path / "out.json")
    code = cli.main(TINY + ["--loss", "lse,clip", "--backends", "torch", "--peers", "dense", "--busy", "1",
                            "--logit-budget", "0,64KiB", "--json", path])
    assert code == 0
    out = capsys.readouterr().out
    assert "1 competing busy process" in out and "load:" in out
    assert "mmloss[torch,keep≤64KiB]" in out and "similarity_lse (the primitive" in out
    doc = json.load(open(path))
    assert doc["meta"]["options"]["busy"] == 1
    assert doc["meta"]["options"]["logit_budgets"] == [0, 64 << 10]
    measured = {(r["loss"], r["impl"]): r for r in doc["results"] if r["kind"] != "floor"}
    for loss in ("lse", "clip"):
        for impl in ("mmloss[torch]", "mmloss[torch,keep≤64KiB]", "dense"):
            row = measured[(loss, impl)]
            assert row["status"] == "ok" and row["check"] in ("ref", "ok"), row
    floors = [r for r in doc["results"] if r["kind"] == "floor" and r["loss"] == "lse"]
    assert floors and floors[0]["impl"] == "floor (4×mm)"
    assert True in kept and False in kept  # the budget row kept its 16×16 logits, the other did not


def test_budget_implementation_keeps_only_its_own_calls(monkeypatch):
    kept = []
    real = torch_chunked.similarity_lse_forward
    monkeypatch.setattr(torch_chunked, "similarity_lse_forward",
                        lambda spec, rows, cols: kept.append(spec.logit_budget) or real(spec, rows, cols))
    monkeypatch.setenv("MMLOSS_LOGIT_BUDGET", "1MiB")
    case = CASES["clip"]
    inputs = case.make_inputs(12, 4, torch.float32, "cpu")
    for budget in (None, 0, 4096):
        impl = mmloss_implementation("torch", budget)
        impl.factory(case, inputs)(inputs)
    assert kept == [1 << 20, 0, 4096]  # None leaves the environment's budget in force
    assert mmloss_implementation("torch", 0).label == "mmloss[torch]"
    assert mmloss_implementation("torch", 80 << 20).label == "mmloss[torch,keep≤80MiB]"


@pytest.mark.parametrize("argv,message", [
    (["--busy", "-1"], "--busy must be ≥ 0"),
    (["--busy", "two"], "--busy takes an integer"),
    (["--busy", "1", "--nproc", "2"], "--busy loads the machine"),
    (["--logit-budget", "lots"], "--logit-budget must be a byte count"),
    (["--logit-budget", ","], "give at least one byte count"),
])
def test_bad_load_and_budget_options(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
