"""Distributed defaults under an initialised process group (docs/guarantees.md, "Distributed").

Rule: functions compute on the tensors they are given, like ``torch.nn.functional``; each module
follows its peer's default — open_clip's ``ClipLoss``/``SigLipLoss``/``DistillClipLoss`` gather
(``distributed="auto"``): ClipLoss and SigLipLoss return the global loss, and a module whose loss
cannot gather yet raises under "auto" rather than silently return a rank-local loss; every other
module is rank-local (lightly's ``gather_distributed=False``). An explicit "auto" gathers where
the loss can (InfoNCELoss) and raises elsewhere. Two spawned CPU ranks (gloo) record what each call
did; the parent asserts.
"""
from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch

import mmloss

GATHERING_BY_DEFAULT = ("ClipLoss", "SigLipLoss", "DistillClipLoss")
# Modules whose "auto" gathers today: name → the single-process loss of the global batch.
GATHERS = {
    "ClipLoss": lambda x, y: mmloss.clip_loss(x, y, 10.0),
    "SigLipLoss": lambda x, y: mmloss.siglip_loss(x, y, 10.0, -2.0),
    "InfoNCELoss": lambda x, y: mmloss.infonce_loss(x, y, 10.0),
    "NTXentLoss": lambda x, y: mmloss.ntxent_loss(x, y),
    "DCLLoss": lambda x, y: mmloss.dcl_loss(x, y),
    "DistillClipLoss": lambda x, y: mmloss.clip_loss(x, y, 10.0) + mmloss.contrastive_distill_loss(
        x, y, 10.0, *(torch.cat([_features(rank)[k] for rank in (0, 1)]) for k in (2, 3)), 5.0),
    "CyCLIPLoss": lambda x, y: mmloss.cyclip_loss(x, y, 10.0),
}


def _global_loss(name: str, world_size: int = 2) -> float:
    """The loss of the concatenated batches of every rank (rank r uses _features(seed=r))."""
    parts = [_features(rank)[:2] for rank in range(world_size)]
    x, y = (torch.cat([p[k] for p in parts]) for k in (0, 1))
    return float(GATHERS[name](x, y))


def _features(seed: int, n: int = 6, d: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1) for _ in range(4)]


def _cases(seed: int):
    """name → (module factory taking **kwargs → loss, functional twin → loss)."""
    x, y, xt, yt = _features(seed)
    return {
        "ClipLoss": (lambda **kw: mmloss.ClipLoss(**kw)(x, y, 10.0), lambda: mmloss.clip_loss(x, y, 10.0)),
        "SigLipLoss": (lambda **kw: mmloss.SigLipLoss(**kw)(x, y, 10.0, -2.0),
                       lambda: mmloss.siglip_loss(x, y, 10.0, -2.0)),
        "DistillClipLoss": (lambda **kw: sum(mmloss.DistillClipLoss(**kw)(x, y, 10.0, xt, yt, 5.0)),
                            lambda: mmloss.clip_loss(x, y, 10.0)
                            + mmloss.contrastive_distill_loss(x, y, 10.0, xt, yt, 5.0)),
        "InfoNCELoss": (lambda **kw: mmloss.InfoNCELoss(**kw)(x, y, 10.0), lambda: mmloss.infonce_loss(x, y, 10.0)),
        "NTXentLoss": (lambda **kw: mmloss.NTXentLoss(**kw)(x, y), lambda: mmloss.ntxent_loss(x, y)),
        "DCLLoss": (lambda **kw: mmloss.DCLLoss(**kw)(x, y), lambda: mmloss.dcl_loss(x, y)),
        "CyCLIPLoss": (lambda **kw: mmloss.CyCLIPLoss(**kw)(x, y, 10.0), lambda: mmloss.cyclip_loss(x, y, 10.0)),
        # No distributed form: "auto" under world size 2 must raise, never return a rank-local loss.
        "TripleContrastiveLoss": (lambda **kw: mmloss.TripleContrastiveLoss(**kw)(x, y, xt, yt),
                                  lambda: mmloss.tcl_loss(x, y, xt, yt, 0.07)),
        "ISogCLRLoss": (lambda **kw: mmloss.ISogCLRLoss(8, **kw)(x, y, torch.arange(6)),
                        lambda: mmloss.ISogCLRLoss(8, distributed=None)(x, y, torch.arange(6))),
    }


def _outcome(call) -> dict:
    try:
        return {"value": float(call().detach())}
    except Exception as exc:  # recorded for the parent to judge
        return {"error": f"{type(exc).__name__}: {exc}"}


def _worker(rank: int, world_size: int, init_file: str, result_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        out = {"world_size": dist.get_world_size()}
        for name, (module_call, functional_call) in _cases(seed=rank).items():
            out[name] = {"default": _outcome(module_call), "auto": _outcome(lambda: module_call(distributed="auto")),
                         "local": _outcome(lambda: module_call(distributed=None)),
                         "functional": _outcome(functional_call)}
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(out, fh)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("defaults")
    sys.path.insert(0, os.path.dirname(__file__))
    context = torch.multiprocessing.start_processes(
        _worker, args=(2, str(tmp / "rendezvous"), str(tmp)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the 2-process gloo run did not finish within 120 s")
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("name", list(_cases(0)))
def test_module_defaults(outcomes, name):
    for rank, out in enumerate(outcomes):
        assert out["world_size"] == 2
        case = out[name]
        want = case["functional"]["value"]
        got_local = case["local"]["value"]
        assert abs(got_local - want) <= 1e-6 * abs(want) + 1e-6, (rank, name, got_local, want)
        if name in GATHERS:
            # An explicit "auto" under a group of world size 2 gives the global loss on every rank.
            global_loss = _global_loss(name)
            assert "value" in case["auto"], (rank, name, case["auto"])
            got = case["auto"]["value"]
            assert abs(got - global_loss) <= 1e-6 * abs(global_loss), (rank, name, got, global_loss)
        else:
            # A loss that cannot gather yet never returns a rank-local loss under "auto".
            assert case["auto"].get("error", "").startswith("RuntimeError:"), (rank, name, case["auto"])
            assert "world size 2" in case["auto"]["error"], case["auto"]["error"]
        if name in GATHERING_BY_DEFAULT:
            assert case["default"] == case["auto"], (rank, name, case["default"])
        else:
            assert case["default"] == case["local"], (rank, name, case["default"])
