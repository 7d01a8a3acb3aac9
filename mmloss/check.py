"""``python -m mmloss.check``: a self-test of the installed backends on this machine's devices.

For every backend usable here ("torch" always; "triton" on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1``; "cpu" / "cuda" once ``mmloss._C`` is built) and every dtype it supports,
the fused primitives (``similarity_lse`` with each ``exclude`` mode, ``pairwise_sigmoid`` with
each ``positives`` mode, ``similarity_kl``) and the main losses (CLIP, InfoNCE, SigLIP, NT-Xent,
SupCon) are compared — values and gradients — with ``mmloss.reference`` evaluated in float64 on
the CPU from the same rounded inputs, at a few sizes (tiny, ragged, a few hundred rows) and at
large logits (L = 1e2 … 1e6). A table of worst errors and bounds is printed; the exit status is
0 when every check passes and 1 otherwise.

    python -m mmloss.check                      # every usable backend and dtype, every device
    python -m mmloss.check --quick              # fewer sizes
    python -m mmloss.check --backends torch --dtypes fp32,bf16 --device cpu --checks lse,clip

The comparison engine is importable (``compare_values``, ``compare_grads``, ``agree``,
``run_checks``) so test suites hold every path to the same rules.

Tolerances (docs/design.md, "Testing rules"). ``L`` is the case's logit bound
s·max‖x‖·max‖y‖ + |b| (1/τ for the losses that normalise inside), taken ≥ 1:

* values, elementwise: fp32 |a − r| ≤ 1e-5·|r| + 1e-6·L; fp16/bf16 ≤ 1e-4·|r| + 1e-6·L;
  fp64 ≤ 1e-10·|r| + 1e-13·L; an element's bound is never below 4× dense fp32's error there
  (see "dense fp32" below: a KL row whose teacher nearly ties errs by ~p(1−p)·L_t·L_s·2⁻²⁴,
  beyond 1e-6·L at large L, in dense fp32 too). Non-finite reference entries (−inf for a row
  whose every pair is excluded) must be reproduced exactly.
* gradients: fp32 max-abs error ≤ 1e-4·max|g|; fp16/bf16 relative norm error ≤ 1e-2 (plus the
  error of the reference rounded to fp16/bf16: a gradient that underflows there cannot be
  returned); fp64 max-abs error ≤ (1e-10 + 1e-14·L)·max|g|.
* dense fp32: a path may never be much worse than dense fp32 on the same inputs, and is never
  held to better. "Dense fp32" is ``mmloss.reference`` run in float32 in each of its natural
  formulations — logits (x·yᵀ)·s and (s·x)·yᵀ — and its error is the larger of theirs: the two
  round the logits differently, and at large L (unsaturated pairs) their errors differ by
  random factors of several, so one formulation alone is a lucky, fragile baseline. fp32
  gradients pass with max-abs error ≤ 4·(dense fp32's max-abs error) + 1e-7·max|g|: at large
  logits (L ≥ 100) that is the only fp32 gradient bound, below it the larger of the two applies
  (a confident row's gradient is a cancelling difference p − q of O(L) terms, which dense fp32
  itself cannot give to 1e-4·max|g|). fp16/bf16 gradients pass with relative norm error ≤ 4×
  dense fp32's where that exceeds 1e-2.

fp32 matmuls run at "highest" precision during the checks (TF32 would not meet fp32 bounds).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
import zlib
from typing import Callable, Iterable, Optional, Sequence

import torch

from ._device import triton_interpreting

Tensor = torch.Tensor

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
HALF = (torch.float16, torch.bfloat16)

# At and above this logit bound, an fp32 path's gradient is held to 4× dense fp32's own error
# on the same inputs (+ 1e-7·max|g|) instead of 1e-4·max|g|.
LARGE_LOGIT = 100.0
DENSE_FACTOR = 4.0
DENSE_SLACK = 1e-7

_VALUE_RULES = {  # dtype class → (relative coefficient, coefficient of L)
    "fp64": (1e-10, 1e-13),
    "fp32": (1e-5, 1e-6),
    "half": (1e-4, 1e-6),
}
_GRAD_MAX_ABS = {"fp64": 1e-10, "fp32": 1e-4}
_FP64_GRAD_PER_LOGIT = 1e-14
_HALF_GRAD_REL_NORM = 1e-2


def _dtype_class(dtype: torch.dtype) -> str:
    if dtype == torch.float64:
        return "fp64"
    return "half" if dtype in HALF else "fp32"


# ----------------------------------------------------------------------------- comparisons


@dataclasses.dataclass
class Comparison:
    """One compared quantity: the error at its worst element and the bound that element is held to.

    ``detail`` names the element (index, actual and expected values); ``ok`` is
    ``error <= bound`` (a NaN error fails).
    """

    what: str
    error: float
    bound: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.bound)

    @property
    def ratio(self) -> float:
        """error / bound (0 when both are 0, inf for a non-finite error or a zero bound)."""
        if math.isnan(self.error):
            return math.inf
        if self.bound > 0:
            return self.error / self.bound
        return 0.0 if self.error == 0 else math.inf

    def __str__(self) -> str:
        state = "ok" if self.ok else "FAIL"
        return f"{self.what}: error {self.error:.3g} vs bound {self.bound:.3g} [{state}] {self.detail}"


def _position(flat: int, shape) -> tuple:
    if len(shape) == 0:
        return ()
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(shape)))


def _element(what: str, a: Tensor, e: Tensor, flat: int) -> str:
    pos = _position(flat, a.shape)
    where = f"{what}[{', '.join(map(str, pos))}]" if pos else what
    return f"{where}: got {a.reshape(-1)[flat].item():.10g}, expected {e.reshape(-1)[flat].item():.10g}"


def _host64(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def _finiteness_mismatch(what: str, a: Tensor, e: Tensor) -> Optional[Comparison]:
    """A failing comparison when ``a`` is not finite exactly where ``e`` is not (NaN for NaN,
    the same infinity for an infinity), else None."""
    fin_e = torch.isfinite(e)
    same_nan = torch.isnan(a) & torch.isnan(e)
    bad = (torch.isfinite(a) != fin_e) | (~fin_e & ~same_nan & (a != e))
    if not bool(bad.any()):
        return None
    flat = int(bad.reshape(-1).nonzero()[0])
    return Comparison(what, math.inf, 0.0, f"finiteness differs at {_element(what, a, e, flat)} "
                                           f"({int(bad.sum())} of {bad.numel()} elements)")


def _shape_mismatch(what: str, actual, expected) -> Optional[Comparison]:
    if actual is None and expected is None:
        return None
    if actual is None or expected is None:
        got = "None" if actual is None else f"shape {tuple(actual.shape)}"
        want = "None" if expected is None else f"shape {tuple(expected.shape)}"
        return Comparison(what, math.inf, 0.0, f"got {got}, expected {want}")
    if tuple(actual.shape) != tuple(expected.shape):
        return Comparison(what, math.inf, 0.0,
                          f"got shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    return None


def compare_values(what: str, actual: Optional[Tensor], expected: Optional[Tensor], dtype: torch.dtype,
                   logit_bound: float, *, dense=None) -> Optional[Comparison]:
    """Elementwise value rule for a path computing in ``dtype`` (see the module docstring).

    actual: the fast path's output (any shape, any device); expected: the float64 reference.
    logit_bound: L of the case (floored at 1). dense: the same output from dense fp32 on the
    same inputs (a tensor or a sequence, one per formulation): an element's bound is never
    below 4× the largest dense error there. Returns the comparison at the element with the
    largest error/bound ratio (a failing element whenever one fails); None when both are None.
    """
    bad = _shape_mismatch(what, actual, expected)
    if bad is not None or actual is None:
        return bad
    a, e = _host64(actual), _host64(expected)
    bad = _finiteness_mismatch(what, a, e)
    if bad is not None:
        return bad
    if a.numel() == 0:
        return Comparison(what, 0.0, 0.0, "empty")
    rel, per_logit = _VALUE_RULES[_dtype_class(dtype)]
    L = max(float(logit_bound), 1.0)
    fin = torch.isfinite(e)
    e0 = torch.where(fin, e, 0.0)
    err = torch.where(fin, (a - e).abs(), 0.0)
    bound = rel * e0.abs() + per_logit * L
    rule = f"{rel:g}·|ref| + {per_logit:g}·L, L = {L:.3g}"
    if isinstance(dense, Tensor):
        dense = [dense]
    dense_err = None
    for d in dense or ():
        if d is not None and tuple(d.shape) == tuple(e.shape):
            d_err = torch.where(fin, (_host64(d) - e).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs(), 0.0)
            dense_err = d_err if dense_err is None else torch.maximum(dense_err, d_err)
    if dense_err is not None:
        bound = torch.maximum(bound, DENSE_FACTOR * dense_err)
    ratio = err / bound
    flat = int(ratio.reshape(-1).argmax())
    if dense_err is not None and float(DENSE_FACTOR * dense_err.reshape(-1)[flat]) >= float(bound.reshape(-1)[flat]):
        rule = f"{DENSE_FACTOR:g}× dense fp32's error {float(dense_err.reshape(-1)[flat]):.3g}"
    return Comparison(what, float(err.reshape(-1)[flat]), float(bound.reshape(-1)[flat]),
                      f"{_element(what, a, e, flat)} (bound {rule})")


def compare_grads(what: str, actual: Optional[Tensor], expected: Optional[Tensor], dtype: torch.dtype,
                  logit_bound: float, *, dense=None) -> Optional[Comparison]:
    """Gradient rule for a path computing in ``dtype`` (see the module docstring).

    actual / expected: gradients of one input (the fast path's; the float64 reference's).
    dense: the same gradient from dense fp32 on the same inputs (fp32/fp16/bf16 paths), a tensor
    or a sequence of them (several dense formulations: the largest error counts): the
    bound is 4× its error + 1e-7·max|g| at large logits (L ≥ ``LARGE_LOGIT``), and never less
    than that below. ``expected`` None means "no gradient": ``actual`` must be None or zero.
    """
    if expected is None:
        if actual is None or not bool((actual != 0).any()):
            return None
        return Comparison(what, math.inf, 0.0, "expected no gradient, got a non-zero one")
    bad = _shape_mismatch(what, actual, expected)
    if bad is not None:
        return bad
    a, e = _host64(actual), _host64(expected)
    if a.numel() == 0:
        return Comparison(what, 0.0, 0.0, "empty")
    if not bool(torch.isfinite(a).all()):
        flat = int((~torch.isfinite(a)).reshape(-1).nonzero()[0])
        return Comparison(what, math.inf, 0.0, f"non-finite gradient at {_element(what, a, e, flat)}")
    L = max(float(logit_bound), 1.0)
    large = L >= LARGE_LOGIT
    if isinstance(dense, Tensor):
        dense = [dense]
    denses = [_host64(t) for t in (dense or ()) if t is not None]
    diff = (a - e).abs()
    flat = int(diff.reshape(-1).argmax())
    where = _element(what, a, e, flat)
    kind = _dtype_class(dtype)
    if kind == "half":
        scale = float(e.norm())
        norm = (lambda t: float(t.norm()) / scale) if scale > 0 else (lambda t: float(t.norm()))
        error = norm(a - e)
        # A gradient returned in fp16/bf16 cannot be closer than the reference rounded to that
        # dtype (tiny gradients underflow to 0): that representation error joins the bound.
        unavoidable = norm(_host64(expected.detach().cpu().to(actual.dtype)) - e)
        bound, rule = _HALF_GRAD_REL_NORM + unavoidable, f"relative norm ≤ {_HALF_GRAD_REL_NORM:g}"
        if unavoidable > 1e-3 * _HALF_GRAD_REL_NORM:
            name = DTYPE_NAMES.get(actual.dtype, str(actual.dtype))
            rule += f" + {unavoidable:.3g} (the reference rounded to {name})"
        dense_rel = max((norm(d - e) for d in denses), default=0.0)
        if DENSE_FACTOR * dense_rel > bound:
            bound, rule = DENSE_FACTOR * dense_rel, f"relative norm ≤ {DENSE_FACTOR:g}× dense fp32's"
        return Comparison(what, error, bound, f"relative norm error; worst {where} ({rule})")
    scale = float(e.abs().max())
    if kind == "fp64":
        tol = _GRAD_MAX_ABS["fp64"] + _FP64_GRAD_PER_LOGIT * L
        return Comparison(what, float(diff.reshape(-1)[flat]), tol * scale, f"{where} ({tol:.3g}·max|g|)")
    plain = _GRAD_MAX_ABS["fp32"] * scale
    bound, rule = (0.0 if large and denses else plain), f"{_GRAD_MAX_ABS['fp32']:g}·max|g|"
    if denses:
        dense_err = max(float((d - e).abs().max()) for d in denses)
        relative_to_dense = DENSE_FACTOR * dense_err + DENSE_SLACK * scale
        if large or relative_to_dense > bound:
            bound = relative_to_dense
            rule = (f"{DENSE_FACTOR:g}× dense fp32's max-abs error {dense_err:.3g} + "
                    f"{DENSE_SLACK:g}·max|g|, L = {L:.3g}")
    return Comparison(what, float(diff.reshape(-1)[flat]), bound, f"{where} ({rule})")


# ----------------------------------------------------------------------------- running both sides


def as_oracle(t):
    """The same (already rounded) values as a float64 CPU leaf; other arguments unchanged
    (integer tensors move to the CPU)."""
    if isinstance(t, Tensor):
        if t.is_floating_point():
            return t.detach().to(device="cpu", dtype=torch.float64).requires_grad_(t.requires_grad)
        return t.cpu()
    return t


def as_dense_fp32(t):
    """Floating tensors as fp32 leaves on their device (for the dense fp32 baseline)."""
    if isinstance(t, Tensor) and t.is_floating_point():
        return t.detach().to(torch.float32).requires_grad_(t.requires_grad)
    return t


def _outputs(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def upstream_weights(outputs: Sequence[Optional[Tensor]], seed: int) -> list[Optional[Tensor]]:
    """Fixed positive weights in [0.5, 1.5) per output element (float64, CPU), so backward sees
    a non-uniform upstream gradient; 1.0 for 0-d outputs."""
    g = torch.Generator().manual_seed(seed)
    weights = []
    for out in outputs:
        if out is None:
            weights.append(None)
        elif out.dim() == 0:
            weights.append(torch.ones((), dtype=torch.float64))
        else:
            weights.append(0.5 + torch.rand(out.shape, generator=g, dtype=torch.float64))
    return weights


def _objective(outputs, weights) -> Optional[Tensor]:
    """Σ_k Σ w_k·out_k over finite entries (a −inf "all excluded" row contributes nothing)."""
    total = None
    for out, w in zip(outputs, weights):
        if out is None or w is None or not out.requires_grad:
            continue
        term = (torch.where(torch.isfinite(out), out, 0) * w.to(device=out.device, dtype=out.dtype)).sum()
        total = term if total is None else total + term
    return total


def _gradients(outputs, weights, inputs) -> list[Optional[Tensor]]:
    leaves = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    total = _objective(outputs, weights)
    if total is None or not leaves:
        return [None] * len(inputs)
    got = iter(torch.autograd.grad(total, leaves, allow_unused=True))
    return [next(got) if isinstance(t, Tensor) and t.requires_grad else None for t in inputs]


def agree(fast: Callable, reference: Callable, inputs: Sequence, dtype: torch.dtype, logit_bound: float, *,
          names: Optional[Sequence[str]] = None, output_names: Optional[Sequence[str]] = None,
          seed: int = 0, dense_variants: Sequence[Callable] = ()) -> list[Comparison]:
    """Compare ``fast(*inputs)`` with ``reference(*as_oracle(inputs))``: values and gradients.

    inputs: the fast path's arguments (features already rounded to ``dtype``; leaves that
    should receive gradients require grad). fast / reference may return a tensor or a tuple of
    tensors (None entries allowed, e.g. a primitive's unrequested column LSE). Gradients are
    those of Σ_k ⟨w_k, out_k⟩ with fixed weights (``upstream_weights(seed)``). For fp32/fp16/bf16
    paths ``reference`` also runs on fp32 copies of the inputs: dense fp32 on the same inputs,
    whose error bounds the gradient error (``compare_grads``); ``dense_variants`` are further
    dense formulations with ``reference``'s signature (e.g. the scale applied to x before the
    product), run the same way, the largest of their errors counting. Returns one comparison per
    output and per gradient; an exception in ``fast`` becomes a failing comparison naming it.
    """
    names = list(names) if names is not None else [f"input{i}" for i in range(len(inputs))]
    try:
        outs = _outputs(fast(*inputs))
        weights = upstream_weights(outs, seed)
        got_grads = _gradients(outs, weights, inputs)
    except Exception as exc:  # noqa: BLE001 - a self-test reports every failure as a row
        return [Comparison("call", math.inf, 0.0, f"raised {type(exc).__name__}: {exc}")]
    ref_inputs = [as_oracle(t) for t in inputs]
    refs = _outputs(reference(*ref_inputs))
    ref_grads = _gradients(refs, upstream_weights(refs, seed), ref_inputs)
    dense_grads = [[] for _ in inputs]
    dense_values = [[] for _ in refs]
    if dtype != torch.float64:
        for formulation in (reference, *dense_variants):
            dense_inputs = [as_dense_fp32(t) for t in inputs]
            dense_outs = _outputs(formulation(*dense_inputs))
            for slot, out in zip(dense_values, dense_outs):
                if out is not None:
                    slot.append(out.detach())
            for slot, g in zip(dense_grads, _gradients(dense_outs, upstream_weights(dense_outs, seed), dense_inputs)):
                if g is not None:
                    slot.append(g)
    out_names = list(output_names) if output_names is not None else (
        ["value"] if len(refs) == 1 else [f"output{k}" for k in range(len(refs))])
    results = []
    if len(outs) != len(refs):
        return [Comparison("value", math.inf, 0.0, f"got {len(outs)} outputs, expected {len(refs)}")]
    for name, a, e, d in zip(out_names, outs, refs, dense_values):
        c = compare_values(name, a, e, dtype, logit_bound, dense=d)
        if c is not None:
            results.append(c)
    for name, a, e, d in zip(names, got_grads, ref_grads, dense_grads):
        c = compare_grads(f"d{name}", a, e, dtype, logit_bound, dense=d)
        if c is not None:
            results.append(c)
    return results


def worst(comparisons: Iterable[Comparison]) -> Optional[Comparison]:
    """The comparison with the largest error/bound ratio (None for none)."""
    comparisons = list(comparisons)
    if not comparisons:
        return None
    return max(comparisons, key=lambda c: c.ratio)


# ----------------------------------------------------------------------------- the checks


@dataclasses.dataclass(frozen=True)
class Problem:
    """One input configuration: N×D rows against M×D rows, feature norm ``radius``, scale and bias.

    ``label`` names the size class in the table ("tiny", "ragged", "rows", "L=1e4").
    """

    label: str
    n: int
    m: int
    d: int
    radius: float = 1.0
    aligned: bool = True             # positive pairs close (as after training) or independent
    scale: float = 1.0 / 0.07
    bias: float = -3.0
    temperature: float = 0.1

    def describe(self, square: bool) -> str:
        m = self.n if square else self.m
        return f"{self.label} {self.n}x{m}x{self.d}"


@dataclasses.dataclass
class Result:
    """One row of the table: a check of one backend in one dtype on one problem."""

    device: str
    backend: str
    dtype: str
    check: str
    size: str
    status: str                      # "ok" | "FAIL" | "skip"
    worst: Optional[Comparison] = None
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


class _Inputs:
    """Seeded random inputs of one case, built in float64 on the CPU and rounded to ``dtype``."""

    def __init__(self, problem: Problem, dtype: torch.dtype, device: torch.device, seed: int):
        self.p, self.dtype, self.device = problem, dtype, device
        self.gen = torch.Generator().manual_seed(seed)
        self.param_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def rows(self, n: int, d: Optional[int] = None, *, near: Optional[Tensor] = None,
             radius: Optional[float] = None) -> Tensor:
        """(n, d) rows of norm ``radius``; with ``near`` (float64), row i is close to near[i]
        (positive pairs that agree, as after training), extra rows random."""
        d = self.p.d if d is None else d
        t = torch.randn(n, d, generator=self.gen, dtype=torch.float64)
        t = torch.nn.functional.normalize(t, dim=1)
        if near is not None and self.p.aligned:
            k = min(n, near.shape[0])
            direction = torch.nn.functional.normalize(near[:k], dim=1)
            t[:k] = torch.nn.functional.normalize(direction + 0.7 * t[:k], dim=1)
        return t * (self.p.radius if radius is None else radius)

    def leaf(self, t64: Tensor) -> Tensor:
        """A new leaf (never a view of ``t64`` in the autograd graph) rounded to the case dtype."""
        return t64.detach().to(device=self.device, dtype=self.dtype).clone().requires_grad_(True)

    def param(self, value: float) -> Tensor:
        return torch.tensor(value, dtype=self.param_dtype, device=self.device, requires_grad=True)

    def labels(self, n: int, classes: int) -> Tensor:
        return torch.randint(0, classes, (n,), generator=self.gen).to(self.device)


def _logit(scale: float, radius_x: float, radius_y: float, bias: float = 0.0) -> float:
    return abs(scale) * radius_x * radius_y + abs(bias)


@dataclasses.dataclass(frozen=True)
class Check:
    """A named comparison: ``build(inputs, backend)`` returns (fast, reference, args, names,
    output_names, logit_bound, dense_variants). ``square``: needs N == M. ``large``: also run
    at large logits."""

    name: str
    build: Callable
    square: bool = False
    large: bool = True


def prescaled(reference: Callable, pairs: Sequence[tuple[int, int]]) -> Callable:
    """``reference`` in its other dense formulation: for each (feature index, scale index) pair
    the scale multiplies the features first (row-wise for an (N,) scale) and the call gets 1.0
    — logits (s·x)·yᵀ instead of (x·yᵀ)·s. Same gradients in exact arithmetic."""
    def formulation(*args):
        args = list(args)
        for feature, scale in pairs:
            s = args[scale]
            if isinstance(s, Tensor) and s.dim() == 1:
                s = s[:, None]
            args[feature] = args[feature] * s
            args[scale] = 1.0
        return reference(*args)
    return formulation


def _lse_check(exclude: str) -> Callable:
    def build(inp: _Inputs, backend: str):
        import mmloss

        p = inp.p
        x64 = inp.rows(p.n)
        y64 = inp.rows(p.m, near=x64)
        kwargs = {"exclude": exclude}
        if exclude == "same_label":
            classes = max(2, min(p.n, p.m) // 3)
            kwargs.update(x_labels=inp.labels(p.n, classes), y_labels=inp.labels(p.m, classes))
        args = (inp.leaf(x64), inp.leaf(y64), inp.param(p.scale), inp.param(p.bias))

        def fast(x, y, s, b):
            return mmloss.ops.similarity_lse(x, y, s, b, backend=backend, **kwargs)

        def ref(x, y, s, b):
            return mmloss.reference.similarity_lse(x, y, s, b, **_on(kwargs, x.device))

        return fast, ref, args, ("x", "y", "scale", "bias"), ("row_lse", "col_lse"), \
            _logit(p.scale, p.radius, p.radius, p.bias), [prescaled(ref, [(0, 2)])]
    return build


def _sigmoid_check(positives: str) -> Callable:
    def build(inp: _Inputs, backend: str):
        import mmloss

        p = inp.p
        x64 = inp.rows(p.n)
        y64 = inp.rows(p.m, near=x64)
        kwargs = {"positives": positives}
        if positives == "same_label":
            classes = max(2, min(p.n, p.m) // 3)
            kwargs.update(x_labels=inp.labels(p.n, classes), y_labels=inp.labels(p.m, classes))
        args = (inp.leaf(x64), inp.leaf(y64), inp.param(p.scale), inp.param(p.bias))

        def fast(x, y, s, b):
            return mmloss.ops.pairwise_sigmoid(x, y, s, b, backend=backend, **kwargs)

        def ref(x, y, s, b):
            return mmloss.reference.pairwise_sigmoid(x, y, s, b, **_on(kwargs, x.device))

        return fast, ref, args, ("x", "y", "scale", "bias"), ("rows",), \
            _logit(p.scale, p.radius, p.radius, p.bias), [prescaled(ref, [(0, 2)])]
    return build


def _kl_check(cross_entropy: bool) -> Callable:
    def build(inp: _Inputs, backend: str):
        import mmloss

        p = inp.p
        x_t = inp.rows(p.n)
        y_t = inp.rows(p.m, near=x_t)
        x_s = inp.rows(p.n, near=x_t)
        y_s = inp.rows(p.m, near=y_t)
        teacher_scale = 0.5 * p.scale
        args = (inp.leaf(x_s), inp.leaf(y_s), inp.leaf(x_t).detach(), inp.leaf(y_t).detach(),
                inp.param(p.scale), teacher_scale)

        def fast(xs, ys, xt, yt, ss, st):
            return mmloss.ops.similarity_kl(xs, ys, xt, yt, ss, st, cross_entropy=cross_entropy, backend=backend)

        def ref(xs, ys, xt, yt, ss, st):
            return mmloss.reference.similarity_kl(xs, ys, xt, yt, ss, st, cross_entropy=cross_entropy)

        return fast, ref, args, ("x_s", "y_s", "x_t", "y_t", "scale_s", "scale_t"), ("row", "col"), \
            _logit(p.scale, p.radius, p.radius), [prescaled(ref, [(0, 4), (2, 5)])]
    return build


def _on(kwargs: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in kwargs.items()}


def _clip(inp: _Inputs, backend: str):
    import mmloss

    p = inp.p
    x64 = inp.rows(p.n)
    args = (inp.leaf(x64), inp.leaf(inp.rows(p.n, near=x64)), inp.param(p.scale))

    def fast(x, y, s):
        return mmloss.clip_loss(x, y, s, backend=backend)

    ref = mmloss.reference.clip_loss
    return fast, ref, args, ("image_features", "text_features", "logit_scale"), \
        ("loss",), _logit(p.scale, p.radius, p.radius), [prescaled(ref, [(0, 2)])]


def _infonce(inp: _Inputs, backend: str):
    import mmloss

    p = inp.p
    q64 = inp.rows(p.n)
    args = (inp.leaf(q64), inp.leaf(inp.rows(p.m, near=q64)), inp.param(p.scale))

    def fast(q, k, s):
        return mmloss.infonce_loss(q, k, s, backend=backend)

    ref = mmloss.reference.infonce_loss
    return fast, ref, args, ("query", "keys", "logit_scale"), ("loss",), \
        _logit(p.scale, p.radius, p.radius), [prescaled(ref, [(0, 2)])]


def _siglip(inp: _Inputs, backend: str):
    import mmloss

    p = inp.p
    x64 = inp.rows(p.n)
    args = (inp.leaf(x64), inp.leaf(inp.rows(p.n, near=x64)), inp.param(p.scale), inp.param(p.bias))

    def fast(x, y, s, b):
        return mmloss.siglip_loss(x, y, s, b, backend=backend)

    ref = mmloss.reference.siglip_loss
    return fast, ref, args, ("image_features", "text_features", "logit_scale", "logit_bias"), ("loss",), \
        _logit(p.scale, p.radius, p.radius, p.bias), [prescaled(ref, [(0, 2)])]


def _ntxent(inp: _Inputs, backend: str):
    import mmloss

    p = inp.p
    z0 = inp.rows(p.n, radius=1.0)
    args = (inp.leaf(z0), inp.leaf(inp.rows(p.n, near=z0, radius=1.0)), p.temperature)

    def fast(a, b, t):
        return mmloss.ntxent_loss(a, b, t, backend=backend)

    return fast, mmloss.reference.ntxent_loss, args, ("out0", "out1", "temperature"), ("loss",), \
        1.0 / p.temperature, []


def _supcon(inp: _Inputs, backend: str):
    import mmloss

    p = inp.p
    classes = max(2, p.n // 4)
    labels = inp.labels(p.n, classes)
    centers = inp.rows(classes, radius=1.0)
    emb = inp.rows(p.n, near=centers[labels.cpu()], radius=1.0)
    args = (inp.leaf(emb), labels, p.temperature)

    def fast(e, lab, t):
        return mmloss.supcon_loss(e, lab, t, backend=backend)

    return fast, mmloss.reference.supcon_loss, args, ("embeddings", "labels", "temperature"), ("loss",), \
        1.0 / p.temperature, []


CHECKS = (
    Check("lse/none", _lse_check("none")),
    Check("lse/diagonal", _lse_check("diagonal")),
    Check("lse/same_label", _lse_check("same_label")),
    Check("sigmoid/diagonal", _sigmoid_check("diagonal")),
    Check("sigmoid/same_label", _sigmoid_check("same_label")),
    Check("sigmoid/none", _sigmoid_check("none")),
    Check("kl", _kl_check(False)),
    Check("kl/cross_entropy", _kl_check(True)),
    Check("clip_loss", _clip, square=True),
    Check("infonce_loss", _infonce),
    Check("siglip_loss", _siglip, square=True),
    Check("ntxent_loss", _ntxent, square=True, large=False),
    Check("supcon_loss", _supcon, square=True, large=False),
)

SIZES = (
    Problem("tiny", 3, 5, 3),
    Problem("ragged", 37, 53, 67),
    Problem("rows", 300, 333, 130),
)
QUICK_SIZES = SIZES[:2]


def large_logit_problems(quick: bool = False) -> tuple[Problem, ...]:
    """Problems at L = 1e2, 1e4, 1e6 (quick: 1e4, 1e6): scale 100, feature norm √(L/100),
    independent rows (so the softmax's dominant entries are not all positives)."""
    exponents = (4, 6) if quick else (2, 4, 6)
    return tuple(Problem(f"L=1e{e}", 24, 33, 37, radius=math.sqrt(10.0 ** e / 100.0), aligned=False,
                         scale=100.0, bias=-3.0) for e in exponents)


def _seed(*parts: str) -> int:
    return zlib.crc32("/".join(parts).encode())


def run_check(check: Check, problem: Problem, backend: str, dtype: torch.dtype,
              device: torch.device) -> list[Comparison]:
    """All comparisons of one check on one problem (features on ``device`` in ``dtype``)."""
    if check.square:
        problem = dataclasses.replace(problem, m=problem.n)
    seed = _seed(check.name, problem.label, str(problem.n), str(problem.m), str(problem.d))
    inp = _Inputs(problem, dtype, device, seed)
    fast, ref, args, names, out_names, logit, variants = check.build(inp, backend)
    return agree(fast, ref, args, dtype, logit, names=names, output_names=out_names, seed=seed,
                 dense_variants=variants)


# ----------------------------------------------------------------------------- one primitive call, described


@dataclasses.dataclass(frozen=True)
class PrimitiveCase:
    """One call of a fused primitive with every option spelled out (randomized agreement suites).

    primitive: "lse" (``similarity_lse``), "sigmoid" (``pairwise_sigmoid``), "sigmoid_sum"
    (``pairwise_sigmoid(..., reduction="sum")``) or "kl" (``similarity_kl``). Features: N×D and
    M×D Gaussian rows of typical norm ``radius`` (row norms vary), drawn from ``seed`` in float64
    and rounded to ``dtype``. scale_kind: "float" | "tensor" (0-d, receives a gradient) |
    "per_row" ((N,), receives a gradient; row i gets ``scale``·(0.5 + i/N)) | "frozen" (0-d,
    no gradient). bias: None or a value; bias_kind "float" | "tensor" (0-d, receives a
    gradient). mode: ``exclude`` of "lse" / ``positives`` of the sigmoid ("none" | "diagonal" |
    "same_label", labels drawn among ``classes``), with ``offset`` for "diagonal". rows / cols:
    the outputs asked of "lse" and "kl". noncontiguous: x is a strided column slice and y
    column-major. KL: the teacher has ``teacher_d`` columns (default D) and scale
    ``teacher_scale``; ``cross_entropy`` as in ``similarity_kl``.
    """

    primitive: str
    n: int
    m: int
    d: int
    dtype: str = "fp32"
    seed: int = 0
    radius: float = 1.0
    scale: float = 1.0
    scale_kind: str = "float"
    bias: Optional[float] = None
    bias_kind: str = "float"
    mode: str = "none"
    offset: int = 0
    classes: int = 2
    rows: bool = True
    cols: bool = True
    noncontiguous: bool = False
    chunk_size: Optional[int] = None
    teacher_d: Optional[int] = None
    teacher_scale: float = 1.0
    cross_entropy: bool = False


def _case_rows(gen: torch.Generator, n: int, d: int, radius: float) -> Tensor:
    """(n, d) float64 rows of norms about ``radius`` (each row's norm varies by up to ×2)."""
    t = torch.randn(n, d, generator=gen, dtype=torch.float64)
    t = torch.nn.functional.normalize(t, dim=1)
    return t * radius * (0.5 + torch.rand(n, 1, generator=gen, dtype=torch.float64))


def _feature_leaf(t64: Tensor, dtype: torch.dtype, device, layout: str) -> Tensor:
    """A leaf with ``t64``'s values in ``dtype``: contiguous, "slice" (every other column of a
    wider buffer) or "column_major" (transposed storage)."""
    t = t64.to(dtype)
    if layout == "slice":
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=dtype)
        wide[:, ::2] = t
        t = wide.to(device)[:, ::2]
    elif layout == "column_major":
        t = t.t().contiguous().to(device).t()
    else:
        t = t.to(device)
    return t.detach().requires_grad_(True)


