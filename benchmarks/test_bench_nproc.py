"""``python -m mmloss.bench --nproc 2 --smoke``: the multi-process bench (issue 10) run in-process on
tiny shapes (B_local = 16, D = 8, two gloo CPU ranks), so the mode cannot rot: a table per loss
with gather, ring (and open_clip's distributed losses when installed), per-rank peak memory,
global losses that agree, the JSON and its re-rendering; clear errors for options that do not
apply. Spawning the two ranks costs a few seconds (each imports torch)."""
from __future__ import annotations

import json

import pytest
import torch

from mmloss.bench import cli, peers

OPEN_CLIP = peers.peer_status("open_clip", torch.device("cpu")) is None
EXPECTED = {
    "clip": {"mmloss[torch] gather", "mmloss[torch] ring"} | ({"open_clip", "open_clip local"} if OPEN_CLIP else set()),
    "siglip": {"mmloss[torch] gather", "mmloss[torch] ring"}
    | ({"open_clip bidir", "open_clip gather"} if OPEN_CLIP else set()),
}
# Implementations that return the global loss on every rank (the others return rank shares).
GLOBAL_ON_EVERY_RANK = {"mmloss[torch] gather", "mmloss[torch] ring", "open_clip"}


def test_nproc_smoke_reports_gather_ring_and_open_clip_per_rank(tmp_path, capsys):
    path = tmp_path / "nproc.json"
    assert cli.main(["--nproc", "2", "--smoke", "--device", "cpu", "--backends", "torch",
                     "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for text in ("CLIP (symmetric InfoNCE", "SigLIP (pairwise sigmoid", "2 ranks × cpu, gloo",
                 "peak MiB per rank", "B_global", "mmloss[torch] ring"):
        assert text in out, text

    doc = json.loads(path.read_text())
    assert doc["meta"]["nproc"] == 2 and doc["meta"]["comm"] == "gloo"
    assert doc["meta"]["options"]["batch_is_per_rank"] is True
    for loss, expected in EXPECTED.items():
        rows = {r["impl"]: r for r in doc["results"] if r["loss"] == loss}
        assert set(rows) == expected, sorted(rows)
        reference = rows["mmloss[torch] gather"]
        assert reference["check"] == "ref"
        for impl, r in rows.items():
            assert r["status"] == "ok", r
            assert (r["world_size"], r["batch"], r["cols"]) == (2, 16, 32)
            assert r["total_ms_min"] <= r["total_ms_median"] <= r["total_ms_max"] and r["total_ms_median"] > 0
            assert len(r["rank_peak_mib"]) == 2 and all(p > 0 for p in r["rank_peak_mib"]), r
            assert r["peak_mib"] == max(r["rank_peak_mib"])
            # The global losses and every rank's feature gradients agree with mmloss gather's.
            assert r["check"] in ("ref", "ok"), r
            assert r["loss_value"] == pytest.approx(reference["loss_value"], rel=1e-5)
            if impl != "mmloss[torch] gather":
                assert r["loss_rel_err"] <= 1e-5 and r["grad_rel_err"] <= 1e-5, r
            if impl in GLOBAL_ON_EVERY_RANK:
                assert r["rank_values"][0] == pytest.approx(r["rank_values"][1], rel=1e-6), r
        if OPEN_CLIP:
            peer = "open_clip" if loss == "clip" else "open_clip bidir"
            assert rows[peer]["time_vs_peer"] == 1.0 and rows[peer]["memory_vs_peer"] == 1.0
            assert reference["versus"] == peer and reference["memory_vs_peer"] > 0

    # The saved JSON renders the same tables without measuring.
    assert cli.main(["--from-json", str(path)]) == 0
    again = capsys.readouterr().out
    assert "peak MiB per rank" in again and "mmloss[torch] ring" in again and "SigLIP (pairwise sigmoid" in again


NPROC_ERRORS = [
    (["--nproc", "1"], "at least 2 processes"),
    (["--nproc", "2", "--csv", "x.csv"], "--csv: not available with --nproc"),
    (["--nproc", "2", "--time-limit", "5"], "--time-limit: not available with --nproc"),
    (["--smoke"], "--smoke belongs to --nproc"),
    (["--nproc", "2", "--loss", "ntxent"], "--nproc measures clip, siglip"),
    (["--nproc", "2", "--peers", "lightly"], "only open_clip is measured"),
    (["--nproc", "2", "--device", "cuda:1"], "pass --device cuda"),
]


def test_nproc_option_errors_exit_2_with_the_reason(capsys):
    for argv, message in NPROC_ERRORS:
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err, (argv, err)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() >= 2,
                    reason="this machine has 2 GPUs, so --nproc 2 --device cuda is valid here")
def test_nproc_cuda_needs_one_gpu_per_rank(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--nproc", "2", "--device", "cuda"])
    err = capsys.readouterr().err
    assert "NCCL needs one GPU per rank, 0 visible" in err or "NCCL needs one GPU per rank, 1 visible" in err
