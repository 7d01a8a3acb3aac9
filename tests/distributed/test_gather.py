"""distributed="gather" is exact (docs/guarantees.md, "Distributed"; mmloss/distributed.py).

One spawn per world size (2, 3, 4 gloo CPU ranks, uneven shards, one rank holding a single row)
runs every check of tests/distributed/_gather_worker.py: CLIP / SigLIP / InfoNCE functions and
modules in float64 against one process on the concatenated global batch (loss on every rank and
DDP-averaged gradients of the encoders, logit_scale and logit_bias within 1e-10·‖g‖), a 5-step DDP
training run with ``ClipLoss()``, a process group that excludes a rank, and at world size 2 the
errors of bad setups and open_clip parity (equal shards).
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import _gather_worker  # noqa: E402
from harness import spawn_ranks  # noqa: E402


def _open_clip_loss_path():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    return path if os.path.isfile(path) else None


def _spawn(size: int, tmp) -> list:
    return spawn_ranks(_gather_worker.worker, size, tmp, _open_clip_loss_path())


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda w: f"W={w}")
def outcomes(request, tmp_path_factory):
    return request.param, _spawn(request.param, tmp_path_factory.mktemp(f"gather{request.param}"))


def _failures(results):
    return {f"rank {r}: {name}": msg for r, out in enumerate(results) for name, msg in out.items() if msg}


def test_gather_matches_single_process(outcomes):
    size, results = outcomes
    expected = set(_gather_worker.loss_cases(size)) | {"DDP training (5 SGD steps, ClipLoss())",
                                                        "grad_cache_step under DDP (no_sync)"}
    expected |= {f"bf16 {loss} {mode}" for loss in ("clip", "siglip") for mode in ("gather", "ring")}
    for rank, out in enumerate(results):
        assert expected <= set(out), (rank, sorted(expected - set(out)))
        if rank > 0:
            assert any(k.startswith("subgroup") for k in out), (rank, sorted(out))
        if size == 2:
            for name in ("mismatched D", "mismatched dtype", "ring without a ring form", "ring with labels",
                         "ring with soft targets", "world_size disagrees"):
                assert name in out, (rank, name)
            assert ("not in group" if rank else "group of one") in out
    failures = _failures(results)
    assert not failures, "\n".join(f"{k}: {v}" for k, v in failures.items())


@pytest.mark.parametrize("outcomes", [2, 4], indirect=True, ids=["W=2", "W=4"])
def test_open_clip_parity(outcomes):
    """Runs in the world-size-2 and -4 spawns (equal shards of 3 rows): ClipLoss with
    gather_with_grad=True (local_loss False/True) and SigLipLoss for every dist_impl."""
    size, results = outcomes
    if _open_clip_loss_path() is None:
        pytest.skip("open_clip (pip package open_clip_torch) is not installed: no open_clip comparison")
    keys = [f"open_clip parity local_loss={flag}" for flag in (False, True)]
    keys += [f"open_clip parity SigLipLoss(dist_impl={impl})" for impl in ("bidir", "shift", "reduce", "gather")]
    for rank, out in enumerate(results):
        for key in keys:
            assert key in out and out[key] is None, (rank, key, out.get(key))


@pytest.mark.parametrize("outcomes", [2, 4], indirect=True, ids=["W=2", "W=4"])
def test_lightly_parity(outcomes):
    """Runs in the world-size-2 and -4 spawns: NTXentLoss(gather_distributed=True) against
    lightly's, equal shards of 3 rows."""
    size, results = outcomes
    if importlib.util.find_spec("lightly") is None:
        pytest.skip("lightly is not installed: no lightly comparison")
    key = "lightly parity NTXentLoss(gather_distributed=True)"
    for rank, out in enumerate(results):
        assert key in out and out[key] is None, (rank, key, out.get(key))
