"""The honesty checks run after a sweep (``--no-checks`` skips them): a re-timed configuration
must land inside its first min–max range, and the dense baseline's measured peak must hold its
N×N fp32 logits (so the memory probe is known to see real allocations)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from . import measure, peers
from .cases import CLIP, fp32_logits_mib
from .results import dtype_name
from .sweep import Sweep


@dataclass
class CheckResult:
    name: str
    passed: Optional[bool]  # None: could not run
    text: str
    details: dict = field(default_factory=dict)


def retime_check(sweep: Sweep, budget_seconds: float = 8.0) -> CheckResult:
    """Measure one configuration again, under the same alternation, and see whether the new median
    of its first mmloss implementation lies inside the first run's min–max range.

    The configuration is the largest batch (first loss preferred) whose re-measurement should take
    at most ``budget_seconds`` (one timing round × (repeats + warm-up); compilation is cached by
    then), else the quickest one."""
    if not sweep.measured:
        return CheckResult("re-timing", None, "nothing was measured, so nothing to re-time")
    first_loss = sweep.measured[0][0].case.name
    cost = [(c, r * (sweep.plan.repeats_for(c.batch) + 1)) for c, _, r in sweep.measured]
    affordable = [(c, s) for c, s in cost if s <= budget_seconds]
    if affordable:
        config = max(affordable, key=lambda cs: (cs[0].case.name == first_loss, cs[0].batch))[0]
    else:
        config = min(cost, key=lambda cs: cs[1])[0]
    first = {r.impl: r for r in sweep.rows if r.loss == config.case.name and r.batch == config.batch
             and r.dim == config.dim and r.dtype == dtype_name(config.dtype)}
    again = {r.impl: r for r in sweep.measure(config)}
    timed = [name for name, r in first.items() if r.ok and r.total is not None and name in again
             and again[name].ok and again[name].total is not None]
    if not timed:
        return CheckResult("re-timing", None, f"{config.describe()}: nothing was timed twice")
    target = next((n for n in timed if first[n].kind == "mmloss"), timed[0])
    verdicts = {}
    for name in timed:
        stat = first[name].total
        verdicts[name] = {"first_median_ms": stat.median * 1e3, "first_min_ms": stat.min * 1e3,
                          "first_max_ms": stat.max * 1e3, "retimed_median_ms": again[name].total.median * 1e3,
                          "inside": stat.contains(again[name].total.median)}
    v = verdicts[target]
    others = ", ".join(f"{n} {'in' if verdicts[n]['inside'] else 'OUT'}" for n in timed if n != target)
    text = (f"{config.describe()} measured again: {target} median {v['retimed_median_ms']:.3g} ms vs first run "
            f"{v['first_median_ms']:.3g} ms [{v['first_min_ms']:.3g}–{v['first_max_ms']:.3g}] → "
            + ("inside the first min–max: pass" if v["inside"] else "OUTSIDE the first min–max: FAIL (noisy machine?)")
            + (f" (others: {others})" if others else ""))
    return CheckResult("re-timing", v["inside"], text, {"config": config.describe(), "target": target,
                                                        "implementations": verdicts})


def dense_memory_check(sweep: Sweep, batch: int = 4096, dim: int = 512) -> CheckResult:
    """The dense baseline at N = M = 4096 fp32 CLIP holds its N×N fp32 logits: its measured peak
    must be at least that (64 MiB) — a check that the memory probe sees real allocations."""
    need = fp32_logits_mib(batch)
    found = next((r for r in sweep.rows if r.loss == "clip" and r.impl == "dense" and r.batch == batch
                  and r.dtype == "float32" and r.peak_bytes is not None), None)
    if found is not None:
        peak, where = found.peak_bytes, "from the sweep"
    else:
        if sweep.probe.unavailable is not None:
            return CheckResult("dense memory", None, f"not run: {sweep.probe.unavailable}")
        inputs = CLIP.make_inputs(batch, dim, torch.float32, sweep.plan.device, sweep.plan.seed)
        fn = peers.make_call("dense", CLIP, inputs)
        measure.timed_call(fn, inputs, sweep.clock)  # warm-up
        peak = measure.timed_call(fn, inputs, sweep.clock, sweep.probe).peak_bytes
        inputs.clear_grads()
        del inputs
        measure.free_cached(sweep.plan.device)
        where = "separate step"
    peak_mib = peak / 2**20
    passed = peak_mib >= need
    text = (f"dense CLIP N=M={batch} fp32 ({where}): peak {peak_mib:.1f} MiB "
            f"{'≥' if passed else '<'} {need:.0f} MiB of logits → " + ("pass" if passed else "FAIL"))
    return CheckResult("dense memory", passed, text, {"peak_mib": peak_mib, "logits_mib": need, "batch": batch})