def case_logit_bound(x: Tensor, y: Tensor, scale, bias=None) -> float:
    """L = max_i |s_i|·‖x_i‖ · max_j ‖y_j‖ + |b| for ``s·x·yᵀ + b`` (a number, 0-d or (N,) scale)."""
    x_norms = torch.linalg.vector_norm(x.detach().double(), dim=1)
    y_max = float(torch.linalg.vector_norm(y.detach().double(), dim=1).max()) if y.shape[0] else 0.0
    s = scale.detach().double().abs().cpu() if isinstance(scale, Tensor) else torch.tensor(abs(float(scale)))
    x_scaled = float((s * x_norms.cpu()).max()) if x.shape[0] else 0.0
    b = 0.0 if bias is None else abs(float(bias))
    return x_scaled * y_max + b


def build_primitive_case(case: PrimitiveCase, backend: str, device="cpu"):
    """(fast, reference, inputs, names, output_names, logit_bound, dense_variants) of ``case``
    for ``agree``."""
    import mmloss

    device = torch.device(device)
    dtype = DTYPES[case.dtype]
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(case.seed)
    x64 = _case_rows(gen, case.n, case.d, case.radius)
    y64 = _case_rows(gen, case.m, case.d, case.radius)
    x = _feature_leaf(x64, dtype, device, "slice" if case.noncontiguous else "contiguous")
    y = _feature_leaf(y64, dtype, device, "column_major" if case.noncontiguous else "contiguous")

    if case.scale_kind == "float":
        scale = float(case.scale)
    elif case.scale_kind == "per_row":
        ramp = 0.5 + torch.arange(case.n, dtype=torch.float64) / max(case.n, 1)
        scale = (case.scale * ramp).to(device=device, dtype=param_dtype).requires_grad_(True)
    elif case.scale_kind in ("tensor", "frozen"):
        scale = torch.tensor(case.scale, dtype=param_dtype, device=device,
                             requires_grad=case.scale_kind == "tensor")
    else:
        raise ValueError(f"scale_kind must be float, tensor, per_row or frozen, got {case.scale_kind!r}")

    if case.primitive == "kl":
        d_t = case.teacher_d or case.d
        x_t = _feature_leaf(_case_rows(gen, case.n, d_t, case.radius), dtype, device, "contiguous").detach()
        y_t = _feature_leaf(_case_rows(gen, case.m, d_t, case.radius), dtype, device, "contiguous").detach()
        options = dict(rows=case.rows, cols=case.cols, cross_entropy=case.cross_entropy)

        def fast(xs, ys, xt, yt, ss, st):
            return mmloss.ops.similarity_kl(xs, ys, xt, yt, ss, st, backend=backend,
                                            chunk_size=case.chunk_size, **options)

        def ref(xs, ys, xt, yt, ss, st):
            return mmloss.reference.similarity_kl(xs, ys, xt, yt, ss, st, **options)

        logit = max(case_logit_bound(x, y, scale), case_logit_bound(x_t, y_t, case.teacher_scale))
        return (fast, ref, [x, y, x_t, y_t, scale, case.teacher_scale],
                ["x_s", "y_s", "x_t", "y_t", "scale_s", "scale_t"], ["row", "col"], logit,
                [prescaled(ref, [(0, 4), (2, 5)])])

    bias = None
    if case.bias is not None:
        bias = float(case.bias) if case.bias_kind == "float" else torch.tensor(
            case.bias, dtype=param_dtype, device=device, requires_grad=True)
    marks = {}
    if case.mode == "same_label":
        marks["x_labels"] = torch.randint(0, case.classes, (case.n,), generator=gen).to(device)
        marks["y_labels"] = torch.randint(0, case.classes, (case.m,), generator=gen).to(device)
    elif case.mode == "diagonal":
        marks["offset"] = case.offset
    logit = case_logit_bound(x, y, scale, case.bias)

    if case.primitive == "lse":
        options = dict(exclude=case.mode, rows=case.rows, cols=case.cols, **marks)

        def fast(x_, y_, s_, b_):
            return mmloss.ops.similarity_lse(x_, y_, s_, b_, backend=backend, chunk_size=case.chunk_size, **options)

        def ref(x_, y_, s_, b_):
            return mmloss.reference.similarity_lse(x_, y_, s_, b_, **_on(options, x_.device))

        outputs = ["row_lse", "col_lse"]
    elif case.primitive in ("sigmoid", "sigmoid_sum"):
        reduction = "sum" if case.primitive == "sigmoid_sum" else "none"
        options = dict(positives=case.mode, **marks)

        def fast(x_, y_, s_, b_):
            return mmloss.ops.pairwise_sigmoid(x_, y_, s_, b_, backend=backend, chunk_size=case.chunk_size,
                                               reduction=reduction, **options)

        def ref(x_, y_, s_, b_):
            rows = mmloss.reference.pairwise_sigmoid(x_, y_, s_, b_, **_on(options, x_.device))
            return rows.sum() if reduction == "sum" else rows

        outputs = ["total" if reduction == "sum" else "rows"]
    else:
        raise ValueError(f"primitive must be lse, sigmoid, sigmoid_sum or kl, got {case.primitive!r}")
    return fast, ref, [x, y, scale, bias], ["x", "y", "scale", "bias"], outputs, logit, [prescaled(ref, [(0, 2)])]


