"""Shared test utilities: the float64 oracle comparison with DESIGN.md's tolerance rules.

fp32 paths: loss error ≤ 1e-5 relative or 1e-7 absolute; gradient max-abs error
≤ 1e-4·max|grad|. fp16/bf16 paths (compared with the float64 reference on the same rounded
inputs): loss relative error ≤ 1e-4; gradient relative norm error ≤ 1e-2. fp64 paths are held
to 1e-10 relative. Failures print the worst element.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

HALF = (torch.float16, torch.bfloat16)


def cpu_fast_backends() -> list[str]:
    """Backends other than "reference" that ``mmloss.available_backends()`` reports usable and
    that accept CPU tensors here ("torch" always; "triton" under TRITON_INTERPRET=1; "cpu" once
    mmloss._C is built). DESIGN.md: the torch backend runs on any device."""
    import mmloss

    usable = []
    for name, reason in mmloss.available_backends().items():
        if name == "reference" or reason is not None:
            continue
        try:
            mmloss.ops.resolve_backend(name, torch.device("cpu"))
        except RuntimeError:  # usable on this machine, but not on CPU tensors (e.g. "cuda")
            continue
        usable.append(name)
    assert "torch" in usable, f"the torch backend must always be usable: {mmloss.available_backends()}"
    return usable


def features(n: int, d: int, *, dtype=torch.float32, seed: int = 0, normalize: bool = True,
             noncontig: bool = False, scale: float = 1.0, requires_grad: bool = True) -> torch.Tensor:
    """(n, d) random rows (unit norm by default); ``noncontig`` returns a strided view."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, d, generator=g, dtype=torch.float64)
    if normalize:
        t = torch.nn.functional.normalize(t, dim=1)
    t = (t * scale).to(dtype)
    if noncontig:
        # column-major storage: same values, transposed strides
        t = t.t().contiguous().t()
        assert not t.is_contiguous() or n == 1 or d == 1
    return t.requires_grad_(requires_grad)


def oracle(t):
    """The same (already rounded) values as a float64 leaf for the reference."""
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.detach().to(torch.float64).requires_grad_(t.requires_grad)
    return t


def _worst(actual: torch.Tensor, expected: torch.Tensor) -> str:
    diff = (actual.double() - expected.double()).abs()
    if diff.numel() == 0:
        return "empty"
    idx = int(diff.reshape(-1).argmax())
    pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), diff.shape)) if diff.dim() else ()
    return (f"worst at {pos}: actual {actual.reshape(-1)[idx].item():.10g}, "
            f"expected {expected.reshape(-1)[idx].item():.10g}, |diff| {diff.reshape(-1)[idx].item():.3g}")


def assert_loss_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "loss"):
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
    assert torch.isfinite(a).eq(torch.isfinite(e)).all(), f"{what}: finiteness differs; {_worst(a, e)}"
    fin = torch.isfinite(e)
    if not bool(fin.all()):
        assert torch.equal(a[~fin], e[~fin]), f"{what}: non-finite entries differ"
        a, e = a[fin], e[fin]
    err = (a - e).abs()
    if dtype == torch.float64:
        ok = err <= 1e-10 * e.abs() + 1e-12
    elif dtype in HALF:
        ok = err <= 1e-4 * e.abs() + 1e-7
    else:
        ok = (err <= 1e-5 * e.abs()) | (err <= 1e-7)
    assert bool(ok.all()), f"{what} ({dtype}): {_worst(a, e)}"


def assert_grad_close(actual: Optional[torch.Tensor], expected: Optional[torch.Tensor], dtype: torch.dtype,
                      what: str = "grad"):
    if expected is None:
        assert actual is None or bool((actual == 0).all()), f"{what}: expected no gradient"
        return
    assert actual is not None, f"{what}: missing gradient"
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
    assert bool(torch.isfinite(a).all()), f"{what}: non-finite gradient; {_worst(a, e)}"
    if dtype in HALF:
        denom = e.norm()
        rel = (a - e).norm() / denom if denom > 0 else (a - e).norm()
        assert rel <= 1e-2, f"{what} ({dtype}): relative norm error {float(rel):.3g}; {_worst(a, e)}"
        return
    tol = (1e-10 if dtype == torch.float64 else 1e-4) * float(e.abs().max()) if e.numel() else 0.0
    err = float((a - e).abs().max()) if e.numel() else 0.0
    assert err <= tol, f"{what} ({dtype}): max abs error {err:.3g} > {tol:.3g}; {_worst(a, e)}"


def grads(output: torch.Tensor, inputs: Sequence) -> list:
    """Gradients of sum(output) w.r.t. the tensors of ``inputs`` that require grad (None for others)."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    got = torch.autograd.grad(output.sum(), leaves, allow_unused=True) if leaves else []
    it = iter(got)
    return [next(it) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in inputs]


def compare(fast_fn, ref_fn, inputs: Sequence, dtype: torch.dtype, what: str = "loss",
            weights: Optional[torch.Tensor] = None):
    """Run ``fast_fn(*inputs)`` and ``ref_fn(*oracle(inputs))``; compare values and gradients.

    ``weights`` (same shape as the output) makes the backward see a non-uniform upstream
    gradient ``sum(weights * output)``.
    """
    out = fast_fn(*inputs)
    ref_inputs = [oracle(t) for t in inputs]
    ref = ref_fn(*ref_inputs)
    assert_loss_close(out, ref, dtype, what)
    w = weights if weights is not None else torch.ones_like(ref)
    fin_out = torch.where(torch.isfinite(out), out, 0)
    fin_ref = torch.where(torch.isfinite(ref), ref, 0)
    g_fast = grads(fin_out * w.to(out.dtype), inputs)
    g_ref = grads(fin_ref * w.to(ref.dtype), ref_inputs)
    for i, (a, e) in enumerate(zip(g_fast, g_ref)):
        if e is not None or a is not None:
            assert_grad_close(a, e, dtype, f"{what}: grad of input {i}")
    return out, ref
