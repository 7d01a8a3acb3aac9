"""The large-logit conformance check every backend must pass (issue 8, item 1; docs/design.md,
"Testing rules": at large L a path may not be much worse than dense fp32 on the same inputs).

A plain module, not a test file: ``tests/test_large_logits.py`` runs it for the torch backend,
``tests/triton_interpret/test_large_logits.py`` for the triton one (under TRITON_INTERPRET=1);
a future backend adds one line: ``for case in CASES: check("name", case)``.

The rule. For a case (a loss, a logit magnitude L = s·‖x‖·‖y‖) three computations on the same
fp32 inputs (features and the 0-d fp32 ``logit_scale`` leaf):

- exact: the float64 reference (``mmloss.reference``) on float64 copies of those inputs;
- dense: the same reference formula evaluated in fp32 with torch ops (``mmloss.reference`` on
  the fp32 inputs) — what an unfused fp32 implementation gets;
- fast: the backend under test.

Each gradient (features and ``logit_scale``; for ``similarity_kl`` the student's) must satisfy,
per tensor,

    max|fast − exact| ≤ 4·max|dense − exact| + floor

with floor = 1e-7·max|exact| for the feature gradients and, for the scalar ``logit_scale``
gradient (a sum of N row terms c_i = ⟨x_i, ∂ℓ/∂x_i⟩/s that may cancel, where 1e-7 of the
result can be below one ulp), the fp32 summation bound N·2⁻²⁴·Σ_i |c_i|. The loss value must satisfy the docs/design.md fp32 rule widened by
the same 4×: ``|fast − exact| ≤ 4·|dense − exact| + 1e-5·|exact| + 1e-6·L``. A backward that
re-forms ``exp(L − LSE)`` from one rounded fp32 LSE loses ~|L|·2⁻²⁴ in every exponent and fails
at every L here (at L ≈ 1e4 its gradient error is ~1e-4·max|grad|).

Inputs (``_pair``): the y rows point along distinct directions of a rotated coarse lattice
(four nonzero entries ±½ of five, then one seeded rotation, so the fp32 coordinates and
products round as real data do): distinct directions have cosines ≤ 3/4. x_i points along
y_π(i) for an injective π with π(i) ≠ i, and every row's norm is the case's norm times a
factor in [1, 1.25). So each row's largest logit is unique, at a negative pair (the loss and
its gradients are O(1)), and every other logit of the row is lower by at least s·norm²/16:
6 nats at L ≈ 1e2, 100 or more from L ≈ 1e3 on; the same holds for the columns when π is a
permutation (the square cases: CLIP, SigLIP, KL; InfoNCE is one-directional and runs 20×33).
Every softmax is then one-hot to fp32 from L ≈ 1e3 on, where dense fp32 is exact up to a few
ulps on any BLAS (its LSE rounds to the max itself and exp(0) = 1), while a backward that
recomputes the exponent from one rounded LSE, or re-forms the tile in another orientation, is
off by up to ulp(L) in it — the defects the check exists for. (With random directions, a logit
near a tie or near zero is rounded differently by each implementation and the 4× ratio becomes a
coin toss, so the dense error is also taken as the worst of DENSE_ORDERS evaluations that sum D
in different orders; with exact ties, dense fp32's own rounded LSE loses log(k) and the bound
goes slack.) The KL teacher is built the same way with other directions and another
permutation (a one-hot target elsewhere). SigLIP's gradients come from the pairs nearest the
decision boundary and carry no saved statistics; its cases check that nothing else is lost.
Cheap: each case is a few kernel launches on ≤ 20×33 tiles.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

import mmloss
import mmloss.reference as reference

LOSSES = ("clip", "infonce", "siglip", "kl")
# nominal logit magnitude → (feature norm, scale); L = scale·(STRETCH·norm)²
MAGNITUDES = {1e2: (1.0, 100.0), 1e3: (4.0, 100.0), 1e4: (4.0, 1000.0), 1e5: (32.0, 100.0),
              1e6: (32.0, 1000.0)}
NONZEROS = 4                       # nonzero entries per feature row
STRETCH = 1.25                     # row norms lie in [norm, STRETCH·norm); STRETCH·(1 − 1/NONZEROS) < 1
DENSE_FACTOR = 4.0
DENSE_ORDERS = 4                   # dense fp32 evaluations (feature-dimension orders); the worst counts
GRAD_FLOOR = 1e-7                  # × G (module docstring)
LOSS_REL, LOSS_PER_LOGIT = 1e-5, 1e-6


@dataclass(frozen=True)
class Case:
    loss: str            # one of LOSSES
    logits: float        # a key of MAGNITUDES (the nominal L)
    n: int = 20
    m: int = 33          # y rows of InfoNCE (one-directional); the others are square (n × n)
    d: int = 5
    seed: int = 0

    @property
    def norm(self) -> float:
        return MAGNITUDES[self.logits][0]

    @property
    def scale(self) -> float:
        return MAGNITUDES[self.logits][1]

    @property
    def logit_bound(self) -> float:
        return self.scale * (STRETCH * self.norm) ** 2

    def __str__(self) -> str:
        m = self.m if self.loss == "infonce" else self.n
        return (f"{self.loss}[L={self.logit_bound:.3g},norm={self.norm:g},s={self.scale:g},"
                f"{self.n}x{m},D={self.d},seed={self.seed}]")


CASES = [Case(loss, magnitude) for loss in LOSSES for magnitude in MAGNITUDES]


def _rotation(d: int, seed: int) -> torch.Tensor:
    """A seeded random (d, d) float64 rotation (QR of a Gaussian matrix)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def lattice_rows(count: int, d: int, norm: float, seed: int) -> torch.Tensor:
    """(count, d) float64 distinct rows of norm ``norm``, each with ``min(NONZEROS, d)``
    entries ±norm/√nonzeros (seeded random positions and signs): distinct rows have cosines
    ≤ 1 − 1/nonzeros."""
    g = torch.Generator().manual_seed(seed)
    k = min(NONZEROS, d)
    assert count <= math.comb(d, k) * 2 ** k, f"only {math.comb(d, k) * 2 ** k} distinct lattice rows"
    rows, seen = [], set()
    while len(rows) < count:
        row = torch.zeros(d, dtype=torch.float64)
        where = torch.randperm(d, generator=g)[:k]
        row[where] = (norm / k ** 0.5) * (torch.randint(0, 2, (k,), generator=g).to(torch.float64) * 2 - 1)
        key = tuple(row.tolist())
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return torch.stack(rows)


