"""The peer adapters compute mmloss's losses (values and gradients), and the sweep notices when
an implementation does not.

These are fast correctness tests of ``mmloss.bench`` (no timing). A peer that is not installed is
skipped with its name; the dense baselines are always checked against ``mmloss.reference``.
"""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

import mmloss
from mmloss.bench import peers
from mmloss.bench.cases import CASES, Inputs
from mmloss.bench.sweep import Implementation, Plan, Sweep, mmloss_implementation, peer_implementation

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


def test_pml_ntxent_equals_mmloss_ntxent():
    """pytorch-metric-learning's NTXentLoss on cat(out0, out1) with labels cat(arange B, arange B)
    is docs/losses.md §4: checked against mmloss.ntxent_loss (values and gradients)."""
    if not _installed("pml"):
        pytest.skip("pytorch-metric-learning is not installed")
    case = CASES["ntxent"]
    inputs = case.make_inputs(BATCH, DIM, torch.float64, "cpu", seed=5)
    ours, our_grads = _value_and_grads(lambda inp: mmloss.ntxent_loss(*inp.leaves, temperature=0.5), inputs)
    theirs, their_grads = _value_and_grads(peers.make_call("pml", case, inputs), inputs)
    assert theirs == pytest.approx(ours, rel=1e-9)
    for g, e in zip(their_grads, our_grads):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-9)


def test_lightly_loader_leaves_sys_modules_as_it_found_them():
    if importlib.util.find_spec("lightly") is None:
        pytest.skip("lightly is not installed")
    before = {k for k in sys.modules if k.split(".")[0] in ("lightly", "torchvision")}
    peers.load_peer.cache_clear()
    try:
        peers.load_peer("lightly")
    except peers.PeerUnavailable:
        pass
    after = {k for k in sys.modules if k.split(".")[0] in ("lightly", "torchvision")}
    assert after == before


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
