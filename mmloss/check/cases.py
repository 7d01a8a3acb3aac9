"""The named checks of ``python -m mmloss.check`` and the problems they run on.

A ``Check`` builds, from seeded random inputs (``CaseInputs``) and a backend name, everything
``agree`` needs: the fast call, the reference, the arguments and their names, the logit bound
and the further dense formulations. ``run_check`` runs one check on one ``Problem``.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Callable, Optional, Sequence

import torch

import mmloss

from .. import _validation as V
from .agree import agree
from .compare import Comparison

Tensor = torch.Tensor


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


class CaseInputs:
    """Seeded random inputs of one case, built in float64 on the CPU and rounded to ``dtype``."""

    def __init__(self, problem: Problem, dtype: torch.dtype, device: torch.device, seed: int):
        self.p, self.dtype, self.device = problem, dtype, device
        self.gen = torch.Generator().manual_seed(seed)
        self.param_dtype = V.compute_dtype(dtype)

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


def on_device(kwargs: dict, device) -> dict:
    """``kwargs`` with its tensors (labels) moved to ``device`` (the reference runs on the CPU)."""
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in kwargs.items()}


# ----------------------------------------------------------------------------- the primitives

# primitive → (function in mmloss.ops and mmloss.reference, its mode keyword, output names)
_PAIR_PRIMITIVES = {
    "lse": ("similarity_lse", "exclude", ("row_lse", "col_lse")),
    "sigmoid": ("pairwise_sigmoid", "positives", ("rows",)),
}


def _pair_primitive_check(primitive: str, mode: str) -> Callable:
    """The check of ``similarity_lse(exclude=mode)`` or ``pairwise_sigmoid(positives=mode)``:
    N rows against M rows close to them, tensor scale and bias, labels among max(2, min(N, M)//3)
    classes for "same_label"."""
    function, mode_keyword, output_names = _PAIR_PRIMITIVES[primitive]

    def build(inp: CaseInputs, backend: str):
        p = inp.p
        x64 = inp.rows(p.n)
        y64 = inp.rows(p.m, near=x64)
        kwargs = {mode_keyword: mode}
        if mode == "same_label":
            classes = max(2, min(p.n, p.m) // 3)
            kwargs.update(x_labels=inp.labels(p.n, classes), y_labels=inp.labels(p.m, classes))
        args = (inp.leaf(x64), inp.leaf(y64), inp.param(p.scale), inp.param(p.bias))

        def fast(x, y, s, b):
            return getattr(mmloss.ops, function)(x, y, s, b, backend=backend, **kwargs)

        def ref(x, y, s, b):
            return getattr(mmloss.reference, function)(x, y, s, b, **on_device(kwargs, x.device))

        return fast, ref, args, ("x", "y", "scale", "bias"), output_names, \
            _logit(p.scale, p.radius, p.radius, p.bias), [prescaled(ref, [(0, 2)])]
    return build


def _kl_check(cross_entropy: bool) -> Callable:
    def build(inp: CaseInputs, backend: str):
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


# ----------------------------------------------------------------------------- the losses


def _pair_loss_check(loss: str, names: tuple[str, ...], *, bias: bool) -> Callable:
    """The check of ``mmloss.<loss>(x, y, scale[, bias])``: N rows against M rows close to them
    (M = N for a square check), tensor scale (and bias)."""
    def build(inp: CaseInputs, backend: str):
        p = inp.p
        x64 = inp.rows(p.n)
        args = (inp.leaf(x64), inp.leaf(inp.rows(p.m, near=x64)), inp.param(p.scale))
        if bias:
            args += (inp.param(p.bias),)

        def fast(*loss_args):
            return getattr(mmloss, loss)(*loss_args, backend=backend)

        ref = getattr(mmloss.reference, loss)
        return fast, ref, args, names, ("loss",), \
            _logit(p.scale, p.radius, p.radius, p.bias if bias else 0.0), [prescaled(ref, [(0, 2)])]
    return build


def _ntxent(inp: CaseInputs, backend: str):
    p = inp.p
    z0 = inp.rows(p.n, radius=1.0)
    args = (inp.leaf(z0), inp.leaf(inp.rows(p.n, near=z0, radius=1.0)), p.temperature)

    def fast(a, b, t):
        return mmloss.ntxent_loss(a, b, t, backend=backend)

    return fast, mmloss.reference.ntxent_loss, args, ("out0", "out1", "temperature"), ("loss",), \
        1.0 / p.temperature, []


def _supcon(inp: CaseInputs, backend: str):
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


_IMAGE_TEXT_ARGS = ("image_features", "text_features", "logit_scale")

CHECKS = (
    Check("lse/none", _pair_primitive_check("lse", "none")),
    Check("lse/diagonal", _pair_primitive_check("lse", "diagonal")),
    Check("lse/same_label", _pair_primitive_check("lse", "same_label")),
    Check("sigmoid/diagonal", _pair_primitive_check("sigmoid", "diagonal")),
    Check("sigmoid/same_label", _pair_primitive_check("sigmoid", "same_label")),
    Check("sigmoid/none", _pair_primitive_check("sigmoid", "none")),
    Check("kl", _kl_check(False)),
    Check("kl/cross_entropy", _kl_check(True)),
    Check("clip_loss", _pair_loss_check("clip_loss", _IMAGE_TEXT_ARGS, bias=False), square=True),
    Check("infonce_loss", _pair_loss_check("infonce_loss", ("query", "keys", "logit_scale"), bias=False)),
    Check("siglip_loss", _pair_loss_check("siglip_loss", _IMAGE_TEXT_ARGS + ("logit_bias",), bias=True), square=True),
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
    inp = CaseInputs(problem, dtype, device, seed)
    fast, ref, args, names, out_names, logit, variants = check.build(inp, backend)
    return agree(fast, ref, args, dtype, logit, names=names, output_names=out_names, seed=seed,
                 dense_variants=variants)