def run_primitive_case(case: PrimitiveCase, backend: str, device="cpu") -> list[Comparison]:
    """Every comparison (values, then gradients) of ``case`` on ``backend`` against the float64
    reference, under the rules of ``compare_values`` / ``compare_grads``."""
    fast, ref, inputs, names, outputs, logit, variants = build_primitive_case(case, backend, device)
    return agree(fast, ref, inputs, DTYPES[case.dtype], logit, names=names, output_names=outputs,
                 seed=case.seed, dense_variants=variants)


# ----------------------------------------------------------------------------- what runs here


def usable_backends(device: torch.device) -> dict[str, Optional[str]]:
    """Backend name (other than "reference") → None when it runs on ``device`` tensors, else why not."""
    import mmloss

    out = {}
    for name, reason in mmloss.available_backends().items():
        if name == "reference":
            continue
        if reason is None:
            try:
                mmloss.ops.resolve_backend(name, device)
            except RuntimeError as exc:
                reason = str(exc)
        out[name] = reason
    return out


def supported_dtypes(backend: str, device: torch.device) -> dict[str, Optional[str]]:
    """dtype name → None when ``backend`` supports it on ``device``, else why not.

    docs/design.md: fp32/fp16/bf16 everywhere, fp64 on the torch and cpu backends; the Triton
    interpreter has no bf16."""
    out = {name: None for name in ("fp32", "fp16", "bf16", "fp64")}
    if backend not in ("torch", "cpu"):
        out["fp64"] = f"the {backend} backend has no fp64 kernels (use torch or reference)"
    if backend == "triton" and device.type == "cpu" and triton_interpreting():
        out["bf16"] = "the Triton interpreter has no bf16"
    return out


