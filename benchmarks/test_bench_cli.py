"""``python -m mmloss.bench`` run in-process on tiny sizes, so the command cannot rot: tables,
JSON, CSV and PNG outputs, the honesty checks, the time limit, and clear errors for bad options."""
from __future__ import annotations

import csv
import json
import sys

import pytest
import torch

from mmloss.bench import cli, report
from mmloss.bench.cases import CASES
from mmloss.bench.implementations import mmloss_implementation, peer_implementation
from mmloss.bench.sweep import Plan, Sweep

TINY = ["--sizes", "16,24", "--dim", "8", "--repeats", "2"]


def test_cli_writes_tables_json_csv_and_plot(tmp_path, capsys):
    paths = {k: str(tmp_path / f"out.{k}") for k in ("json", "csv", "png")}
    code = cli.main(TINY + ["--loss", "clip,siglip,ntxent", "--peers", "dense,open_clip,lightly",
                            "--json", paths["json"], "--csv", paths["csv"], "--plot", paths["png"]])
    assert code == 0
    out = capsys.readouterr().out
    for title in ("CLIP (symmetric InfoNCE", "SigLIP (pairwise sigmoid"):
        assert title in out
    assert "implementation" in out and "total ms med [min–max]" in out and "honesty checks" in out

    doc = json.load(open(paths["json"]))
    results = doc["results"]
    measured = [r for r in results if r["status"] == "ok" and r["kind"] != "floor"]
    assert {r["loss"] for r in measured} >= {"clip", "siglip"}
    assert {r["batch"] for r in measured} == {16, 24}
    for r in measured:
        assert r["total_ms_median"] > 0 and r["total_ms_min"] <= r["total_ms_median"] <= r["total_ms_max"]
        assert r["check"] in ("ref", "ok"), r
        assert r["useful_flops"] == 6.0 * r["rows"] * r["cols"] * r["dim"]
    floors = [r for r in results if r["kind"] == "floor"]
    assert floors and all(r["time_over_floor"] == 1.0 for r in floors)
    assert doc["meta"]["environment"]["torch"] == torch.__version__
    assert "6·N·M·D" in doc["meta"]["flop_model"]

    checks = {c["name"]: c for c in doc["checks"]}
    assert set(checks) == {"re-timing", "dense memory"}
    if sys.platform.startswith("linux"):
        # The resident-set probe must see the dense baseline's 64 MiB of N×N fp32 logits.
        assert checks["dense memory"]["passed"] is True
        assert checks["dense memory"]["peak_mib"] >= 64

    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results)
    assert {r["impl"] for r in rows} >= {"mmloss[torch]", "dense", "floor (4×mm)"}

    png = open(paths["png"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # The saved JSON renders the same tables (and a plot) without measuring anything.
    replot = str(tmp_path / "again.png")
    assert cli.main(["--from-json", paths["json"], "--plot", replot]) == 0
    again = capsys.readouterr().out
    assert "CLIP (symmetric InfoNCE" in again and "honesty checks" in again
    assert open(replot, "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_limit_skips_and_lists(tmp_path, capsys):
    path = str(tmp_path / "r.json")
    assert cli.main(TINY + ["--loss", "clip", "--peers", "none", "--time-limit", "1e-9", "--no-checks",
                            "--json", path]) == 0
    out = capsys.readouterr().out
    assert "not measured" in out and "time limit" in out
    doc = json.load(open(path))
    assert doc["results"] == [] and len(doc["skipped"]) == 2


def test_a_loss_missing_from_mmloss_is_a_note_not_a_failure(monkeypatch, capsys):
    import mmloss

    monkeypatch.delattr(mmloss, "ntxent_loss", raising=False)
    assert cli.main(TINY + ["--loss", "clip,ntxent", "--peers", "none", "--no-checks"]) == 0
    assert "ntxent: not available in this mmloss build" in capsys.readouterr().out
    assert cli.main(TINY + ["--loss", "ntxent", "--peers", "none", "--no-checks"]) == 1
    captured = capsys.readouterr()
    assert "not available in this mmloss build" in captured.out and "nothing to benchmark" in captured.err


def test_list_option(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "peers:" in out and "open_clip" in out and "mmloss backends:" in out


@pytest.mark.parametrize("argv,message", [
    (["--loss", "nope"], "unknown loss"),
    (["--sizes", "0"], "batch sizes must be ≥ 2"),
    (["--sizes", "abc"], "not a batch size"),
    (["--dim", "0"], "--dim must be ≥ 1"),
    (["--dtype", "int8"], "unknown dtype"),
    (["--backends", "bogus"], "unknown backend"),
    (["--peers", "bogus"], "unknown peer"),
    (["--repeats", "0"], "must be ≥ 1"),
    (["--time-limit", "-1"], "must be > 0"),
    (["--device", "tpu"], "--device"),
    (["--backends", "none", "--peers", "none"], "nothing to measure"),
])
def test_bad_options_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_requested_without_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--device", "cuda"])
    assert info.value.code == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_unavailable_backend_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine the triton backend is available (needs a machine without a GPU)")
    with pytest.raises(SystemExit) as info:
        cli.main(["--backends", "triton", "--device", "cpu"])
    assert info.value.code == 2
    assert "triton" in capsys.readouterr().err


def test_a_killed_run_keeps_what_it_measured(tmp_path):
    """The JSON and CSV files hold every configuration measured before the process stops."""

    class Stop(Exception):
        pass

    class StopAfterFirst:
        def start(self, sweep):
            pass

        def add(self, config, rows):
            raise Stop

        def finish(self, sweep):
            pass

    plan = Plan(torch.device("cpu"), [CASES["clip"]], {"clip": [16, 24]}, [8], [torch.float32],
                [mmloss_implementation("torch"), peer_implementation("dense")], repeats=1)
    json_path, csv_path = str(tmp_path / "k.json"), str(tmp_path / "k.csv")
    sinks = [report.JsonSink(json_path, {"command": "test"}), report.CsvSink(csv_path), StopAfterFirst()]
    with pytest.raises(Stop):
        Sweep(plan, sinks).run()
    doc = json.load(open(json_path))
    assert {r["batch"] for r in doc["results"]} == {16}
    with open(csv_path) as f:
        assert len(list(csv.DictReader(f))) == len(doc["results"])


def test_time_limit_keeps_time_for_the_losses_still_to_come():
    import time

    plan = Plan(torch.device("cpu"), [CASES["clip"], CASES["siglip"]], {"clip": [16, 32], "siglip": [16, 32]},
                [8], [torch.float32], [mmloss_implementation("torch")], repeats=1, time_limit=10.0)
    sweep = Sweep(plan)
    clip16, clip32, siglip16, siglip32 = plan.configs()
    sweep.measured = [(clip16, 1.0, 0.2)]  # one timing round of clip B=16 took 0.2 s
    # clip B=32: 0.2 s × 4 (work) × 2 (repeat + warm-up) = 1.6 s; siglip B=16 is kept: 0.4 s.
    sweep.started = time.monotonic() - 5.0
    assert sweep.time_limit_reason(clip32, [siglip16, siglip32]) is None
    sweep.started = time.monotonic() - 8.2
    reason = sweep.time_limit_reason(clip32, [siglip16, siglip32])
    assert reason is not None and "keeping ≈0.4 s" in reason
    sweep.started = time.monotonic() - 10.5
    assert "reached" in sweep.time_limit_reason(clip32, [])
