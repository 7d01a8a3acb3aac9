"""A/B benchmark: is this change no slower than a base commit?

    python benchmarks/ab.py --base main                  # the working tree against main
    python benchmarks/ab.py --base HEAD~3 --head HEAD    # two commits
    python benchmarks/ab.py --base HEAD --head HEAD --shapes small=32x16,medium=96x32   # self-check: ≈ 1

What it does:

1. ``git worktree add --detach`` of the base commit (and of ``--head`` when given) under a
   temporary directory, removed again when the script ends (also on errors and Ctrl-C). Without
   ``--head`` the head is the working tree this script lives in, uncommitted changes included.
2. Worker subprocesses, each importing ``mmloss`` from one tree (``PYTHONPATH`` points at it; the
   worker checks where ``mmloss`` came from). Both workers measure with the same
   harness — this checkout's ``mmloss/bench/cases.py`` and ``measure.py``, loaded by path — so only
   the library differs: the same inputs (seed 0, rows L2-normalised), the same calls
   (``mmloss.<loss>_loss(..., backend="torch")``), forward + backward timed by
   ``measure.timed_call`` on the CPU in fp32, Python's gc off while timing. The clock is the
   worker's CPU time by default (``--clock cpu``: time other processes hold the cores is not
   counted, so a shared machine can still answer); ``--clock wall`` on an idle machine.
3. Cases: every loss the benchmark knows (``mmloss.bench.cases.CASES``: CLIP, SigLIP, NT-Xent,
   SupCon) that both trees export in ``mmloss.__all__``, at each shape of ``--shapes`` (default a
   small and a medium one; NT-Xent's batch is halved, its similarity matrix being 2B×2B).
4. ``--repeats`` rounds (≥ 7 for an acceptance run). Each round starts a fresh base worker and a
   fresh head worker, both pinned to the same CPU(s) (``--cpus``; on a shared machine two
   processes left to the scheduler can differ by 30 % for their whole life, one core being
   busier than the other; fresh processes every round turn what remains of such effects into
   noise the median removes). Both warm every case up twice; then each case is called in
   ``--calls`` pairs — one base call and one head call back to back, which goes first
   alternating — so the two calls of a pair meet the same state of the machine (drift, bursts
   of load from other processes); the idle worker waits while the other runs.
5. One table per loss: base and head medians over all calls (ms); head ÷ base, the median of
   the pairs' ratios (on a shared machine far steadier than a ratio of two medians); the range
   of the rounds' median pair ratios (how noisy the run was); and whether the two trees computed
   the same loss value (``=`` bit for bit, else the relative difference). A shape whose ratio
   exceeds 1 + ``--threshold`` (default 5 %) is flagged SLOWER, and so is its loss.

Exit status: 0 when no loss is slower by more than the threshold, 1 when one is, 2 for a usage
or setup error (unknown commit, a worker that fails to start). The per-round ratio range shows
how noisy the run was; on a busy machine raise ``--repeats`` and ``--calls``. Checked on a shared
2-core machine at load average ≈ 6: HEAD against itself (the self-check line above, defaults
otherwise) gave head/base 0.975–0.995 for every case, in about 2.5 minutes.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

CHECKOUT = Path(__file__).resolve().parents[1]  # the head tree by default, and the harness's home
HARNESS = CHECKOUT / "mmloss" / "bench"
PROTOCOL = "AB "  # prefix of the worker's protocol lines on stdout (anything else is ignored)
DEFAULT_SHAPES = "small=256x128,medium=1024x256"
WARM_UP_CALLS = 2


# ----------------------------------------------------------------------------- options


def parse_shapes(text: str) -> list:
    """``name=BxD,...`` → [(name, B, D)]."""
    shapes = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        name, _, size = item.partition("=")
        try:
            batch, dim = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--shapes: expected name=BxD, got {item!r}")
        if not name or batch < 4 or dim < 1:
            raise argparse.ArgumentTypeError(f"--shapes: need a name, B ≥ 4 and D ≥ 1, got {item!r}")
        shapes.append((name, batch, dim))
    if not shapes:
        raise argparse.ArgumentTypeError("--shapes: give at least one name=BxD")
    return shapes


def parse_cpus(text: str) -> list:
    try:
        cpus = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cpus: expected a comma list of CPU numbers, got {text!r}")
    if not cpus:
        raise argparse.ArgumentTypeError("--cpus: give at least one CPU")
    return cpus


def default_cpus(threads: int) -> Optional[list]:
    """The first ``threads`` CPUs this process may run on; None where affinity is not supported."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return sorted(os.sched_getaffinity(0))[:threads]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/ab.py",
                                description="A/B timing of mmloss's losses: a base commit against the "
                                            "working tree (or --head), alternated rounds.")
    p.add_argument("--base", default="HEAD", help="base commit (any git revision; default HEAD)")
    p.add_argument("--head", default=None, help="head commit (default: the working tree of this checkout)")
    p.add_argument("--repeats", type=positive_int, default=7, help="alternated rounds (default 7; ≥ 7 to accept)")
    p.add_argument("--calls", type=positive_int, default=20,
                   help="pairs of calls (base and head back to back) per case and round (default 20)")
    p.add_argument("--shapes", type=parse_shapes, default=parse_shapes(DEFAULT_SHAPES),
                   help=f"comma list of name=BxD (default {DEFAULT_SHAPES})")
    p.add_argument("--losses", default=None, help="comma list of bench cases (default: every one)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--cpus", type=parse_cpus, default=None,
                   help="comma list of CPUs both workers are pinned to (default: the first --threads "
                        "CPUs this process may use; Linux only)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="cpu: the worker's CPU time (time.process_time; robust to other processes on a "
                        "shared machine, the default); wall: time.perf_counter (an idle machine)")
    p.add_argument("--threshold", type=float, default=0.05, help="flag head/base above 1 + this (default 0.05)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return p


# ----------------------------------------------------------------------------- the worker (one tree)


def _load_harness(name: str):
    """``mmloss/bench/<name>.py`` of this checkout, loaded by path (its own module, not the tree's)."""
    spec = importlib.util.spec_from_file_location(f"mmloss_ab_harness_{name}", HARNESS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up; this process is ours alone
    spec.loader.exec_module(module)
    return module


def _send(message: dict) -> None:
    print(PROTOCOL + json.dumps(message), flush=True)


def _worker_cases(spec: dict, cases_module, mmloss) -> tuple:
    """({key: (case, inputs)} of the requested cases this tree exports, [cases it lacks])."""
    chosen, missing = {}, []
    for name in spec["losses"]:
        case = cases_module.CASES[name]
        if case.mmloss_name not in getattr(mmloss, "__all__", ()) or case.mmloss_function() is None:
            missing.append(name)
            continue
        for shape, batch, dim in spec["shapes"]:
            rows = batch // case.rows_per_batch  # NT-Xent: 2B rows from B pairs, so half the batch
            inputs = case.make_inputs(rows, dim, spec["dtype"], "cpu", seed=0)
            chosen[f"{name}/{shape}"] = (case, inputs)
    return chosen, missing


class ProcessTimeClock:
    """``measure``'s clock interface on the worker's CPU time: time spent descheduled while other
    processes run is not counted (with several torch threads, their CPU times add up)."""

    def mark(self) -> float:
        return time.process_time()

    def seconds(self, start: float, end: float) -> float:
        return end - start

    def synchronize(self) -> None:
        """CPU work is synchronous: there is nothing to wait for."""


def _one_call(case, inputs, measure, clock) -> tuple:
    """(seconds, loss value) of one timed forward + backward call, gc off."""
    fn = case.mmloss_function()
    gc.disable()
    try:
        result = measure.timed_call(lambda inp: case.call(fn, inp, "torch"), inputs, clock)
    finally:
        gc.enable()
    inputs.clear_grads()
    return result.total, float(result.loss)


def worker(spec: dict) -> int:
    """Serves one tree: warm-up, then one measurement per "time <case key>" line on stdin."""
    if spec["cpus"]:
        os.sched_setaffinity(0, spec["cpus"])  # before torch starts any thread: they all inherit it
    import torch

    torch.set_num_threads(spec["threads"])
    import mmloss

    tree = Path(spec["tree"]).resolve()
    if tree not in Path(mmloss.__file__).resolve().parents:
        _send({"error": f"mmloss was imported from {mmloss.__file__}, not from {tree}"})
        return 2
    cases_module, measure = _load_harness("cases"), _load_harness("measure")
    spec["dtype"] = torch.float32
    chosen, missing = _worker_cases(spec, cases_module, mmloss)
    clock = ProcessTimeClock() if spec["clock"] == "cpu" else measure.CpuClock()
    values = {key: [_one_call(case, inputs, measure, clock)[1] for _ in range(WARM_UP_CALLS)][-1]
              for key, (case, inputs) in chosen.items()}
    gc.collect()
    gc.freeze()  # what exists now is never collected again: the collections while timing stay small
    _send({"ready": True, "mmloss": mmloss.__file__, "threads": torch.get_num_threads(), "missing": missing,
           "values": values, "all": list(getattr(mmloss, "__all__", ()))})
    for line in sys.stdin:
        command, _, key = line.strip().partition(" ")
        if command != "time":
            break
        case, inputs = chosen[key]
        _send({"seconds": _one_call(case, inputs, measure, clock)[0]})
    gc.unfreeze()  # let the interpreter's shutdown finalise everything (extension types included)
    return 0


# ----------------------------------------------------------------------------- the parent


class Worker:
    """A worker subprocess for one tree, spoken to one JSON line at a time."""

    def __init__(self, label: str, tree: Path, spec: dict):
        self.label, self.tree = label, tree
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
        env["OMP_NUM_THREADS"] = str(spec["threads"])
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", "--spec", json.dumps({**spec, "tree": str(tree)})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tempfile.gettempdir())
        self.ready: dict = {}

    def wait_ready(self) -> dict:
        self.ready = self.receive()
        return self.ready

    def receive(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(PROTOCOL):
                message = json.loads(line[len(PROTOCOL):])
                if "error" in message:
                    raise RuntimeError(f"{self.label} worker: {message['error']}")
                return message
        raise RuntimeError(f"{self.label} worker ({self.tree}) exited with status {self.process.wait()} "
                           "(its stderr is above)")

    def time(self, key: str) -> float:
        self.process.stdin.write(f"time {key}\n")
        self.process.stdin.flush()
        return self.receive()["seconds"]

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.process.stdin.close()
        self.process.wait(timeout=60)


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(CHECKOUT), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


@contextlib.contextmanager
def worktrees(revisions: dict):
    """{label: revision or None} → {label: tree}: a detached worktree per revision under one
    temporary directory (None: this checkout's working tree). Removed on the way out."""
    scratch = Path(tempfile.mkdtemp(prefix="mmloss-ab-"))
    made = []
    try:
        trees = {}
        for label, revision in revisions.items():
            if revision is None:
                trees[label] = CHECKOUT
                continue
            sha = git("rev-parse", "--verify", f"{revision}^{{commit}}")
            path = scratch / label
            git("worktree", "add", "--detach", str(path), sha)
            made.append(path)
            trees[label] = path
        yield trees
    finally:
        for path in made:
            with contextlib.suppress(subprocess.CalledProcessError):
                git("worktree", "remove", "--force", str(path))
        shutil.rmtree(scratch, ignore_errors=True)
        with contextlib.suppress(subprocess.CalledProcessError):
            git("worktree", "prune")


@contextlib.contextmanager
def worker_pair(trees: dict, spec: dict):
    """{"base": Worker, "head": Worker}, started together and ready; closed on the way out."""
    workers = {}
    try:
        for label in ("base", "head"):
            workers[label] = Worker(label, trees[label], spec)
        for worker_ in workers.values():
            worker_.wait_ready()
        yield workers
    finally:
        for worker_ in workers.values():
            worker_.close()


def measure_round(workers: dict, keys: list, calls: int, parity: int) -> dict:
    """{case key: [(base seconds, head seconds)] × calls}: per case, one call at a time, base and
    head back to back (which goes first alternates with ``parity``, the case and the call), so the
    two calls of a pair meet the same state of the machine."""
    pairs = {}
    for i, key in enumerate(keys):
        pairs[key] = []
        for c in range(calls):
            order = ("base", "head") if (parity + i + c) % 2 == 0 else ("head", "base")
            seconds = {label: workers[label].time(key) for label in order}
            pairs[key].append((seconds["base"], seconds["head"]))
    return pairs


def run_rounds(trees: dict, spec: dict, losses: list, shapes: list, repeats: int) -> tuple:
    """(first round's ready messages {label: …}, the losses both trees have,
    {case key: [measure_round's pairs] per round}): every round with a fresh pair of workers."""
    ready, common, rounds = None, None, {}
    for r in range(repeats):
        with worker_pair(trees, spec) as workers:
            if ready is None:
                ready = {label: w.ready for label, w in workers.items()}
                for label, message in ready.items():
                    print(f"  {label}: mmloss from {message['mmloss']}", file=sys.stderr)
                common = [n for n in losses if all(n not in m["missing"] for m in ready.values())]
                keys = [f"{name}/{shape}" for name in common for shape, _, _ in shapes]
            for key, pairs in measure_round(workers, keys, spec["calls"], r).items():
                rounds.setdefault(key, []).append(pairs)
        print(f"  round {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return ready, common, rounds


# ----------------------------------------------------------------------------- the report


def _same_value(a: Optional[float], b: Optional[float]) -> str:
    if a is None or b is None:
        return "?"
    return "=" if a == b else f"{abs(a - b) / max(abs(b), 1e-30):.0e}"


def loss_table(case, shapes: list, rounds: dict, values: dict, threshold: float) -> tuple:
    """(lines of one loss's table, whether it is slower than the threshold allows). base / head ms:
    medians of all calls; head/base: the median of the pairs' ratios; per-round: the range of the
    rounds' median pair ratios."""
    name = case.name
    lines = [f"── {name} ──",
             f"{'shape':<10}{'B×D':>12}{'base ms':>11}{'head ms':>11}{'head/base':>11}{'per-round':>17}  same loss"]
    slower = False
    for shape, batch, dim in shapes:
        key = f"{name}/{shape}"
        pairs = [pair for round_pairs in rounds[key] for pair in round_pairs]
        base, head = statistics.median(b for b, _ in pairs), statistics.median(h for _, h in pairs)
        ratio = statistics.median(h / b for b, h in pairs)
        per_round = [statistics.median(h / b for b, h in round_pairs) for round_pairs in rounds[key]]
        flag = ratio > 1 + threshold
        slower |= flag
        lines.append(f"{shape:<10}{f'{batch // case.rows_per_batch}×{dim}':>12}{base * 1e3:>11.3f}"
                     f"{head * 1e3:>11.3f}{ratio:>11.3f}"
                     f"{f'[{min(per_round):.2f}–{max(per_round):.2f}]':>17}  "
                     f"{_same_value(values['head'].get(key), values['base'].get(key)):<9}"
                     + ("  SLOWER" if flag else ""))
    return lines, slower


def describe(revision: Optional[str]) -> str:
    if revision is None:
        return f"the working tree {CHECKOUT}"
    return f"{revision} = {git('rev-parse', '--short', f'{revision}^{{commit}}')}"


def report(args, cases: dict, ready: dict, losses: list, rounds: dict) -> int:
    """Prints the run's description and one table per loss; the exit status (1: a loss is slower).
    ``ready``: each tree's worker's first message (threads, missing losses, loss values)."""
    print(f"A/B: base {describe(args.base)} · head {describe(args.head)}")
    print(f"  {args.repeats} rounds, each with a fresh worker per tree; per round and case {args.calls} "
          f"pairs of calls (base and head back to back); forward + backward, "
          f"backend torch, CPU fp32, torch threads {ready['head']['threads']}, "
          f"workers pinned to CPU {','.join(map(str, args.cpus or default_cpus(args.threads) or ['(none)']))}, "
          f"{'CPU time (time.process_time)' if args.clock == 'cpu' else 'wall time (time.perf_counter)'}")
    covered = {case.mmloss_name for case in cases.values()}
    outside = [n for n in ready["head"]["all"] if n.endswith("_loss") and n not in covered]
    print(f"  losses: {', '.join(losses)} (every benchmark case in mmloss.__all__ of both trees); "
          f"losses with no benchmark case: {', '.join(outside) or 'none'}")
    for label in ("base", "head"):
        if ready[label]["missing"]:
            print(f"  not in the {label} tree: {', '.join(ready[label]['missing'])}")
    values = {label: ready[label]["values"] for label in ready}
    slower = []
    for name in losses:
        lines, is_slower = loss_table(cases[name], args.shapes, rounds, values, args.threshold)
        print("\n" + "\n".join(lines))
        if is_slower:
            slower.append(name)
    limit = f"{args.threshold:.0%}"
    print("\n" + (f"SLOWER by more than {limit}: {', '.join(slower)}" if slower else
                  f"no loss slower by more than {limit}"))
    return 1 if slower else 0


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.spec))
    cases = _load_harness("cases").CASES
    losses = list(cases) if args.losses is None else [t.strip() for t in args.losses.split(",") if t.strip()]
    unknown = [n for n in losses if n not in cases]
    if unknown:
        parser.error(f"--losses: unknown {', '.join(unknown)}; choose from {', '.join(cases)}")
    cpus = args.cpus or default_cpus(args.threads)
    if args.cpus and not hasattr(os, "sched_setaffinity"):
        parser.error("--cpus: this platform cannot pin processes to CPUs")
    spec = {"losses": losses, "shapes": args.shapes, "calls": args.calls, "threads": args.threads,
            "clock": args.clock, "cpus": cpus}
    try:
        with worktrees({"base": args.base, "head": args.head}) as trees:
            ready, common, rounds = run_rounds(trees, spec, losses, args.shapes, args.repeats)
            return report(args, cases, ready, common, rounds)
    except (subprocess.CalledProcessError, RuntimeError) as exc:
        detail = getattr(exc, "stderr", None) or ""
        print(f"ab.py: {exc} {detail}".strip(), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