def _devices(choice: Optional[str]) -> list[torch.device]:
    if choice in (None, "all"):
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
        return devices
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {choice}: no CUDA GPU is available here")
    return [device]


def _fp32_precision_settings() -> list:
    """The ``matmul`` settings objects of torch's newer ``fp32_precision`` API (CUDA, oneDNN)."""
    found = []
    for backend in ("cuda", "mkldnn"):
        matmul = getattr(getattr(torch.backends, backend, None), "matmul", None)
        if matmul is not None and hasattr(matmul, "fp32_precision"):
            found.append(matmul)
    return found


@contextlib.contextmanager
def exact_fp32_matmul():
    """fp32 matmuls at full precision inside the block, the previous setting restored after.

    Works with whichever API the process uses: the legacy ``set_float32_matmul_precision``
    ("highest"), or the newer ``torch.backends.*.matmul.fp32_precision`` attributes ("ieee") —
    once the latter were written, reading the legacy setting raises in recent torch.
    """
    try:
        previous = torch.get_float32_matmul_precision()
    except RuntimeError:  # the process uses the fp32_precision API
        previous = None
    if previous is not None:
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)
        return
    settings = _fp32_precision_settings()
    saved = [m.fp32_precision for m in settings]
    for m in settings:
        m.fp32_precision = "ieee"
    try:
        yield
    finally:
        for m, value in zip(settings, saved):
            m.fp32_precision = value


