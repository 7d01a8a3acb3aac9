"""The peer adapters compute mmloss's losses (values and gradients), and the sweep notices when
an implementation does not.

These are fast correctness tests of ``mmloss.bench`` (no timing). A peer that is not installed is
skipped with its name; the dense baselines are always checked against ``mmloss.reference``.
"""
from __future__ import annotations

import importlib.abc
import sys

import pytest
import torch

import mmloss
from mmloss.bench import peers
from mmloss.bench.cases import CASES, Inputs
from mmloss.bench.implementations import Implementation, mmloss_implementation, peer_implementation
from mmloss.bench.sweep import Plan, Sweep

BATCH, DIM = 37, 24  # ragged on purpose


def _installed(name: str) -> bool:
    return peers.peer_status(name, torch.device("cpu")) is None


def _value_and_grads(fn, inputs: Inputs):
    inputs.clear_grads()
    loss = fn(inputs)
    loss.backward()
    grads = [g.detach().clone() for g in inputs.grads()]
    inputs.clear_grads()
    return float(loss.detach()), grads


def _reference(case, inputs: Inputs):
    """mmloss's own value (float64 oracle where it exists, else the torch backend)."""
    fn = getattr(mmloss.reference, case.mmloss_name, None)
    if fn is not None:
        double = Inputs(inputs.batch, tuple(t.detach().double().requires_grad_() for t in inputs.leaves),
                        None if inputs.scale is None else inputs.scale.double(),
                        None if inputs.bias is None else inputs.bias.double(),
                        inputs.temperature, inputs.labels)
        value, grads = _value_and_grads(lambda inp: case.call(lambda *a, backend, **k: fn(*a, **k), inp, None),
                                        double)
        return value, [g.float() for g in grads]
    return _value_and_grads(mmloss_implementation("torch").factory(case, inputs), inputs)


PAIRS = [("dense", "clip"), ("dense", "siglip"), ("dense", "ntxent"), ("dense", "supcon"),
         ("open_clip", "clip"), ("open_clip", "siglip"), ("lightly", "ntxent"), ("pml", "ntxent"),
         ("pml", "supcon")]


@pytest.mark.parametrize("peer,loss", PAIRS, ids=[f"{p}-{c}" for p, c in PAIRS])
def test_peer_computes_the_same_loss(peer, loss):
    case = CASES[loss]
    if not _installed(peer):
        pytest.skip(f"{peer} is not installed: {peers.peer_status(peer, torch.device('cpu'))}")
    inputs = case.make_inputs(BATCH, DIM, torch.float32, "cpu", seed=3)
    expected, expected_grads = _reference(case, inputs)
    value, grads = _value_and_grads(peers.make_call(peer, case, inputs), inputs)
    assert value == pytest.approx(expected, rel=1e-5, abs=1e-6)
    for g, e in zip(grads, expected_grads):
        assert (g - e).abs().max() <= 1e-4 * e.abs().max()


@pytest.mark.parametrize("peer", ["pml", "lightly"])
def test_peer_ntxent_equals_mmloss_ntxent(peer):
    """pytorch-metric-learning's NTXentLoss on cat(out0, out1) with labels cat(arange B, arange B),
    and lightly's NTXentLoss (its file loaded by path, without its package), are docs/losses.md §4:
    checked against mmloss.ntxent_loss in float64 (values and gradients)."""
    if not _installed(peer):
        pytest.skip(f"{peer} is not installed: {peers.peer_status(peer, torch.device('cpu'))}")
    case = CASES["ntxent"]
    inputs = case.make_inputs(BATCH, DIM, torch.float64, "cpu", seed=5)
    ours, our_grads = _value_and_grads(lambda inp: mmloss.ntxent_loss(*inp.leaves, temperature=0.5), inputs)
    theirs, their_grads = _value_and_grads(peers.make_call(peer, case, inputs), inputs)
    assert theirs == pytest.approx(ours, rel=1e-9)
    for g, e in zip(their_grads, our_grads):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-9)


# Top-level names a peer loader must never add to sys.modules: the packages whose files are loaded
# by path (their __init__ pulls torchvision), and torchvision itself.
PLANTABLE = ("lightly", "open_clip", "torchvision")