def _stretch(count: int, seed: int) -> torch.Tensor:
    """(count, 1) float64 row factors in [1, STRETCH): rows of different norms, so the row
    maxima differ (and so do their roundings)."""
    g = torch.Generator().manual_seed(seed)
    return 1.0 + (STRETCH - 1.0) * torch.rand(count, 1, generator=g, dtype=torch.float64)


def _derangement(n: int, m: int, seed: int) -> torch.Tensor:
    """(n,) distinct indices into range(m) with π(i) ≠ i (a permutation when n == m)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        pi = torch.randperm(m, generator=g)[:n]
        if not bool((pi == torch.arange(n)).any()):
            return pi


def _pair(n: int, m: int, norm: float, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, d), y (m, d)) fp32: y rows along distinct rotated lattice directions, x_i along
    y_π(i) (π injective, π(i) ≠ i), every row of norm in [norm, STRETCH·norm)."""
    directions = lattice_rows(m, d, 1.0, seed + 1) @ _rotation(d, seed)
    y = directions * norm * _stretch(m, seed + 2)
    x = directions[_derangement(n, m, seed + 3)] * norm * _stretch(n, seed + 4)
    return x.to(torch.float32), y.to(torch.float32)


def _inputs(case: Case) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(leaves that get gradients [x, y, s], constants [x_t, y_t, s_t] for KL), fp32."""
    m = case.m if case.loss == "infonce" else case.n   # InfoNCE is one-directional: N ≠ M
    x, y = _pair(case.n, m, case.norm, case.d, 1000 * case.seed)
    s = torch.tensor(case.scale, dtype=torch.float32)
    constants = []
    if case.loss == "kl":
        # an independent teacher: other directions, another permutation, its own scale (no gradient)
        x_t, y_t = _pair(case.n, m, case.norm, case.d, 1000 * case.seed + 10)
        constants = [x_t, y_t, torch.tensor(case.scale, dtype=torch.float32)]
    return [x, y, s], constants


def _kl_weights(case: Case, n: int, m: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * case.seed + 20)
    return 0.5 + torch.rand(n + m, generator=g, dtype=torch.float64)


def _objective(case: Case, backend: str) -> Callable:
    """f(x, y, s, *constants) → 0-d loss; backend "reference" evaluates the dense formula in the
    inputs' dtype."""
    dense = backend == "reference"

    def call(x, y, s, *constants):
        if case.loss == "kl":
            x_t, y_t, s_t = constants
            if dense:
                row, col = reference.similarity_kl(x, y, x_t, y_t, s, s_t)
            else:
                row, col = mmloss.ops.similarity_kl(x, y, x_t, y_t, s, s_t, backend=backend)
            w = _kl_weights(case, x.shape[0], y.shape[0]).to(row.dtype)
            return (torch.cat([row, col]) * w).sum()
        name = {"clip": "clip_loss", "infonce": "infonce_loss", "siglip": "siglip_loss"}[case.loss]
        if dense:
            return getattr(reference, name)(x, y, s)
        return getattr(mmloss, name)(x, y, s, backend=backend)
    return call


