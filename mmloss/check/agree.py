"""Running a fast path and the float64 reference on the same inputs, and comparing both sides.

``agree`` is the engine every check and every randomized agreement suite goes through: it runs
``fast`` on the given inputs, the reference on float64 CPU copies of the same rounded values,
and (for fp32/fp16/bf16 paths) the reference in dense fp32 as a baseline, then holds values and
gradients to the rules of ``mmloss.check.compare``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from .compare import Comparison, compare_grads, compare_values

Tensor = torch.Tensor


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


def _dense_baselines(formulations: Sequence[Callable], inputs: Sequence, n_outputs: int,
                     seed: int) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
    """(values, gradients) of each dense fp32 formulation on fp32 copies of ``inputs``:
    values[k] lists output k of every formulation that returned one, gradients[i] the gradient
    of input i of every formulation that gave one."""
    dense_values = [[] for _ in range(n_outputs)]
    dense_grads = [[] for _ in inputs]
    for formulation in formulations:
        dense_inputs = [as_dense_fp32(t) for t in inputs]
        dense_outs = _outputs(formulation(*dense_inputs))
        for slot, out in zip(dense_values, dense_outs):
            if out is not None:
                slot.append(out.detach())
        for slot, g in zip(dense_grads, _gradients(dense_outs, upstream_weights(dense_outs, seed), dense_inputs)):
            if g is not None:
                slot.append(g)
    return dense_values, dense_grads


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
    formulations = (reference, *dense_variants) if dtype != torch.float64 else ()
    dense_values, dense_grads = _dense_baselines(formulations, inputs, len(refs), seed)
    out_names = list(output_names) if output_names is not None else (
        ["value"] if len(refs) == 1 else [f"output{k}" for k in range(len(refs))])
    if len(outs) != len(refs):
        return [Comparison("value", math.inf, 0.0, f"got {len(outs)} outputs, expected {len(refs)}")]
    values = (compare_values(name, a, e, dtype, logit_bound, dense=d)
              for name, a, e, d in zip(out_names, outs, refs, dense_values))
    grads = (compare_grads(f"d{name}", a, e, dtype, logit_bound, dense=d)
             for name, a, e, d in zip(names, got_grads, ref_grads, dense_grads))
    return [c for c in (*values, *grads) if c is not None]