class _SysModulesSpy(importlib.abc.MetaPathFinder):
    """First on sys.meta_path while the peers load: at every import they trigger, it notes the
    names under PLANTABLE that sys.modules holds and did not hold before (a planted module is
    seen even when the loader removes it again afterwards)."""

    def __init__(self, before: set):
        self.before, self.seen = before, set()

    def find_spec(self, fullname, path=None, target=None):
        self.seen |= {k for k in list(sys.modules) if k not in self.before and k.split(".")[0] in PLANTABLE}
        return None  # finds nothing: the ordinary finders do the importing


def test_loading_every_peer_plants_nothing_in_sys_modules():
    """Issue 9: peers are loaded by file path, never by planting bare or fake modules (torchvision,
    lightly's packages) in sys.modules, during loading or after it."""
    before = set(sys.modules)
    spy = _SysModulesSpy(before)
    peers.load_peer.cache_clear()  # load afresh, under the spy
    sys.meta_path.insert(0, spy)
    try:
        for name in peers.PEERS:
            try:
                peers.load_peer(name)
            except peers.PeerUnavailable:
                pass
    finally:
        sys.meta_path.remove(spy)
    added = {k for k in sys.modules if k not in before and k.split(".")[0] in PLANTABLE}
    assert not added, f"left in sys.modules: {sorted(added)}"
    assert not spy.seen, f"planted while loading: {sorted(spy.seen)}"


def test_gpu_only_peers_report_why_on_cpu():
    for name in ("inf_cl", "memeff", "siglip_kernel"):
        reason = peers.peer_status(name, torch.device("cpu"))
        assert reason and ("CUDA" in reason or "not installed" in reason)


def test_memory_model_skips_cubic_pml_ntxent():
    case = CASES["ntxent"]
    # 2B·2B·(2B−2) pair products: hundreds of GiB at B = 1024, nothing like mmloss's O(B·D).
    assert peers.estimate_bytes("pml", case, 1024, torch.float32) > 100 * 2**30
    assert peers.estimate_bytes("dense", CASES["clip"], 4096, torch.float32) >= 4096 * 4096 * 4


def _wrong(label: str, loss_factor: float, grad_factor: float) -> Implementation:
    """The dense CLIP baseline with its loss and/or gradients deliberately scaled (as a peer that
    computes another normalisation, or rescales its gradients, would)."""
    case = CASES["clip"]

    def factory(case_, inputs):
        def call(inp: Inputs):
            x, y = inp.leaves
            scaled = [t * grad_factor + (t * (1 - grad_factor)).detach() for t in (x, y)]
            return loss_factor * case.dense(*scaled, inp.scale)

        return call

    return Implementation(label, "peer", label, lambda c: None if c.name == "clip" else "clip only", factory,
                          lambda c, b, d: None)


def test_sweep_flags_a_different_loss_and_different_gradients():
    plan = Plan(torch.device("cpu"), [CASES["clip"]], {"clip": [48]}, [16], [torch.float32],
                [mmloss_implementation("torch"), peer_implementation("dense"), _wrong("off-loss", 1.01, 1.0),
                 _wrong("off-grad", 1.0, 2.0)], repeats=1)
    rows = {r.impl: r for r in Sweep(plan).run()}
    assert rows["mmloss[torch]"].check == "ref"
    assert rows["dense"].check == "ok"
    assert rows["off-loss"].check.startswith("LOSS≠")
    assert "GRAD≠" in rows["off-grad"].check and "LOSS≠" not in rows["off-grad"].check
    assert rows["dense"].time_vs_dense == pytest.approx(1.0)
    assert rows["floor (4×mm)"].total is not None and rows["floor (4×mm)"].time_over_floor == 1.0



def test_bf16_dense_peers_are_not_flagged():
    """Dense peers return a bf16 loss (rounded by up to 2⁻⁸): the same loss must still read "ok"."""
    plan = Plan(torch.device("cpu"), [CASES["clip"], CASES["ntxent"]], {"clip": [64], "ntxent": [64]}, [32],
                [torch.bfloat16], [mmloss_implementation("torch"), peer_implementation("dense")], repeats=1)
    rows = [r for r in Sweep(plan).run() if r.impl == "dense"]
    assert len(rows) == 2 and all(r.check == "ok" for r in rows), [(r.loss, r.check, r.loss_rel_err) for r in rows]
