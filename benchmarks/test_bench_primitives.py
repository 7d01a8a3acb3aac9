"""pytest-benchmark suite of the fused primitives (docs/design.md, "The primitives").

``similarity_lse`` with both row and column statistics (the CLIP shape) and ``pairwise_sigmoid``
(per-row sums, and the summed form SigLIP uses), forward + backward, on every mmloss backend that
runs on the device (the dense ``reference`` backend only where its N×M matrices fit comfortably).
Each benchmark also checks its value against the reference backend at sizes where that is cheap.
"""
from __future__ import annotations

import pytest
import torch

import mmloss
from mmloss.bench.cases import Inputs
from mmloss.ops import BACKENDS, resolve_backend

from bench_support import DEVICE, DIM, DTYPE, LOSS_RTOL, SIZES

SCALE, BIAS = 10.0, -10.0
REFERENCE_MAX_BATCH = 4096  # the dense reference holds several B×B matrices


def _usable(backend: str) -> bool:
    try:
        resolve_backend(backend, DEVICE)
    except RuntimeError:
        return False
    return True


BACKEND_PARAMS = [b for b in BACKENDS if _usable(b)]
CASES = [(b, n) for n in SIZES for b in BACKEND_PARAMS if b != "reference" or n <= REFERENCE_MAX_BATCH]


def _inputs(batch: int) -> Inputs:
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(batch, DIM, generator=generator), dim=1)
    y = torch.nn.functional.normalize(torch.randn(batch, DIM, generator=generator), dim=1)
    leaves = tuple(t.to(DEVICE, DTYPE).requires_grad_() for t in (x, y))
    return Inputs(batch, leaves, torch.tensor(SCALE, device=DEVICE), torch.tensor(BIAS, device=DEVICE))


def _lse_both(backend):
    def call(inp: Inputs) -> torch.Tensor:
        rows, cols = mmloss.similarity_lse(*inp.leaves, inp.scale, rows=True, cols=True, backend=backend)
        return rows.sum() + cols.sum()

    return call


def _sigmoid_rows(backend):
    def call(inp: Inputs) -> torch.Tensor:
        return mmloss.pairwise_sigmoid(*inp.leaves, inp.scale, inp.bias, backend=backend).sum()

    return call


def _sigmoid_summed(backend):
    def call(inp: Inputs) -> torch.Tensor:
        return mmloss.pairwise_sigmoid(*inp.leaves, inp.scale, inp.bias, reduction="sum", backend=backend)

    return call


def _expected(make, batch: int):
    if batch > REFERENCE_MAX_BATCH:
        return None
    inp = _inputs(batch)
    with torch.no_grad():
        return float(make("reference")(inp).float())


@pytest.mark.parametrize("backend,batch", CASES, ids=[f"{b}-B{n}" for b, n in CASES])
@pytest.mark.parametrize("primitive", ["similarity_lse_rows_cols", "pairwise_sigmoid_rows", "pairwise_sigmoid_sum"])
def test_primitive_forward_backward(fwd_bwd, primitive, backend, batch):
    make = {"similarity_lse_rows_cols": _lse_both, "pairwise_sigmoid_rows": _sigmoid_rows,
            "pairwise_sigmoid_sum": _sigmoid_summed}[primitive]
    inp = _inputs(batch)
    value = fwd_bwd(make(backend), inp, f"{primitive} B={batch} D={DIM}")
    expected = _expected(make, batch)
    if expected is not None:
        assert value == pytest.approx(expected, rel=LOSS_RTOL)
    else:
        assert torch.isfinite(torch.tensor(value))
