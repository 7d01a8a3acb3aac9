"""Helpers shared by the Foundation acceptance tests (primitives, docs/losses.md §1–§3, dispatch).

Everything here builds inputs or expected values from the contract documents (docs/design.md,
docs/losses.md); nothing reads mmloss internals. Comparisons themselves use tests/oracle.py.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional

import pytest
import torch

from oracle import cpu_fast_backends, features

CPU = torch.device("cpu")


FAST_BACKENDS = cpu_fast_backends()
# docs/design.md: fp64 inputs (gradcheck) run on the reference, torch and cpu backends.
FP64_BACKENDS = [name for name in FAST_BACKENDS if name in ("torch", "cpu")]


def backend_param():
    """``@backend_param()`` parametrizes a test over FAST_BACKENDS with readable ids."""
    return pytest.mark.parametrize("backend", FAST_BACKENDS, ids=[f"be={b}" for b in FAST_BACKENDS])


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


def backend_dtype_param(dtypes):
    """Parametrize ``backend`` × ``dtype`` (keys of DTYPES): fp64 only with FP64_BACKENDS, the
    backends docs/design.md runs fp64 on, so no combination has to be skipped."""
    combos = [(b, k) for b in FAST_BACKENDS for k in dtypes if k != "fp64" or b in FP64_BACKENDS]
    return pytest.mark.parametrize("backend,dtype", combos, ids=[f"be={b}-dtype={k}" for b, k in combos])


def fp64_backend_param():
    """Parametrize over the fast backends that take float64 inputs (gradcheck)."""
    return pytest.mark.parametrize("backend", FP64_BACKENDS, ids=[f"be={b}" for b in FP64_BACKENDS])


def gradcheck_inputs(n: int, m: int, d: int, seed: int, *, scale: float = 2.0, bias: float = -1.0):
    """Small float64 leaves (x, y, 0-d scale, 0-d bias) for torch.autograd.gradcheck."""
    g = torch.Generator().manual_seed(70_000 + seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_(True)
    y = torch.randn(m, d, generator=g, dtype=torch.float64).requires_grad_(True)
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    return x, y, s, b


def upstream(shape, seed: int) -> torch.Tensor:
    """Random, non-uniform upstream weights in [0.25, 1.75] (float64, like the oracle)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return 0.25 + 1.5 * torch.rand(shape, generator=g, dtype=torch.float64)


def ids(n: int, classes: int, seed: int) -> torch.Tensor:
    """(n,) int64 class ids drawn from ``range(classes)``."""
    g = torch.Generator().manual_seed(20_000 + seed)
    return torch.randint(0, classes, (n,), generator=g)


def row_scale(n: int, seed: int, low: float = 0.5, high: float = 12.0) -> torch.Tensor:
    """(n,) fp32 per-row scale requiring grad."""
    g = torch.Generator().manual_seed(30_000 + seed)
    return (low + (high - low) * torch.rand(n, generator=g)).requires_grad_(True)


def scalar_tensor(value: float, dtype=torch.float32) -> torch.Tensor:
    """A 0-d leaf requiring grad (a learnable logit scale / bias)."""
    return torch.tensor(value, dtype=dtype, requires_grad=True)


def pair(n: int, m: int, d: int, *, dtype=torch.float32, seed: int = 0, noncontig: bool = False):
    """Two independent unit-row feature matrices (n, d), (m, d)."""
    return (features(n, d, dtype=dtype, seed=2 * seed, noncontig=noncontig),
            features(m, d, dtype=dtype, seed=2 * seed + 1, noncontig=noncontig))


def strided_rows(n: int, d: int, *, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """(n, d) view taking every other row and column of a larger leaf: non-contiguous in both
    dimensions (row stride 2·2d, column stride 2); requires grad through the view."""
    base = features(2 * n, 2 * d, dtype=dtype, seed=seed)
    view = base[::2, ::2]
    assert not view.is_contiguous() or n == 1
    return view


def confident_pair(n: int, d: int, *, dtype=torch.float32, seed: int = 0, noise: float = 0.02):
    """Near-identical (x_i, y_i) pairs: y = normalize(x + noise·ε). With scale 100 the positive
    logit dominates every row and column (docs/losses.md numerics: "confident rows")."""
    g = torch.Generator().manual_seed(40_000 + seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(x + noise * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return x.to(dtype).requires_grad_(True), y.to(dtype).requires_grad_(True)


def orthonormal_rows(n: int, d: int, dtype=torch.float32, rows: Optional[list] = None) -> torch.Tensor:
    """Rows ``e_{rows[i]}`` of the d×d identity (default rows 0..n−1): unit, mutually orthogonal."""
    rows = list(range(n)) if rows is None else rows
    assert len(rows) == n and max(rows) < d
    return torch.eye(d, dtype=torch.float64)[rows].to(dtype).requires_grad_(True)


def softplus(t: float) -> float:
    """log(1 + e^t) in float64, exact at every magnitude."""
    return max(t, 0.0) + math.log1p(math.exp(-abs(t)))


def lse_vector(fn, **kwargs):
    """Wrap a ``similarity_lse`` implementation so its (row, col) outputs become one vector
    (the non-None parts concatenated), the form tests/oracle.py ``compare`` expects."""

    def run(x, y, scale, bias=None):
        row, col = fn(x, y, scale, bias, **kwargs)
        parts = [t for t in (row, col) if t is not None]
        return torch.cat(parts)

    return run


def sigmoid_rows(fn, **kwargs):
    def run(x, y, scale, bias=None):
        return fn(x, y, scale, bias, **kwargs)

    return run


# ----------------------------------------------------------------------------- open_clip


def open_clip_loss_module():
    """open_clip's ``loss.py`` loaded by path (it imports only torch; the package's top-level
    import needs torchvision). Skips when open_clip is not installed (a missing dependency)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip (pip package open_clip_torch) is not installed: no open_clip comparison")
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    if not os.path.isfile(path):
        pytest.skip(f"open_clip is installed without loss.py ({path}): no open_clip comparison")
    module_spec = importlib.util.spec_from_file_location("_mmloss_tests_open_clip_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
