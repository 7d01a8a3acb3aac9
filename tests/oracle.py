"""Shared test utilities: the float64 oracle comparison with docs/design.md's tolerance rules.

The reference is computed in float64 on the CPU from the same (already rounded) inputs.

Loss values (``assert_loss_close``), elementwise, with ``L`` the largest |logit| of the case
(``logit_bound(x, y, scale, bias)`` = s·max‖x‖·max‖y‖ + |b|; default 1.0, unit-norm features at
scale ~1 — callers with larger logits must pass it):

* fp32:       |actual − ref| ≤ 1e-5·|ref| + 1e-6·L
* fp16/bf16:  |actual − ref| ≤ 1e-4·|ref| + 1e-6·L
* fp64:       |actual − ref| ≤ 1e-10·|ref| + 1e-12

fp32 rounds a logit by about L·2⁻²⁴, so a bare relative bound fails on the small losses of
confident rows and depends on the BLAS build (Intel and AMD CPUs round differently); the
L term covers that rounding, so the rule holds on any CPU vendor.

Gradients (``assert_grad_close``): fp32 max-abs error ≤ 1e-4·max|grad|; fp16/bf16 relative
norm error ≤ 1e-2; fp64 max-abs error ≤ 1e-10·max|grad|.

Randomized tests: ``hypothesis_examples(n)`` is the example count of a hypothesis test, n by
default (sized for the stage budgets), ``MMLOSS_HYPOTHESIS_EXAMPLES`` when set (tests/conftest.py).

Non-finite reference entries must be matched exactly (same NaN/±inf positions and values).
A failure names the element that failed the bound — the one with the largest error/bound
ratio — with its actual and expected values, error and bound (not merely the largest
difference, which can be a different, passing element).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Union

import torch

HALF = (torch.float16, torch.bfloat16)

# Loss rules: relative coefficient per dtype class, coefficient of the logit bound L, fp64 rule.
_LOSS_REL = {"fp32": 1e-5, "half": 1e-4}
_LOSS_PER_LOGIT = 1e-6
_FP64_REL, _FP64_ABS = 1e-10, 1e-12


def cpu_fast_backends() -> list[str]:
    """Backends other than "reference" that ``mmloss.available_backends()`` reports usable and
    that accept CPU tensors here ("torch" always; "triton" under TRITON_INTERPRET=1; "cpu" once
    mmloss._C is built). docs/design.md: the torch backend runs on any device."""
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


def logit_bound(x: torch.Tensor, y: torch.Tensor, scale: Union[float, torch.Tensor],
                bias: Union[None, float, torch.Tensor] = None) -> float:
    """L = s·max‖x‖·max‖y‖ + |b|: a bound on the largest |logit| of ``s·x·yᵀ + b``.

    x: (N, D), y: (M, D), any float dtype. scale: a number, a 0-d tensor, or an (N,) per-row
    tensor (then max_i |s_i|·‖x_i‖ replaces |s|·max‖x‖). bias: None, a number or a tensor
    (max |b|). Non-finite entries are left out (NaN/Inf cases are compared by position, the
    bound serves their finite entries). Returns a Python float ≥ 0 (0.0 for empty inputs).
    """
    def finite_max(t: torch.Tensor) -> float:
        t = t[torch.isfinite(t)]
        return float(t.max()) if t.numel() else 0.0

    x_norms = torch.linalg.vector_norm(x.detach().double().reshape(x.shape[0], -1), dim=1)
    y_norms = torch.linalg.vector_norm(y.detach().double().reshape(y.shape[0], -1), dim=1)
    if isinstance(scale, torch.Tensor):
        s = scale.detach().double().abs().reshape(-1)
        if s.numel() > 1:
            if s.numel() != x_norms.numel():
                raise ValueError(f"logit_bound: per-row scale has {s.numel()} entries for {x_norms.numel()} rows")
            scaled_rows = finite_max(s * x_norms)
        else:
            scaled_rows = finite_max(s) * finite_max(x_norms) if s.numel() else 0.0
    else:
        scaled_rows = abs(float(scale)) * finite_max(x_norms)
    if bias is None:
        b = 0.0
    elif isinstance(bias, torch.Tensor):
        b = finite_max(bias.detach().double().abs().reshape(-1))
    else:
        b = abs(float(bias))
    return scaled_rows * finite_max(y_norms) + b


def _position(flat_index: int, shape) -> tuple:
    if not shape:
        return ()
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), tuple(shape)))


def _describe(actual: torch.Tensor, expected: torch.Tensor, flat_index: int) -> str:
    a, e = actual.reshape(-1)[flat_index].item(), expected.reshape(-1)[flat_index].item()
    return f"element {_position(flat_index, actual.shape)}: actual {a:.10g}, expected {e:.10g}"


def _worst(actual: torch.Tensor, expected: torch.Tensor) -> str:
    """The element with the largest absolute difference (for rules with one global bound)."""
    diff = (actual.double() - expected.double()).abs()
    if diff.numel() == 0:
        return "empty"
    idx = int(diff.reshape(-1).nan_to_num(math.inf).argmax())
    return f"worst {_describe(actual, expected, idx)}, |diff| {diff.reshape(-1)[idx].item():.3g}"


def _check_non_finite(a: torch.Tensor, e: torch.Tensor, what: str) -> torch.Tensor:
    """Non-finite reference entries must be reproduced exactly (NaN where NaN, same-signed inf);
    finite ones must stay finite. Returns the mask of finite reference entries."""
    fin_e = torch.isfinite(e)
    same_nan = torch.isnan(a) & torch.isnan(e)
    bad = (torch.isfinite(a) != fin_e) | (~fin_e & ~same_nan & (a != e))
    if bool(bad.any()):
        idx = int(bad.reshape(-1).nonzero()[0])
        raise AssertionError(f"{what}: finiteness differs at {_describe(a, e, idx)} "
                             f"({int(bad.sum())} of {bad.numel()} elements)")
    return fin_e


def assert_loss_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "loss",
                      *, logit_bound: float = 1.0):
    """Elementwise loss rule of docs/design.md "Testing rules" for a path computing in ``dtype``.

    actual, expected: same shape (any; 0-d for reduced losses). logit_bound: L, the largest
    |logit| of the case (see ``logit_bound()``; 1.0 for unit features at scale ~1). Raises
    AssertionError naming the element with the largest error/bound ratio.
    """
    L = float(logit_bound)
    if not (math.isfinite(L) and L >= 0):
        raise ValueError(f"{what}: logit_bound must be a finite number ≥ 0, got {logit_bound!r}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
    fin = _check_non_finite(a, e, what)
    e_fin = torch.where(fin, e, 0.0)
    err = torch.where(fin, (a - e).abs(), 0.0)
    if dtype == torch.float64:
        bound, rule = _FP64_REL * e_fin.abs() + _FP64_ABS, f"{_FP64_REL:g}·|ref| + {_FP64_ABS:g}"
    else:
        rel = _LOSS_REL["half" if dtype in HALF else "fp32"]
        bound = rel * e_fin.abs() + _LOSS_PER_LOGIT * L
        rule = f"{rel:g}·|ref| + {_LOSS_PER_LOGIT:g}·L, L = {L:.6g}"
    failed = err > bound
    if not bool(failed.any()):
        return
    # bound > 0 wherever it is compared with a non-zero error except at L = 0 and ref = 0.
    ratio = torch.where(failed, err / bound, 0.0).nan_to_num(nan=math.inf)
    idx = int(ratio.reshape(-1).argmax())
    raise AssertionError(
        f"{what} ({dtype}): {_describe(a, e, idx)}, error {err.reshape(-1)[idx].item():.3g} "
        f"> bound {bound.reshape(-1)[idx].item():.3g} ({rule}); "
        f"{int(failed.sum())} of {failed.numel()} elements fail")


def assert_grad_close(actual: Optional[torch.Tensor], expected: Optional[torch.Tensor], dtype: torch.dtype,
                      what: str = "grad", floor: float = 0.0):
    """Gradient rules: fp32 max-abs error ≤ 1e-4·max|grad| (fp64: 1e-10·max|grad|); fp16/bf16
    relative norm error ≤ 1e-2. ``expected`` None means no gradient (``actual`` None or zero).
    ``floor``: an absolute error the gradient cannot beat in ``dtype`` — for a sum of many terms
    that cancel (e.g. a bias gradient Σ ±sigmoid), 4·eps·Σ|terms|: the rounding of the terms
    themselves, which the float64 oracle shares, so max|grad| is no measure of its accuracy."""
    if expected is None:
        assert actual is None or bool((actual == 0).all()), f"{what}: expected no gradient"
        return
    assert actual is not None, f"{what}: missing gradient"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
    if not bool(torch.isfinite(a).all()):
        idx = int((~torch.isfinite(a)).reshape(-1).nonzero()[0])
        raise AssertionError(f"{what}: non-finite gradient at {_describe(a, e, idx)}")
    if dtype in HALF:
        denom = e.norm()
        rel = (a - e).norm() / denom if denom > 0 else (a - e).norm()
        assert rel <= 1e-2, f"{what} ({dtype}): relative norm error {float(rel):.3g} > 0.01; {_worst(a, e)}"
        return
    if e.numel() == 0:
        return
    rel = 1e-10 if dtype == torch.float64 else 1e-4
    tol = max(rel * float(e.abs().max()), floor)
    err = float((a - e).abs().max())
    # One bound for every element: the largest difference is the element that fails it.
    assert err <= tol, (f"{what} ({dtype}): max abs error {err:.3g} > bound {tol:.3g} "
                        f"({rel:g}·max|grad|) at {_worst(a, e)}")


def grads(output: torch.Tensor, inputs: Sequence) -> list:
    """Gradients of sum(output) w.r.t. the tensors of ``inputs`` that require grad (None for others)."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    got = torch.autograd.grad(output.sum(), leaves, allow_unused=True) if leaves else []
    it = iter(got)
    return [next(it) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in inputs]


