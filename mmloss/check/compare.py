"""The comparison rules of ``mmloss.check``: one fast-path output or gradient against float64.

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

Every rule returns a ``Comparison`` naming the element it was decided at; all arithmetic is
float64 on the CPU (inputs are copied there).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Optional

import torch

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


def worst(comparisons: Iterable[Comparison]) -> Optional[Comparison]:
    """The comparison with the largest error/bound ratio (None for none)."""
    comparisons = list(comparisons)
    if not comparisons:
        return None
    return max(comparisons, key=lambda c: c.ratio)


# ----------------------------------------------------------------------------- naming an element


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


def _as_list(dense) -> list:
    """``dense`` (None, a tensor or a sequence of them) as a list."""
    if isinstance(dense, Tensor):
        return [dense]
    return list(dense or ())


# ----------------------------------------------------------------------------- mismatches that always fail


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


# ----------------------------------------------------------------------------- values


def _dense_value_error(dense: list, e: Tensor, finite: Tensor) -> Optional[Tensor]:
    """Elementwise max over the dense formulations of |dense − e| (0 where ``e`` is not finite;
    formulations of another shape are ignored), or None when there is none."""
    dense_err = None
    for d in dense:
        if d is not None and tuple(d.shape) == tuple(e.shape):
            d_err = torch.where(finite, (_host64(d) - e).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs(), 0.0)
            dense_err = d_err if dense_err is None else torch.maximum(dense_err, d_err)
    return dense_err


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
    dense_err = _dense_value_error(_as_list(dense), e, fin)
    if dense_err is not None:
        bound = torch.maximum(bound, DENSE_FACTOR * dense_err)
    ratio = err / bound
    flat = int(ratio.reshape(-1).argmax())
    if dense_err is not None and float(DENSE_FACTOR * dense_err.reshape(-1)[flat]) >= float(bound.reshape(-1)[flat]):
        rule = f"{DENSE_FACTOR:g}× dense fp32's error {float(dense_err.reshape(-1)[flat]):.3g}"
    return Comparison(what, float(err.reshape(-1)[flat]), float(bound.reshape(-1)[flat]),
                      f"{_element(what, a, e, flat)} (bound {rule})")


# ----------------------------------------------------------------------------- gradients


def _half_grad_rule(what: str, actual: Tensor, expected: Tensor, a: Tensor, e: Tensor, denses: list,
                    where: str) -> Comparison:
    """fp16/bf16: relative norm error ≤ 1e-2 + what rounding the reference to the gradient's
    dtype loses, or ≤ 4× dense fp32's relative norm error where that is larger."""
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


def _fp32_grad_bound(e: Tensor, denses: list, L: float) -> tuple[float, str]:
    """(bound, rule) of an fp32 gradient: 1e-4·max|g|, or 4× dense fp32's max-abs error +
    1e-7·max|g| — the only bound at large logits, the larger of the two below."""
    scale = float(e.abs().max())
    large = L >= LARGE_LOGIT
    plain = _GRAD_MAX_ABS["fp32"] * scale
    bound, rule = (0.0 if large and denses else plain), f"{_GRAD_MAX_ABS['fp32']:g}·max|g|"
    if denses:
        dense_err = max(float((d - e).abs().max()) for d in denses)
        relative_to_dense = DENSE_FACTOR * dense_err + DENSE_SLACK * scale
        if large or relative_to_dense > bound:
            bound = relative_to_dense
            rule = (f"{DENSE_FACTOR:g}× dense fp32's max-abs error {dense_err:.3g} + "
                    f"{DENSE_SLACK:g}·max|g|, L = {L:.3g}")
    return bound, rule


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
    denses = [_host64(t) for t in _as_list(dense) if t is not None]
    diff = (a - e).abs()
    flat = int(diff.reshape(-1).argmax())
    where = _element(what, a, e, flat)
    kind = _dtype_class(dtype)
    if kind == "half":
        return _half_grad_rule(what, actual, expected, a, e, denses, where)
    if kind == "fp64":
        tol = _GRAD_MAX_ABS["fp64"] + _FP64_GRAD_PER_LOGIT * L
        scale = float(e.abs().max())
        return Comparison(what, float(diff.reshape(-1)[flat]), tol * scale, f"{where} ({tol:.3g}·max|g|)")
    bound, rule = _fp32_grad_bound(e, denses, L)
    return Comparison(what, float(diff.reshape(-1)[flat]), bound, f"{where} ({rule})")
