"""The sweep: for each (loss, dtype, D, batch) configuration, measure every implementation.

Per configuration, in this order:
1. inputs (leaves requiring grad) are created once, before anything is measured;
2. implementations whose memory model exceeds what is free are skipped with a note;
3. warm-up: one forward + backward each (``torch.compile`` compiles here); the first
   implementation's loss value and gradients are the reference and every other one is compared
   with them (loss relative error and gradient relative norm error ≤ 1e-3 in fp32, ≤ 1e-2 in
   fp16/bf16), so a table never compares different losses without saying so;
4. timing: ``repeats`` rounds; each round times every implementation and the floor once, in an
   order rotated by one each round, so drift hits all of them alike; the first round also takes
   each implementation's peak memory (the probe resets before the clock starts).
Errors (including out-of-memory) are recorded in the row and the sweep goes on.
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from . import measure, peers
from .cases import Inputs, LossCase

def loss_tolerance(dtype: torch.dtype) -> float:
    """Relative loss agreement: 1e-3; 1e-2 for fp16/bf16 inputs, where dense peers return the loss
    itself in bf16 (8 mantissa bits: a rounding of up to 2⁻⁸ ≈ 4e-3 on the value alone)."""
    return 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3


def grad_tolerance(dtype: torch.dtype) -> float:
    """Relative norm error of the gradients (docs/design.md's fp32 and fp16/bf16 levels)."""
    return 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class Implementation:
    """One row source: an mmloss backend or a peer."""

    label: str
    kind: str  # "mmloss" | "peer"
    key: str  # backend name or peer name
    supports: Callable[[LossCase], Optional[str]]  # None when it implements the loss, else why not
    factory: Callable[[LossCase, Inputs], Callable[[Inputs], torch.Tensor]]
    estimate: Callable[[LossCase, int, torch.dtype], Optional[int]]


def mmloss_implementation(backend: str) -> Implementation:
    def supports(case: LossCase):
        return None if case.mmloss_function() is not None else f"mmloss.{case.mmloss_name} is not in this build"

    def factory(case: LossCase, inputs: Inputs):
        fn = case.mmloss_function()
        return lambda inp: case.call(fn, inp, backend)

    def estimate(case: LossCase, batch: int, dtype):
        if backend != "reference":
            return None  # O((N+M)·D) plus a bounded workspace
        rows, cols = case.similarity_shape(batch)
        return 6 * rows * cols * max(torch.empty((), dtype=dtype).element_size(), 4)

    return Implementation(f"mmloss[{backend}]", "mmloss", backend, supports, factory, estimate)


def peer_implementation(name: str) -> Implementation:
    peer = peers.PEERS[name]

    def supports(case: LossCase):
        return None if case.name in peer.losses else f"{name} has no {case.name} loss"

    return Implementation(
        peer.label, "peer", name, supports,
        lambda case, inputs: peers.make_call(name, case, inputs),
        lambda case, batch, dtype: peers.estimate_bytes(name, case, batch, dtype),
    )


@dataclass
class Row:
    """One implementation at one configuration (times in seconds, memory in bytes)."""

    loss: str
    impl: str
    kind: str  # "floor" | "mmloss" | "peer"
    batch: int
    dim: int
    dtype: str
    device: str
    rows: int
    cols: int
    status: str = "ok"  # "ok" | "skipped" | "error"
    note: str = ""
    repeats: int = 0
    forward: Optional[measure.Stat] = None
    backward: Optional[measure.Stat] = None
    total: Optional[measure.Stat] = None
    peak_bytes: Optional[int] = None
    estimate_bytes: Optional[int] = None
    useful_flops: float = 0.0
    throughput: Optional[float] = None  # useful FLOP/s (the floor row: its own GEMM FLOP/s)
    time_over_floor: Optional[float] = None
    time_vs_dense: Optional[float] = None
    memory_vs_dense: Optional[float] = None
    check: str = ""
    loss_value: Optional[float] = None
    loss_rel_err: Optional[float] = None
    grad_rel_err: Optional[float] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("forward", "backward", "total"):
            stat = getattr(self, key)
            d.pop(key)
            for part in ("median", "min", "max"):
                d[f"{key}_ms_{part}"] = None if stat is None else getattr(stat, part) * 1e3
        d["peak_mib"] = None if self.peak_bytes is None else self.peak_bytes / 2**20
        d["estimate_mib"] = None if self.estimate_bytes is None else self.estimate_bytes / 2**20
        d.pop("peak_bytes")
        d.pop("estimate_bytes")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Row":
        d = dict(d)
        stats = {}
        for key in ("forward", "backward", "total"):
            parts = [d.pop(f"{key}_ms_{p}", None) for p in ("median", "min", "max")]
            stats[key] = None if parts[0] is None else measure.Stat(*(v / 1e3 for v in parts))
        peak = d.pop("peak_mib", None)
        estimate = d.pop("estimate_mib", None)
        names = {f.name for f in cls.__dataclass_fields__.values()}
        row = cls(**{k: v for k, v in d.items() if k in names}, **stats)
        row.peak_bytes = None if peak is None else int(peak * 2**20)
        row.estimate_bytes = None if estimate is None else int(estimate * 2**20)
        return row


@dataclass
class Config:
    case: LossCase
    dtype: torch.dtype
    dim: int
    batch: int

    def describe(self) -> str:
        return f"{self.case.name} B={self.batch} D={self.dim} {dtype_name(self.dtype)}"


def default_repeats(batch: int, device: torch.device) -> int:
    """≥ 5 repetitions (docs/design.md); more where a call is cheap."""
    if device.type == "cuda":
        return 20 if batch <= 16384 else 10
    return 10 if batch <= 1024 else 6 if batch <= 2048 else 5


@dataclass
class Plan:
    device: torch.device
    cases: list
    sizes: dict  # loss name -> batch sizes
    dims: list
    dtypes: list
    implementations: list
    repeats: Optional[int] = None  # None: default_repeats(batch)
    time_limit: Optional[float] = None
    seed: int = 0
    memory_fraction: float = 0.8  # skip an implementation whose estimate exceeds this share of free memory
    floor_output_bytes: int = 1 << 30

    def configs(self) -> list:
        return [Config(case, dtype, dim, batch) for case in self.cases for dtype in self.dtypes
                for dim in self.dims for batch in sorted(self.sizes[case.name])]

    def repeats_for(self, batch: int) -> int:
        return self.repeats if self.repeats is not None else default_repeats(batch, self.device)


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        return "out of memory"
    return f"{type(exc).__name__}: {text}"[:160]


def _relative_norm_error(grads, reference) -> Optional[float]:
    if any(g is None for g in grads):
        return math.inf
    num = sum(float((g.double() - r.double()).square().sum()) for g, r in zip(grads, reference))
    den = sum(float(r.double().square().sum()) for r in reference)
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


class Sweep:
    """Runs a Plan; hands each configuration's rows to the sinks as soon as they are measured."""

    def __init__(self, plan: Plan, sinks=(), progress=None):
        self.plan = plan
        self.sinks = list(sinks)
        self.progress = progress
        self.clock = measure.clock_for(plan.device)
        self.probe = measure.memory_probe_for(plan.device)
        self.rows: list = []
        self.skipped: list = []  # (config description, reason)
        self.measured: list = []  # (config, wall seconds, seconds of one timing round)
        self._round_seconds = 0.0
        self.started = time.monotonic()

    # -- driver ---------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _predict_seconds(self, config: Config) -> Optional[float]:
        """Wall seconds ``config`` will take: one timing round of the last measured configuration
        (same loss, dtype and D if any), scaled by the work N·M·D, times the rounds plus the
        warm-up call. One-time costs (compilation) are left out of the scale on purpose."""
        def work(c: Config) -> float:
            rows, cols = c.case.similarity_shape(c.batch)
            return float(rows) * cols * c.dim

        same = [m for m in self.measured
                if m[0].case.name == config.case.name and m[0].dtype == config.dtype and m[0].dim == config.dim]
        pool = same or self.measured
        if not pool:
            return None
        previous, _, round_seconds = pool[-1]
        return round_seconds * work(config) / work(previous) * (self.plan.repeats_for(config.batch) + 1)

    def _time_limit_reason(self, config: Config, later: list) -> Optional[str]:
        limit = self.plan.time_limit
        if limit is None:
            return None
        left = limit - self.elapsed()
        if left <= 0:
            return f"time limit {limit:g} s reached"
        predicted = self._predict_seconds(config)
        if predicted is None:
            return None
        # Keep time for the losses still to come: every configuration of theirs except the largest,
        # so one slow loss cannot starve the others of their smaller sizes.
        reserve = 0.0
        for name in dict.fromkeys(c.case.name for c in later if c.case.name != config.case.name):
            theirs = [c for c in later if c.case.name == name]
            theirs.remove(max(theirs, key=lambda c: c.batch))
            reserve += sum(self._predict_seconds(c) or 0.0 for c in theirs)
        if predicted + reserve > left:
            def secs(v: float) -> str:
                return f"{v:.0f}" if v >= 10 else f"{v:.1f}"

            kept = f" (keeping ≈{secs(reserve)} s for the losses still to come)" if reserve else ""
            return f"predicted ≈{secs(predicted)} s; {secs(left)} s left of the {limit:g} s time limit{kept}"
        return None

    def run(self) -> list:
        configs = self.plan.configs()
        # Long-lived objects (modules, compiled graphs) go to the permanent generation, so the
        # collections before each memory probe only walk what the sweep itself creates.
        gc.collect()
        gc.freeze()
        try:
            return self._run(configs)
        finally:
            gc.unfreeze()

    def _run(self, configs) -> list:
        for sink in self.sinks:
            sink.start(self)
        for index, config in enumerate(configs):
            reason = self._time_limit_reason(config, configs[index + 1:])
            if reason is not None:
                self.skipped.append((config.describe(), reason))
                if self.progress is not None:
                    self.progress.advance(f"skipped {config.describe()}")
                continue
            if self.progress is not None:
                self.progress.describe(config.describe())
            t0 = time.monotonic()
            rows = self.measure(config)
            self.measured.append((config, time.monotonic() - t0, self._round_seconds))
            self.rows.extend(rows)
            for sink in self.sinks:
                sink.add(config, rows)
            if self.progress is not None:
                self.progress.advance(config.describe())
        for sink in self.sinks:
            sink.finish(self)
        return self.rows

    # -- one configuration ---------------------------------------------------------------------

    def _row(self, config: Config, label: str, kind: str, **kw) -> Row:
        rows, cols = config.case.similarity_shape(config.batch)
        return Row(config.case.name, label, kind, config.batch, config.dim, dtype_name(config.dtype),
                   str(self.plan.device), rows, cols,
                   useful_flops=config.case.useful_flops(config.batch, config.dim), **kw)

    def measure(self, config: Config) -> list:
        plan, case = self.plan, config.case
        device = plan.device
        measure.free_cached(device)
        inputs = case.make_inputs(config.batch, config.dim, config.dtype, device, plan.seed)
        try:
            free = self.probe.available_bytes()
        except (OSError, RuntimeError):
            free = 0  # unknown: run everything
        repeats = plan.repeats_for(config.batch)

        rows = []
        live = []  # (row, fn)
        for impl in plan.implementations:
            if impl.supports(case) is not None:
                continue
            estimate = impl.estimate(case, config.batch, config.dtype)
            row = self._row(config, impl.label, impl.kind, estimate_bytes=estimate)
            rows.append(row)
            if estimate is not None and free and estimate > plan.memory_fraction * free:
                row.status = "skipped"
                row.note = f"needs ≈{estimate / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
                continue
            try:
                live.append((row, impl.factory(case, inputs)))
            except Exception as exc:  # noqa: BLE001 - e.g. a peer's shape restriction
                row.status, row.note = "skipped", _error_text(exc)

        # Warm-up and agreement with the first implementation that runs.
        reference = None
        survivors = []
        for row, fn in live:
            try:
                result = measure.timed_call(fn, inputs, self.clock)
                value = float(result.loss.float())
                grads = [None if g is None else g.detach().clone() for g in inputs.grads()]
            except Exception as exc:  # noqa: BLE001
                row.status, row.note = "error", _error_text(exc)
                inputs.clear_grads()
                measure.free_cached(device)
                continue
            row.loss_value = value
            if reference is None:
                reference = (row.impl, value, grads)
                row.check = "ref"
            else:
                row.loss_rel_err = abs(value - reference[1]) / max(abs(reference[1]), 1e-12)
                row.grad_rel_err = _relative_norm_error(grads, reference[2])
                problems = []
                if not (row.loss_rel_err <= loss_tolerance(config.dtype)):
                    problems.append(f"LOSS≠ {row.loss_rel_err:.0e}")
                if not (row.grad_rel_err <= grad_tolerance(config.dtype)):
                    problems.append("GRAD≠ " + ("missing" if math.isinf(row.grad_rel_err)
                                                else f"{row.grad_rel_err:.0e}"))
                row.check = ", ".join(problems) or "ok"
                if problems:
                    row.note = f"disagrees with {reference[0]}"
            del grads
            survivors.append((row, fn))
        inputs.clear_grads()

        floor_row = self._row(config, f"floor ({case.floor_gemms}×mm)", "floor", repeats=repeats)
        a, b = case.floor_operands(inputs)
        floor_bytes = plan.floor_output_bytes if device.type == "cpu" else 4 * plan.floor_output_bytes
        try:
            floor = measure.Floor(a, b, case.floor_gemms, floor_bytes)
            floor.timed(self.clock)  # warm-up
            if floor.blocked:
                floor_row.note = f"output in row blocks of {floor.block}"
        except Exception as exc:  # noqa: BLE001
            floor, floor_row.status, floor_row.note = None, "error", _error_text(exc)
        rows.insert(0, floor_row)

        # Timing: implementations (and the floor) alternated, order rotated each round. The first
        # round also takes each implementation's peak memory (the probe resets before the clock).
        probe = self.probe if self.probe.unavailable is None else None
        if probe is None:
            for row, _ in survivors:
                row.note = (row.note + "; " if row.note else "") + self.probe.unavailable
        timed = survivors
        samples = {id(row): ([], [], []) for row, _ in timed}
        floor_samples = []
        order = list(timed) + ([(floor_row, None)] if floor is not None else [])
        failed = set()
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        loop_started = time.monotonic()
        try:
            for r in range(repeats):
                shift = r % len(order) if order else 0
                for row, fn in order[shift:] + order[:shift]:
                    if id(row) in failed:
                        continue
                    if fn is None:
                        floor_samples.append(floor.timed(self.clock))
                        continue
                    try:
                        result = measure.timed_call(fn, inputs, self.clock, probe if r == 0 else None)
                    except Exception as exc:  # noqa: BLE001
                        row.status, row.note = "error", _error_text(exc)
                        failed.add(id(row))
                        inputs.clear_grads()
                        measure.free_cached(device)
                        continue
                    if r == 0:
                        row.peak_bytes = result.peak_bytes
                    fwd, bwd, tot = samples[id(row)]
                    fwd.append(result.forward)
                    bwd.append(result.backward)
                    tot.append(result.total)
        finally:
            if gc_was_enabled:
                gc.enable()
        self._round_seconds = (time.monotonic() - loop_started) / max(repeats, 1)
        inputs.clear_grads()

        for row, _ in timed:
            fwd, bwd, tot = samples[id(row)]
            if row.ok and tot:
                row.repeats = len(tot)
                row.forward, row.backward, row.total = (measure.Stat.of(v) for v in (fwd, bwd, tot))
                row.throughput = row.useful_flops / row.total.median
        if floor_samples:
            floor_row.total = measure.Stat.of(floor_samples)
            floor_row.repeats = len(floor_samples)
            rows_, cols_ = case.similarity_shape(config.batch)
            floor_row.throughput = case.floor_gemms * 2.0 * rows_ * cols_ * config.dim / floor_row.total.median
            floor_row.time_over_floor = 1.0
        self._ratios(rows, floor_row)
        del inputs, live, survivors, timed, order
        measure.free_cached(device)
        return rows

    @staticmethod
    def _ratios(rows, floor_row: Row) -> None:
        dense = next((r for r in rows if r.impl == peers.PEERS["dense"].label and r.ok and r.total), None)
        for row in rows:
            if row.kind == "floor" or not row.ok or row.total is None:
                continue
            if floor_row.total is not None:
                row.time_over_floor = row.total.median / floor_row.total.median
            if dense is not None:
                row.time_vs_dense = row.total.median / dense.total.median
                if row.peak_bytes is not None and dense.peak_bytes:
                    row.memory_vs_dense = row.peak_bytes / dense.peak_bytes


# ----------------------------------------------------------------------------- honesty checks


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
    from .cases import CLIP, fp32_logits_mib

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