def _evaluate(case: Case, backend: str, dtype: torch.dtype, order=None):
    """(loss, [dx, dy, dscale]) on the case's fp32 inputs converted to ``dtype``; ``order`` a
    permutation of the feature dimension applied to every feature tensor (the same logits in
    exact arithmetic, another fp32 summation order; the gradients are permuted back)."""
    leaves, constants = _inputs(case)
    if order is not None:
        leaves = [leaves[0][:, order], leaves[1][:, order], leaves[2]]
        constants = [t[:, order] if t.dim() == 2 else t for t in constants]
    leaves = [t.to(dtype).requires_grad_(True) for t in leaves]
    if backend == "reference":
        constants = [t.to(dtype) for t in constants]
    loss = _objective(case, backend)(*leaves, *constants)
    grads = [g.detach() for g in torch.autograd.grad(loss, leaves)]
    if order is not None:
        inverse = torch.argsort(order)
        grads = [grads[0][:, inverse], grads[1][:, inverse], grads[2]]
    return loss.detach(), grads


def _dense_orders(case: Case) -> list:
    """Feature-dimension orders of the dense fp32 evaluations: the identity and DENSE_ORDERS − 1
    seeded permutations."""
    g = torch.Generator().manual_seed(1000 * case.seed + 21)
    return [None] + [torch.randperm(case.d, generator=g) for _ in range(DENSE_ORDERS - 1)]


def _describe(index: int, shape, fast, exact, dense) -> str:
    pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(index), shape)) if len(shape) else ()
    return (f"element {pos}: fast {fast.reshape(-1)[index].item():.10g}, exact "
            f"{exact.reshape(-1)[index].item():.10g}, dense fp32 {dense.reshape(-1)[index].item():.10g}")


def check(backend: str, case: Case) -> dict:
    """Run ``case`` on ``backend`` (fp32 inputs). AssertionError naming the backend, the case,
    the failing tensor (loss, dx, dy or dlogit_scale) and its worst element (by error / bound),
    with the fast, exact and dense fp32 values and the bound; else a dict
    {tensor name: (fast max error, dense fp32 max error, G)}."""
    loss_fast, g_fast = _evaluate(case, backend, torch.float32)
    loss_exact, g_exact = _evaluate(case, "reference", torch.float64)
    dense_runs = [_evaluate(case, "reference", torch.float32, order) for order in _dense_orders(case)]
    x = _inputs(case)[0][0].double()
    # the scalar gradient's summands c_i = ⟨x_i, ∂ℓ/∂x_i⟩ / s and the fp32 summation bound
    scale_terms = float(((x * g_exact[0]).sum(dim=1) / case.scale).abs().sum()) * x.shape[0] * 2.0 ** -24
    names = ("loss", "dx", "dy", "dlogit_scale")
    report = {}
    for k, name in enumerate(names):
        fast = ([loss_fast] + g_fast)[k].double()
        exact = ([loss_exact] + g_exact)[k].double()
        denses = [([run[0]] + run[1])[k].double() for run in dense_runs]
        dense_errs = [float((d - exact).abs().max()) for d in denses]
        dense_err = max(dense_errs)
        dense = denses[dense_errs.index(dense_err)]
        where = f"{case} backend={backend!r} {name}"
        assert fast.shape == exact.shape, f"{where}: shape {tuple(fast.shape)} vs {tuple(exact.shape)}"
        bad = ~torch.isfinite(fast)
        if bool(bad.any()):
            idx = int(bad.reshape(-1).nonzero()[0])
            raise AssertionError(f"{where}: non-finite at {_describe(idx, fast.shape, fast, exact, dense)}")
        err = (fast - exact).abs()
        dense_err = float((dense - exact).abs().max())
        if name == "loss":
            bound = DENSE_FACTOR * dense_err + LOSS_REL * exact.abs() + LOSS_PER_LOGIT * case.logit_bound
            rule = (f"{DENSE_FACTOR:g} × dense fp32 error {dense_err:.3g} + {LOSS_REL:g}·|exact| + "
                    f"{LOSS_PER_LOGIT:g}·L")
            magnitude = float(exact.abs().max())
        else:
            if name == "dlogit_scale":
                magnitude, floor = scale_terms, scale_terms
                rule_floor = f"N·2⁻²⁴·Σ|row terms| {floor:.3g}"
            else:
                magnitude = float(exact.abs().max())
                floor = GRAD_FLOOR * magnitude
                rule_floor = f"{GRAD_FLOOR:g} × max|grad| {magnitude:.3g}"
            bound = torch.full_like(err, DENSE_FACTOR * dense_err + floor)
            rule = f"{DENSE_FACTOR:g} × dense fp32 error {dense_err:.3g} + {rule_floor}"
        failed = err > bound
        if bool(failed.any()):
            idx = int(torch.where(failed, err / bound, 0.0).reshape(-1).argmax())
            raise AssertionError(
                f"{where}: error {err.reshape(-1)[idx].item():.3g} > bound {bound.reshape(-1)[idx].item():.3g} "
                f"({rule}) at {_describe(idx, fast.shape, fast, exact, dense)}; "
                f"{int(failed.sum())} of {failed.numel()} elements fail")
        report[name] = (float(err.max()), dense_err, magnitude)
    return report