def compare(fast_fn, ref_fn, inputs: Sequence, dtype: torch.dtype, what: str = "loss",
            weights: Optional[torch.Tensor] = None, *, logit_bound: float = 1.0, grad_floors=None):
    """Run ``fast_fn(*inputs)`` and ``ref_fn(*oracle(inputs))``; compare values and gradients.

    ``weights`` (same shape as the output) makes the backward see a non-uniform upstream
    gradient ``sum(weights * output)``. ``logit_bound``: L of the case for the loss rule (see
    ``assert_loss_close``; 1.0 for unit features at scale ~1). ``grad_floors``: input index →
    the ``floor`` of ``assert_grad_close`` for that input's gradient. Returns (out, ref).
    """
    out = fast_fn(*inputs)
    ref_inputs = [oracle(t) for t in inputs]
    ref = ref_fn(*ref_inputs)
    assert_loss_close(out, ref, dtype, what, logit_bound=logit_bound)
    w = weights if weights is not None else torch.ones_like(ref)
    fin_out = torch.where(torch.isfinite(out), out, 0)
    fin_ref = torch.where(torch.isfinite(ref), ref, 0)
    g_fast = grads(fin_out * w.to(out.dtype), inputs)
    g_ref = grads(fin_ref * w.to(ref.dtype), ref_inputs)
    for i, (a, e) in enumerate(zip(g_fast, g_ref)):
        if e is not None or a is not None:
            assert_grad_close(a, e, dtype, f"{what}: grad of input {i}", floor=(grad_floors or {}).get(i, 0.0))
    return out, ref


# ----------------------------------------------------------------------------- hypothesis

HYPOTHESIS_EXAMPLES_ENV = "MMLOSS_HYPOTHESIS_EXAMPLES"


def hypothesis_examples(ci_count: int) -> int:
    """``max_examples`` of a hypothesis test: ``ci_count`` (sized so the stage keeps its time
    budget on the 2-core reference machine) unless ``MMLOSS_HYPOTHESIS_EXAMPLES`` is set, which
    then gives every hypothesis test that many examples (e.g. 2000 for a thorough run)."""
    text = os.environ.get(HYPOTHESIS_EXAMPLES_ENV, "").strip()
    if not text:
        return ci_count
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"{HYPOTHESIS_EXAMPLES_ENV} must be a positive integer, got {text!r}")
    return count
