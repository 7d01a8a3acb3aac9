"""Backend dispatch (docs/design.md "Backends"): ``mmloss.available_backends()``, ``backend=``,
``MMLOSS_BACKEND`` and the modules' ``backend=`` argument.

Which backend ran is observed by recording calls to the dense reference primitives
(``mmloss.reference.similarity_lse`` / ``pairwise_sigmoid``, which the "reference" backend is)
and, independently, by a behaviour only the reference has: plain autograd, so double backward
works there while the fused primitives refuse it.
"""
from __future__ import annotations

import pytest
import torch

import mmloss
from _foundation_helpers import FAST_BACKENDS, pair, scalar_tensor
from oracle import assert_loss_close

ops = mmloss.ops
EXPECTED_NAMES = {"reference", "torch", "triton", "cuda", "cpu"}


@pytest.fixture
def reference_calls(monkeypatch):
    """Record every call of the reference primitives (still computing their results)."""
    calls = []
    for name in ("similarity_lse", "pairwise_sigmoid"):
        original = getattr(mmloss.reference, name)

        def recorder(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(mmloss.reference, name, recorder)
    return calls


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("MMLOSS_BACKEND", raising=False)


def _inputs():
    x, y = pair(7, 7, 3, seed=1)
    return x, y, scalar_tensor(5.0), scalar_tensor(-2.0)


# Each entry runs one public entry point with a given backend ("auto" when None) and returns
# the primitive it must reach.
CALLS = {
    "similarity_lse": (lambda x, y, s, b, be: ops.similarity_lse(x, y, s, b, **be), "similarity_lse"),
    "pairwise_sigmoid": (lambda x, y, s, b, be: ops.pairwise_sigmoid(x, y, s, b, **be), "pairwise_sigmoid"),
    "clip_loss": (lambda x, y, s, b, be: mmloss.clip_loss(x, y, s, b, **be), "similarity_lse"),
    "infonce_loss": (lambda x, y, s, b, be: mmloss.infonce_loss(x, y, s, **be), "similarity_lse"),
    "siglip_loss": (lambda x, y, s, b, be: mmloss.siglip_loss(x, y, s, b, **be), "pairwise_sigmoid"),
    "ClipLoss": (lambda x, y, s, b, be: mmloss.ClipLoss(**be)(x, y, s, b), "similarity_lse"),
    "InfoNCELoss": (lambda x, y, s, b, be: mmloss.InfoNCELoss(**be)(x, y, s), "similarity_lse"),
    "SigLipLoss": (lambda x, y, s, b, be: mmloss.SigLipLoss(**be)(x, y, s, b), "pairwise_sigmoid"),
}


def _run(entry: str, backend=None):
    call, primitive = CALLS[entry]
    return call(*_inputs(), {} if backend is None else {"backend": backend}), primitive


# ----------------------------------------------------------------------------- available_backends


def test_available_backends_shape():
    report = mmloss.available_backends()
    assert isinstance(report, dict) and set(report) == EXPECTED_NAMES, report
    for name, reason in report.items():
        assert reason is None or (isinstance(reason, str) and reason.strip() and "\n" not in reason), (name, reason)
    assert report["reference"] is None and report["torch"] is None
    assert mmloss.available_backends() == report, "the report changes between calls"


# ----------------------------------------------------------------------------- explicit backend


@pytest.mark.parametrize("entry", list(CALLS))
def test_explicit_reference_backend(entry, reference_calls, no_env):
    _, primitive = _run(entry, "reference")
    assert reference_calls == [primitive]


@pytest.mark.parametrize("backend", FAST_BACKENDS, ids=[f"be={b}" for b in FAST_BACKENDS])
@pytest.mark.parametrize("entry", list(CALLS))
def test_explicit_fast_backend_skips_reference(entry, backend, reference_calls, no_env):
    _run(entry, backend)
    assert reference_calls == []


@pytest.mark.parametrize("entry", list(CALLS))
def test_auto_on_cpu_is_not_the_reference(entry, reference_calls, no_env):
    """Without MMLOSS_BACKEND, "auto" on CPU tensors picks cpu or torch, never the dense oracle."""
    _run(entry)
    assert reference_calls == []
    _run(entry, "auto")
    assert reference_calls == []


# ----------------------------------------------------------------------------- MMLOSS_BACKEND


@pytest.mark.parametrize("entry", list(CALLS))
def test_env_reference_changes_auto(entry, reference_calls, monkeypatch):
    monkeypatch.setenv("MMLOSS_BACKEND", "reference")
    _, primitive = _run(entry)
    assert reference_calls == [primitive]


@pytest.mark.parametrize("entry", list(CALLS))
def test_explicit_backend_wins_over_env(entry, reference_calls, monkeypatch):
    monkeypatch.setenv("MMLOSS_BACKEND", "reference")
    _run(entry, "torch")
    assert reference_calls == [], "an explicit backend='torch' must win over MMLOSS_BACKEND=reference"
    monkeypatch.setenv("MMLOSS_BACKEND", "torch")
    _, primitive = _run(entry, "reference")
    assert reference_calls == [primitive], "an explicit backend='reference' must win over MMLOSS_BACKEND=torch"


def test_env_auto_value_means_auto(reference_calls, monkeypatch):
    monkeypatch.setenv("MMLOSS_BACKEND", "auto")
    _run("clip_loss")
    assert reference_calls == []


def test_env_is_read_per_call(reference_calls, monkeypatch):
    """The module built before the variable changes follows it at the next call."""
    monkeypatch.delenv("MMLOSS_BACKEND", raising=False)
    loss_fn = mmloss.ClipLoss()
    x, y, s, b = _inputs()
    loss_fn(x, y, s)
    assert reference_calls == []
    monkeypatch.setenv("MMLOSS_BACKEND", "reference")
    loss_fn(x, y, s)
    assert reference_calls == ["similarity_lse"]


# ----------------------------------------------------------------------------- observable behaviour


def _second_order(backend=None):
    """d/dx of |∂L/∂x|² for a SigLIP loss: needs double backward through the primitive."""
    x, y = pair(7, 7, 3, seed=2)
    kwargs = {} if backend is None else {"backend": backend}
    loss = mmloss.siglip_loss(x, y, 5.0, -2.0, reduction="none", **kwargs).sum()
    (gx,) = torch.autograd.grad(loss, [x], create_graph=True)
    return torch.autograd.grad(gx.pow(2).sum(), [x])[0]


def test_env_reference_is_plain_autograd(monkeypatch):
    """Behavioural check of MMLOSS_BACKEND without patching: the reference backend is plain
    autograd (double backward works), the fused primitives refuse double backward."""
    monkeypatch.delenv("MMLOSS_BACKEND", raising=False)
    with pytest.raises(RuntimeError):
        _second_order()
    monkeypatch.setenv("MMLOSS_BACKEND", "reference")
    hess = _second_order()
    assert bool(torch.isfinite(hess).all()) and bool((hess != 0).any())
    with pytest.raises(RuntimeError):
        _second_order("torch")


@pytest.mark.parametrize("backend", FAST_BACKENDS, ids=[f"be={b}" for b in FAST_BACKENDS])
def test_backends_agree_through_modules(backend, no_env):
    x, y, s, b = _inputs()
    for cls, args in ((mmloss.ClipLoss, (x, y, s, b)), (mmloss.SigLipLoss, (x, y, s, b)),
                      (mmloss.InfoNCELoss, (x, y, s))):
        fast = cls(backend=backend)(*args)
        dense = cls(backend="reference")(*args)
        assert_loss_close(fast, dense.double(), torch.float32, f"{cls.__name__} {backend} vs reference")
