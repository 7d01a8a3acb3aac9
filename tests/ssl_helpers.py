"""Inputs, the loss table and shared checks of the self-supervised tests (tests/test_ssl_common.py and
the per-loss files tests/test_ntxent.py, test_supcon.py, test_dcl.py, test_dhel.py, test_multiview.py,
test_hcl.py)."""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

import mmloss
from oracle import compare, oracle

ref = mmloss.reference
F = mmloss.functional


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in reversed-dimension storage order (a strided, non-contiguous leaf)."""
    dims = list(range(t.dim()))
    out = t.permute(*dims[::-1]).contiguous().permute(*dims[::-1])
    assert not out.is_contiguous()
    return out


def views(v: int, n: int, d: int, *, dtype=torch.float32, seed: int = 0, noise: float = 0.7,
          stacked: bool = False, noncontig: bool = False):
    """V correlated views of n instances (base + noise), rows of random length in [0.3, 3]:
    a list of V (n, d) leaves, or one (V, n, d) leaf with ``stacked``."""
    g = torch.Generator().manual_seed(1000 + seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    parts = []
    for _ in range(v):
        t = base + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
        t = t * (0.3 + 2.7 * torch.rand(n, 1, generator=g, dtype=torch.float64))
        parts.append(t)
    if stacked:
        t = torch.stack(parts).to(dtype)
        return (noncontiguous(t) if noncontig and n > 1 else t).requires_grad_()
    out = []
    for t in parts:
        t = t.to(dtype)
        out.append((noncontiguous(t) if noncontig and n > 1 and d > 1 else t).requires_grad_())
    return out


def identical_rows(n: int, d: int, *, v: int = 2, dtype=torch.float64):
    """V views whose every row is the same direction, with different lengths."""
    direction = torch.nn.functional.normalize(torch.arange(1.0, d + 1, dtype=torch.float64), dim=0)
    lengths = torch.linspace(0.5, 4.0, n * v, dtype=torch.float64).reshape(v, n, 1)
    return [(lengths[k] * direction).to(dtype).requires_grad_() for k in range(v)]


# ----------------------------------------------------------------------------- the loss table
#
# Each entry: how to build inputs (a list of tensors) and how to call the fast function and the
# reference on them, with optional non-default options.


def supcon2d_labels(n: int) -> torch.Tensor:
    return torch.arange(n) % max(2, n // 3)   # classes of ~3 rows; every class has negatives


class Loss:
    def __init__(self, name, build, fast, reference, options=None, min_rows=2):
        self.name, self.build, self.fast, self.reference = name, build, fast, reference
        self.options = options or {}
        self.min_rows = min_rows

    def run(self, inputs, backend, **opts):
        return self.fast(*inputs, backend=backend, **opts)

    def oracle(self, inputs, **opts):
        return self.reference(*inputs, **opts)


def _two(n, d, dtype=torch.float32, seed=0, noncontig=False):
    return views(2, n, d, dtype=dtype, seed=seed, noncontig=noncontig)


def _supcon3d(n, d, dtype=torch.float32, seed=0, noncontig=False):
    """(B, 3, D): three views per sample, built as (V, B, D) and transposed."""
    t = views(3, n, d, dtype=dtype, seed=seed, stacked=True, noncontig=False).detach()
    t = t.transpose(0, 1)
    return [(t if noncontig else t.contiguous()).requires_grad_()]


def _supcon2d(n, d, dtype=torch.float32, seed=0, noncontig=False):
    return views(1, n, d, dtype=dtype, seed=seed, noncontig=noncontig)


def _stacked3(n, d, dtype=torch.float32, seed=0, noncontig=False):
    return [views(3, n, d, dtype=dtype, seed=seed, stacked=True, noncontig=noncontig)]


def weights_by_distance(a, b):
    """A user weight_fn as in lightly's docstring example."""
    return torch.sum((a - b) ** 2, dim=1)


