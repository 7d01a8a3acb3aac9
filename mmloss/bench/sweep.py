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

The rows are ``results.Row``; what is measured, ``implementations.Implementation``; the checks
run after a sweep live in ``checks``.
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

from . import measure, peers
from .cases import Inputs, LossCase
from .results import Row, dtype_name


def loss_tolerance(dtype: torch.dtype) -> float:
    """Relative loss agreement: 1e-3; 1e-2 for fp16/bf16 inputs, where dense peers return the loss
    itself in bf16 (8 mantissa bits: a rounding of up to 2⁻⁸ ≈ 4e-3 on the value alone)."""
    return 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3


def grad_tolerance(dtype: torch.dtype) -> float:
    """Relative norm error of the gradients (docs/design.md's fp32 and fp16/bf16 levels)."""
    return 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3


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


def error_text(exc: BaseException) -> str:
    """The one-line reason a row shows for an exception ("out of memory" for any OOM)."""
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


def check_agreement(row: Row, value: float, grads: list, reference: tuple, dtype: torch.dtype) -> None:
    """Loss relative error and gradient relative norm error of ``row`` against ``reference``
    (label, loss value, gradients); the row's check reads "ok" or names what differs."""
    reference_label, reference_value, reference_grads = reference
    row.loss_rel_err = relative_error(value, reference_value)
    row.grad_rel_err = _relative_norm_error(grads, reference_grads)
    judge_agreement(row, reference_label, dtype)


def relative_error(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12)


