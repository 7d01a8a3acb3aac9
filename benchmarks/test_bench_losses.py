"""pytest-benchmark suite of the main losses against the dense baseline and the installed peers.

One benchmark group per (loss, batch): every mmloss backend that runs on the device, the dense
torch baseline, ``torch.compile`` of it (not in smoke mode: compiling is the slow part there) and
every installed peer that implements the loss — the same adapters ``python -m mmloss.bench`` uses.
Combinations whose memory model exceeds what is free are not collected. Each benchmark checks that
its loss equals mmloss's (the torch backend's) value.
"""
from __future__ import annotations

import functools

import pytest
import torch

from mmloss.bench import measure, peers
from mmloss.bench.cases import CASES, DEFAULT_LOSSES
from mmloss.bench.implementations import mmloss_implementation, peer_implementation
from mmloss.ops import BACKENDS, resolve_backend

from bench_support import DEVICE, DIM, DTYPE, LOSS_RTOL, SIZES, SMOKE

LOSSES = [CASES[n] for n in DEFAULT_LOSSES + ("supcon",) if CASES[n].mmloss_function() is not None]


def _backend_usable(backend: str) -> bool:
    try:
        resolve_backend(backend, DEVICE)
    except RuntimeError:
        return False
    return True


def _implementations():
    impls = [mmloss_implementation(b) for b in BACKENDS if b != "reference" and _backend_usable(b)]
    for name in peers.PEERS:
        if name == "compile" and SMOKE:
            continue
        if peers.peer_status(name, DEVICE) is None:
            impls.append(peer_implementation(name))
    return impls


def _free_bytes() -> int:
    probe = measure.memory_probe_for(DEVICE)
    try:
        return probe.available_bytes()
    except (OSError, RuntimeError):
        return 0


def _params():
    free = _free_bytes()
    params = []
    for case in LOSSES:
        for batch in SIZES:
            for impl in _implementations():
                if impl.supports(case) is not None:
                    continue
                need = impl.estimate(case, batch, DTYPE)
                if need is not None and free and need > 0.5 * free:
                    continue
                params.append(pytest.param(case, batch, impl, id=f"{case.name}-B{batch}-{impl.label}"))
    return params


@functools.lru_cache(maxsize=None)
def _mmloss_value(case_name: str, batch: int) -> float:
    case = CASES[case_name]
    inputs = case.make_inputs(batch, DIM, DTYPE, DEVICE)
    with torch.no_grad():
        return float(mmloss_implementation("torch").factory(case, inputs)(inputs).float())


@pytest.mark.parametrize("case,batch,impl", _params())
def test_loss_forward_backward(fwd_bwd, case, batch, impl):
    inputs = case.make_inputs(batch, DIM, DTYPE, DEVICE)
    fn = impl.factory(case, inputs)
    value = fwd_bwd(fn, inputs, f"{case.name} B={batch} D={DIM} {str(DTYPE).replace('torch.', '')}")
    assert value == pytest.approx(_mmloss_value(case.name, batch), rel=LOSS_RTOL)