LOSSES = {
    "ntxent": Loss("ntxent", _two, F.ntxent_loss, ref.ntxent_loss, {"temperature": 0.2}, min_rows=1),
    "supcon2d": Loss(
        "supcon2d", _supcon2d,
        lambda x, backend, **o: F.supcon_loss(x, supcon2d_labels(x.shape[0]), backend=backend, **o),
        lambda x, **o: ref.supcon_loss(x, supcon2d_labels(x.shape[0]), **o),
        {"temperature": 0.3, "base_temperature": 0.07}, min_rows=1),
    "supcon3d": Loss(
        "supcon3d", _supcon3d,
        lambda x, backend, **o: F.supcon_loss(x, backend=backend, **o),
        lambda x, **o: ref.supcon_loss(x, **o),
        {"temperature": 0.3, "base_temperature": 0.07}, min_rows=1),
    "dcl": Loss("dcl", _two, F.dcl_loss, ref.dcl_loss,
                {"temperature": 0.3, "weight_fn": weights_by_distance}),
    "dclw": Loss("dclw", _two, F.dclw_loss, ref.dclw_loss, {"temperature": 0.3, "sigma": 0.8}),
    "dhel": Loss("dhel", _two, F.dhel_loss, ref.dhel_loss, {"temperature": 0.2, "include_augs": False}),
    "mv_infonce": Loss("mv_infonce", _stacked3, F.mv_infonce_loss, ref.mv_infonce_loss,
                       {"temperature": 0.4, "same_view_negatives": False}, min_rows=1),
    "mv_dhel": Loss("mv_dhel", _stacked3, F.mv_dhel_loss, ref.mv_dhel_loss, {"temperature": 0.4}),
    "hcl": Loss("hcl", _two, F.hcl_loss, ref.hcl_loss, {"temperature": 0.3, "tau_plus": 0.25, "beta": 0.5}),
}


NAMES = sorted(LOSSES)


TWO_VIEW = ["dcl", "dclw", "dhel", "hcl", "ntxent"]


NEEDS_NEGATIVES = ["dcl", "dclw", "dhel", "hcl", "mv_dhel"]   # N = 1 is a ValueError


# docs/losses.md defaults of the temperature (and HCL's β), for the logit bound of the oracle rule.
DEFAULT_TEMPERATURE = {"ntxent": 0.5, "supcon2d": 0.1, "supcon3d": 0.1, "dcl": 0.1, "dclw": 0.1, "dhel": 0.3,
                       "mv_infonce": 0.1, "mv_dhel": 0.1, "hcl": 0.5}


def logit_bound_of(name: str, opts=None) -> float:
    """docs/design.md's L (the largest |logit|) of a call: the losses normalise their rows, so a
    logit is at most 1/τ in magnitude — (1+β)/τ in HCL's first block."""
    opts = opts or {}
    tau = opts.get("temperature", DEFAULT_TEMPERATURE[name])
    return (1.0 + opts.get("beta", 1.0)) / tau if name == "hcl" else 1.0 / tau


def check(loss: Loss, inputs, dtype, backend="torch", weights=None, **opts):
    return compare(lambda *t: loss.run(t, backend, **opts), lambda *t: loss.oracle(t, **opts),
                   inputs, dtype, what=loss.name, weights=weights, logit_bound=logit_bound_of(loss.name, opts))


def closed_form_check(value_fn, inputs, expected: float):
    fast = value_fn(inputs, "torch").detach()
    slow = value_fn([oracle(t) for t in inputs], None).detach()
    assert math.isclose(float(slow), expected, rel_tol=1e-10, abs_tol=1e-10), (float(slow), expected)
    assert math.isclose(float(fast), expected, rel_tol=1e-10, abs_tol=1e-10), (float(fast), expected)


def lightly_file(relative: str, module_name: str):
    """One lightly source file loaded by path (lightly's package import needs torchvision);
    skips, naming the missing package, when lightly or the file's own imports are missing."""
    spec = importlib.util.find_spec("lightly")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lightly is not installed: no lightly comparison")
    path = os.path.join(list(spec.submodule_search_locations)[0], *relative.split("/"))
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ModuleNotFoundError as exc:
        pytest.skip(f"lightly's {relative} cannot be imported without the missing package {exc.name!r}")
    return module


def pml_losses():
    if importlib.util.find_spec("pytorch_metric_learning") is None:
        pytest.skip("pytorch-metric-learning is not installed: no comparison")
    from pytorch_metric_learning import losses

    return losses