def judge_agreement(row: Row, reference_label: str, dtype: torch.dtype) -> None:
    """Sets ``row.check`` from its ``loss_rel_err`` and ``grad_rel_err`` (inf: gradients missing):
    "ok", or what differs from ``reference_label`` beyond the dtype's tolerances."""
    problems = []
    if not (row.loss_rel_err <= loss_tolerance(dtype)):
        problems.append(f"LOSS≠ {row.loss_rel_err:.0e}")
    if not (row.grad_rel_err <= grad_tolerance(dtype)):
        problems.append("GRAD≠ " + ("missing" if math.isinf(row.grad_rel_err) else f"{row.grad_rel_err:.0e}"))
    row.check = ", ".join(problems) or "ok"
    if problems:
        row.note = f"disagrees with {reference_label}"


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

    def time_limit_reason(self, config: Config, later: list) -> Optional[str]:
        """None when ``config`` may start within the plan's time limit, else why it is skipped
        (``later``: the configurations still to come after it)."""
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
            reason = self.time_limit_reason(config, configs[index + 1:])
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
        """Every implementation's row at ``config``, the floor's first: inputs → rows and callables
        → warm-up and agreement → floor → alternated timing rounds → statistics and ratios."""
        device = self.plan.device
        measure.free_cached(device)
        inputs = config.case.make_inputs(config.batch, config.dim, config.dtype, device, self.plan.seed)
        repeats = self.plan.repeats_for(config.batch)
        rows, live = self._instantiate(config, inputs)
        survivors = self._warm_up(config, live, inputs)
        floor_row, floor = self._floor(config, inputs, repeats)
        rows.insert(0, floor_row)
        samples, floor_samples = self._time_rounds(survivors, floor_row, floor, inputs, repeats)
        self._summarise(config, survivors, samples, floor_row, floor_samples)
        self._ratios(rows, floor_row)
        del inputs, live, survivors
        measure.free_cached(device)
        return rows

    def _free_bytes(self) -> int:
        try:
            return self.probe.available_bytes()
        except (OSError, RuntimeError):
            return 0  # unknown: run everything

    def _instantiate(self, config: Config, inputs: Inputs):
        """(rows of the implementations of this loss, [(row, callable)] of those that will run):
        one whose memory model exceeds the free memory, or whose callable cannot be built (a
        peer's shape restriction), keeps a skipped row."""
        plan, case = self.plan, config.case
        free = self._free_bytes()
        rows, live = [], []
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
                row.status, row.note = "skipped", error_text(exc)
        return rows, live

    def _warm_up(self, config: Config, live: list, inputs: Inputs) -> list:
        """One forward + backward each (compilation happens here); the first that runs is the
        reference the others' loss and gradients are checked against. Returns those that ran."""
        reference = None
        survivors = []
        for row, fn in live:
            try:
                result = measure.timed_call(fn, inputs, self.clock)
                value = float(result.loss.float())
                grads = [None if g is None else g.detach().clone() for g in inputs.grads()]
            except Exception as exc:  # noqa: BLE001
                row.status, row.note = "error", error_text(exc)
                inputs.clear_grads()
                measure.free_cached(self.plan.device)
                continue
            row.loss_value = value
            if reference is None:
                reference = (row.impl, value, grads)
                row.check = "ref"
            else:
                check_agreement(row, value, grads, reference, config.dtype)
            del grads
            survivors.append((row, fn))
        inputs.clear_grads()
        return survivors

    def _floor(self, config: Config, inputs: Inputs, repeats: int):
        """(the floor's row, the warmed-up ``measure.Floor``, or None when it failed)."""
        case = config.case
        floor_row = self._row(config, f"floor ({case.floor_gemms}×mm)", "floor", repeats=repeats)
        a, b = case.floor_operands(inputs)
        floor_bytes = self.plan.floor_output_bytes * (1 if self.plan.device.type == "cpu" else 4)
        try:
            floor = measure.Floor(a, b, case.floor_gemms, floor_bytes)
            floor.timed(self.clock)  # warm-up
            if floor.blocked:
                floor_row.note = f"output in row blocks of {floor.block}"
        except Exception as exc:  # noqa: BLE001
            floor, floor_row.status, floor_row.note = None, "error", error_text(exc)
        return floor_row, floor

    def _time_rounds(self, survivors: list, floor_row: Row, floor, inputs: Inputs, repeats: int):
        """Timing: implementations (and the floor) alternated, order rotated each round, gc off.
        The first round also takes each implementation's peak memory (the probe resets before the
        clock). Returns ({id(row): (forward, backward, total) samples}, floor samples)."""
        probe = self.probe if self.probe.unavailable is None else None
        if probe is None:
            for row, _ in survivors:
                row.note = (row.note + "; " if row.note else "") + self.probe.unavailable
        samples = {id(row): ([], [], []) for row, _ in survivors}
        floor_samples = []
        order = list(survivors) + ([(floor_row, None)] if floor is not None else [])
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
                    elif not self._time_call(row, fn, inputs, probe if r == 0 else None, r == 0,
                                             samples[id(row)]):
                        failed.add(id(row))
        finally:
            if gc_was_enabled:
                gc.enable()
        self._round_seconds = (time.monotonic() - loop_started) / max(repeats, 1)
        inputs.clear_grads()
        return samples, floor_samples

    def _time_call(self, row: Row, fn, inputs: Inputs, probe, first_round: bool, samples) -> bool:
        """One timed call of ``fn`` into ``samples``; False (and the row marked) when it raised."""
        try:
            result = measure.timed_call(fn, inputs, self.clock, probe)
        except Exception as exc:  # noqa: BLE001
            row.status, row.note = "error", error_text(exc)
            inputs.clear_grads()
            measure.free_cached(self.plan.device)
            return False
        if first_round:
            row.peak_bytes = result.peak_bytes
        forward, backward, total = samples
        forward.append(result.forward)
        backward.append(result.backward)
        total.append(result.total)
        return True

    @staticmethod
    def _summarise(config: Config, timed: list, samples: dict, floor_row: Row, floor_samples: list) -> None:
        """Median [min–max] of each timed row and the floor; throughput from the FLOP model."""
        for row, _ in timed:
            forward, backward, total = samples[id(row)]
            if row.ok and total:
                row.repeats = len(total)
                row.forward, row.backward, row.total = (measure.Stat.of(v) for v in (forward, backward, total))
                row.throughput = row.useful_flops / row.total.median
        if floor_samples:
            floor_row.total = measure.Stat.of(floor_samples)
            floor_row.repeats = len(floor_samples)
            rows, cols = config.case.similarity_shape(config.batch)
            floor_row.throughput = config.case.floor_gemms * 2.0 * rows * cols * config.dim / floor_row.total.median
            floor_row.time_over_floor = 1.0

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
