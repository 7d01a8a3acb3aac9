"""Property-based checks (hypothesis): random shapes, masks, scales and chunkings of the
primitives on every CPU-capable backend agree with the float64 reference, values and gradients."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmloss
from oracle import compare, cpu_fast_backends, features, hypothesis_examples, logit_bound

BACKENDS = cpu_fast_backends()
# The rest (derandomized, no deadline) comes from the "mmloss" profile of tests/conftest.py;
# MMLOSS_HYPOTHESIS_EXAMPLES overrides the count.
SETTINGS = settings(max_examples=hypothesis_examples(30))


@st.composite
def problems(draw):
    n = draw(st.integers(1, 40))
    m = draw(st.integers(1, 40))
    d = draw(st.integers(1, 20))
    marks = draw(st.sampled_from(["none", "diagonal", "same_label"]))
    kw = {}
    if marks == "diagonal":
        kw["offset"] = draw(st.integers(-m, n))
    elif marks == "same_label":
        classes = draw(st.integers(1, 5))
        kw["x_labels"] = torch.tensor(draw(st.lists(st.integers(0, classes), min_size=n, max_size=n)))
        kw["y_labels"] = torch.tensor(draw(st.lists(st.integers(0, classes), min_size=m, max_size=m)))
    per_row = draw(st.booleans())
    scale = draw(st.floats(0.0, 60.0))
    bias = draw(st.one_of(st.none(), st.floats(-10.0, 10.0)))
    chunk = draw(st.integers(1, n))
    backend = draw(st.sampled_from(BACKENDS))
    seed = draw(st.integers(0, 2**16))
    unit = draw(st.booleans())
    return dict(n=n, m=m, d=d, marks=marks, kw=kw, per_row=per_row, scale=scale, bias=bias,
                chunk=chunk, backend=backend, seed=seed, unit=unit)


def _inputs(p):
    x = features(p["n"], p["d"], dtype=torch.float64, seed=p["seed"], normalize=p["unit"])
    y = features(p["m"], p["d"], dtype=torch.float64, seed=p["seed"] + 1, normalize=p["unit"])
    if p["per_row"]:
        g = torch.Generator().manual_seed(p["seed"] + 2)
        scale = (torch.rand(p["n"], generator=g, dtype=torch.float64) * p["scale"]).requires_grad_()
    else:
        scale = torch.tensor(p["scale"], dtype=torch.float64, requires_grad=True)
    bias = None if p["bias"] is None else torch.tensor(p["bias"], dtype=torch.float64, requires_grad=True)
    return x, y, scale, bias


def _fp64_capable(backend: str) -> bool:
    return backend in ("torch", "cpu")


@SETTINGS
@given(problems())
def test_similarity_lse_matches_reference(p):
    x, y, scale, bias = _inputs(p)
    dtype = torch.float64 if _fp64_capable(p["backend"]) else torch.float32
    x, y = x.detach().to(dtype).requires_grad_(), y.detach().to(dtype).requires_grad_()
    weights = torch.rand(p["n"] + p["m"], generator=torch.Generator().manual_seed(p["seed"]))

    def fast(x, y, scale, bias):
        r, c = mmloss.ops.similarity_lse(x, y, scale, bias, exclude=p["marks"], chunk_size=p["chunk"],
                                         backend=p["backend"], **p["kw"])
        return torch.cat([r, c])

    def ref(x, y, scale, bias):
        return torch.cat(mmloss.reference.similarity_lse(x, y, scale, bias, exclude=p["marks"], **p["kw"]))

    compare(fast, ref, [x, y, scale, bias], dtype, f"similarity_lse {p}", weights=weights,
            logit_bound=logit_bound(x, y, scale, bias))


@SETTINGS
@given(problems())
def test_pairwise_sigmoid_matches_reference(p):
    x, y, scale, bias = _inputs(p)
    dtype = torch.float64 if _fp64_capable(p["backend"]) else torch.float32
    x, y = x.detach().to(dtype).requires_grad_(), y.detach().to(dtype).requires_grad_()
    weights = torch.rand(p["n"], generator=torch.Generator().manual_seed(p["seed"]))

    def fast(x, y, scale, bias):
        return mmloss.ops.pairwise_sigmoid(x, y, scale, bias, positives=p["marks"], chunk_size=p["chunk"],
                                           backend=p["backend"], **p["kw"])

    def ref(x, y, scale, bias):
        return mmloss.reference.pairwise_sigmoid(x, y, scale, bias, positives=p["marks"], **p["kw"])

    # The bias gradient Σ_ij w_i·(−z_ij)·sigmoid(−z_ij·L_ij) cancels between positives and
    # negatives (at scale 0 and bias ≈ 0 every term is ±w_i/2): it cannot be more accurate than
    # 4·eps·Σ|terms| ≤ 4·eps·m·Σ|w_i|, in the oracle as in the backend under test.
    floor = 4 * torch.finfo(dtype).eps * p["m"] * float(weights.abs().sum())
    compare(fast, ref, [x, y, scale, bias], dtype, f"pairwise_sigmoid {p}", weights=weights,
            logit_bound=logit_bound(x, y, scale, bias), grad_floors={3: floor})