def _interpreter_refuses_bf16(device: torch.device) -> Result:
    """Under TRITON_INTERPRET=1 a bf16 call on the triton backend must raise, not return garbage."""
    import mmloss

    x = torch.randn(5, 7, dtype=torch.bfloat16, device=device)
    try:
        out = mmloss.ops.similarity_lse(x, x, 1.0, backend="triton")
    except Exception as exc:  # noqa: BLE001 - any clear error is a refusal
        return Result(str(device), "triton", "bf16", "refuses bf16 (interpreter)", "5x5x7", "ok",
                      note=f"raised {type(exc).__name__}")
    return Result(str(device), "triton", "bf16", "refuses bf16 (interpreter)", "5x5x7", "FAIL",
                  Comparison("call", math.inf, 0.0, f"returned {out[0][:3].tolist()}… instead of raising"))


def run_checks(backends: Optional[Sequence[str]] = None, dtypes: Optional[Sequence[str]] = None,
               devices: Optional[Sequence[torch.device]] = None, *, quick: bool = False,
               checks: Optional[Sequence[str]] = None,
               progress: Optional[Callable[[Result], None]] = None) -> list[Result]:
    """Run the self-test; returns one ``Result`` per row, calling ``progress(row)`` as each ends.

    backends / dtypes: names to test (default: every usable backend, every dtype it supports;
    an explicitly named backend that cannot run on a device gives a failing row, an explicitly
    named dtype a backend lacks a skipped one). devices: default CPU and, when present, CUDA.
    checks: name prefixes to keep (e.g. ["lse", "clip_loss"]). quick: fewer sizes.
    """
    devices = list(devices) if devices is not None else _devices(None)
    sizes = QUICK_SIZES if quick else SIZES
    large = large_logit_problems(quick)
    selected = [c for c in CHECKS if not checks or any(c.name.startswith(k) for k in checks)]
    results: list[Result] = []

    def emit(result: Result) -> None:
        results.append(result)
        if progress is not None:
            progress(result)

    with exact_fp32_matmul():
        for device in devices:
            usable = usable_backends(device)
            for backend in (backends or list(usable)):
                reason = usable.get(backend, f"unknown backend {backend!r}")
                if reason is not None:
                    if backends:  # asked for by name: it must run
                        emit(Result(str(device), backend, "-", "available", "-", "FAIL",
                                    Comparison("backend", math.inf, 0.0, reason)))
                    continue
                supported = supported_dtypes(backend, device)
                for dtype_name in (dtypes or list(supported)):
                    why_not = supported.get(dtype_name, f"unknown dtype {dtype_name!r}")
                    if why_not is not None:
                        if dtypes:
                            emit(Result(str(device), backend, dtype_name, "-", "-", "skip", note=why_not))
                        continue
                    dtype = DTYPES[dtype_name]
                    for check in selected:
                        problems = list(sizes) + (list(large) if check.large else [])
                        for problem in problems:
                            comparisons = run_check(check, problem, backend, dtype, device)
                            w = worst(comparisons)
                            ok = all(c.ok for c in comparisons)
                            emit(Result(str(device), backend, dtype_name, check.name,
                                        problem.describe(check.square), "ok" if ok else "FAIL", w))
                if (backend == "triton" and device.type == "cpu" and triton_interpreting()
                        and (not dtypes or "bf16" in dtypes)):
                    emit(_interpreter_refuses_bf16(device))
    return results


# ----------------------------------------------------------------------------- the table


_COLUMNS = (("device", 7), ("backend", 8), ("dtype", 5), ("check", 27), ("size", 22),
            ("worst error", 11), ("bound", 9), ("ratio", 7), ("status", 6))


def header() -> str:
    return "  ".join(name.ljust(width) for name, width in _COLUMNS).rstrip()


def format_row(r: Result) -> str:
    """One table line (and, for a failure, a second line naming the failing element)."""
    if r.worst is not None:
        err, bound = f"{r.worst.error:.3g}", f"{r.worst.bound:.3g}"
        ratio = "inf" if math.isinf(r.worst.ratio) else f"{r.worst.ratio:.3f}"
    else:
        err = bound = ratio = "-"
    cells = (r.device, r.backend, r.dtype, r.check, r.size, err, bound, ratio, r.status)
    line = "  ".join(str(c).ljust(w) for c, (_, w) in zip(cells, _COLUMNS)).rstrip()
    if r.failed and r.worst is not None:
        line += f"\n    -> {r.worst.what}: {r.worst.detail}"
    elif r.note:
        line += f"  ({r.note})"
    return line


def _names(values: Optional[Sequence[str]]) -> Optional[list[str]]:
    if not values:
        return None
    out = []
    for v in values:
        out.extend(s.strip() for s in v.split(",") if s.strip())
    return out or None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point; returns the exit status (0: every check passed, 1: a failure)."""
    parser = argparse.ArgumentParser(
        prog="python -m mmloss.check",
        description="Compare every usable mmloss backend with the float64 reference on this machine.")
    parser.add_argument("--backends", action="append",
                        help="comma-separated backends (default: every usable one: torch, triton, cuda, cpu)")
    parser.add_argument("--dtypes", action="append",
                        help="comma-separated dtypes among fp32, fp16, bf16, fp64 (default: all a backend supports)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N or all (default: cpu, plus cuda when a GPU is present)")
    parser.add_argument("--checks", action="append",
                        help="comma-separated check name prefixes, e.g. lse,clip_loss (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes (tiny and ragged; L = 1e4, 1e6)")
    args = parser.parse_args(argv)

    dtypes = _names(args.dtypes)
    for name in dtypes or ():
        if name not in DTYPES:
            parser.error(f"--dtypes: unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    checks = _names(args.checks)
    for prefix in checks or ():
        if not any(c.name.startswith(prefix) for c in CHECKS):
            parser.error(f"--checks: no check starts with {prefix!r} ({', '.join(c.name for c in CHECKS)})")
    try:
        devices = _devices(args.device)
    except (ValueError, RuntimeError) as exc:
        parser.error(str(exc))

    import mmloss

    print(f"mmloss {mmloss.__version__}, torch {torch.__version__}; devices: "
          f"{', '.join(str(d) for d in devices)}")
    for name, reason in mmloss.available_backends().items():
        print(f"  backend {name:9s} {'usable' if reason is None else 'unavailable: ' + reason}")
    print(header(), flush=True)
    start = time.perf_counter()
    results = run_checks(_names(args.backends), dtypes, devices, quick=args.quick, checks=checks,
                         progress=lambda r: print(format_row(r), flush=True))
    elapsed = time.perf_counter() - start
    failed = [r for r in results if r.failed]
    skipped = [r for r in results if r.status == "skip"]
    ran = len(results) - len(skipped)
    if not ran:
        print("no check ran (nothing selected is usable here)")
        return 1
    print(f"\n{ran} checks, {len(failed)} failed, {len(skipped)} skipped in {elapsed:.1f} s")
    if failed:
        print("FAILED:")
        for r in failed:
            print("  " + format_row(r).replace("\n", "\n  "))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
