"""``python -m mmloss.bench --nproc N``: the distributed losses measured across N processes.

N processes are spawned (``torch.multiprocessing``, start method "spawn") and join one
torch.distributed group through a file:// rendezvous in a temporary directory: gloo on the CPU,
NCCL with one GPU per rank (rank r on cuda:r) under ``--device cuda`` (or ``auto`` when at least
N GPUs are visible). Every rank holds B_local rows per side: ``--sizes`` are PER-RANK batch
sizes, and the global batch is N·B_local. For CLIP and SigLIP each rank measures mmloss's
``distributed="gather"`` and ``"ring"`` for every selected backend and, when installed,
open_clip's distributed losses (``ranks.OPEN_CLIP_VARIANTS``): forward + backward time (in each
round the slowest rank's, then median over the rounds) and each rank's peak memory above its
inputs, and checks that the global loss and the feature gradients agree (``ranks.py`` has the
procedure, ``multiprocess_report.py`` the rows and the table).

Defaults: CPU B_local = 2048, D = 128, fp32; CUDA B_local = 4096, 16384, D = 768, bf16.
``--smoke`` (CI): B_local = 16, D = 8, 2 rounds, unless given. The single-process options that
have no meaning here (``--csv``, ``--plot``, ``--time-limit``, ``--list``, ``--from-json``,
``--no-checks``) are errors with ``--nproc``.
"""
from __future__ import annotations

import os
import queue as queue_module
import sys
import tempfile
import time
from typing import Optional

import torch

import mmloss

from . import console, environment, peers, report
from .cases import CASES
from .multiprocess_report import combine, legend_lines, table_for
from .options import choose_backends, choose_peers
from .ranks import MODES, OPEN_CLIP_VARIANTS, RankPlan, implementations_for, run_rank
from .results import dtype_name
from .sweep import Config

NPROC_LOSSES = ("clip", "siglip")  # the losses with a ring form and an open_clip distributed peer
NPROC_PEERS = ("open_clip",)
CPU_DEFAULTS = {"sizes": [2048], "dim": [128], "dtype": [torch.float32]}
CUDA_DEFAULTS = {"sizes": [4096, 16384], "dim": [768], "dtype": [torch.bfloat16]}
SMOKE = {"sizes": [16], "dim": [8], "repeats": 2}
TIMEOUT_S, SMOKE_TIMEOUT_S = 300.0, 60.0
SINGLE_PROCESS_ONLY = {"csv": "--csv", "plot": "--plot", "time_limit": "--time-limit", "list": "--list",
                       "from_json": "--from-json", "no_checks": "--no-checks"}


def check_options(parser, args) -> None:
    """``--smoke`` needs ``--nproc``; the single-process-only options are errors with it."""
    if args.nproc is None:
        if args.smoke:
            parser.error("--smoke belongs to --nproc runs (the pytest suites' smoke mode is MMLOSS_BENCH_SMOKE=1)")
        return
    given = [flag for name, flag in SINGLE_PROCESS_ONLY.items() if getattr(args, name)]
    if given:
        parser.error(f"{', '.join(given)}: not available with --nproc (use --json, then --from-json to re-print)")


def choose_device(parser, text: str, nproc: int):
    """(device type, communication backend, note or None) for N ranks."""
    if not torch.distributed.is_available():
        parser.error("--nproc: this torch build has no torch.distributed")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if text == "auto":
        if gpus >= nproc:
            text = "cuda"
        else:
            note = (f"--device auto: {gpus} CUDA GPU(s) visible for {nproc} ranks (NCCL needs one per rank): "
                    "running on the CPU with gloo") if gpus else None
            return "cpu", "gloo", note
    if text == "cpu":
        return "cpu", "gloo", None
    if text.startswith("cuda:"):
        parser.error(f"--nproc places rank r on cuda:r; pass --device cuda, not {text}")
    if text != "cuda":
        parser.error(f"--device: with --nproc choose auto, cpu or cuda, got {text!r}")
    if gpus < nproc:
        parser.error(f"--nproc {nproc} --device cuda: NCCL needs one GPU per rank, {gpus} visible "
                     "(use fewer ranks, or --device cpu for gloo)")
    if not torch.distributed.is_nccl_available():
        parser.error("--device cuda: this torch build has no NCCL")
    return "cuda", "nccl", None


def _losses(parser, text: Optional[str]) -> list:
    names = list(NPROC_LOSSES) if text is None or text.strip().lower() == "all" else \
        [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        if name not in NPROC_LOSSES:
            parser.error(f"--loss {name}: --nproc measures {', '.join(NPROC_LOSSES)} (the losses with a ring form)")
    return list(dict.fromkeys(names))


def _peers(parser, text: str, device: torch.device):
    """(usable peers, {peer: reason}) among those with a multi-process adapter."""
    wanted = text.strip().lower()
    if wanted not in ("all", "none"):
        for name in (t.strip() for t in text.split(",") if t.strip()):
            if name in peers.PEERS and name not in NPROC_PEERS:
                parser.error(f"--peers {name}: with --nproc only {', '.join(NPROC_PEERS)} is measured")
    usable, missing = choose_peers(parser, text, device)
    return [p for p in usable if p in NPROC_PEERS], {p: r for p, r in missing.items() if p in NPROC_PEERS}


def _threads(device_type: str, nproc: int) -> Optional[int]:
    """Torch threads per CPU rank: the cores shared out, unless OMP_NUM_THREADS says otherwise."""
    if device_type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, (os.cpu_count() or 1) // nproc)


def make_plan(parser, args, rendezvous: str):
    """(RankPlan, {peer or backend: why not run}, notes)."""
    nproc = args.nproc
    device_type, comm, note = choose_device(parser, args.device, nproc)
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    defaults = CUDA_DEFAULTS if device_type == "cuda" else CPU_DEFAULTS
    smoke = SMOKE if args.smoke else {}
    losses = _losses(parser, args.loss)
    sizes = args.sizes or smoke.get("sizes") or defaults["sizes"]
    dims = args.dim or smoke.get("dim") or defaults["dim"]
    dtypes = args.dtype or defaults["dtype"]
    backends, backend_missing = choose_backends(parser, args.backends, device)
    peer_names, peer_missing = _peers(parser, args.peers, device)
    if not backends:
        parser.error("--nproc needs an mmloss backend (--backends none leaves only the peers)")
    configs = tuple((loss, batch, dim, dtype_name(dtype)) for loss in losses for dtype in dtypes
                    for dim in dims for batch in sorted(sizes))
    plan = RankPlan(nproc, device_type, comm, rendezvous, configs, tuple(backends), tuple(peer_names),
                    args.repeats or smoke.get("repeats"), args.seed, _threads(device_type, nproc),
                    SMOKE_TIMEOUT_S if args.smoke else TIMEOUT_S)
    not_run = {**{f"mmloss[{b}]": r.split("unavailable: ", 1)[-1] for b, r in backend_missing.items()},
               **peer_missing}
    return plan, not_run, [note] if note else []


# ----------------------------------------------------------------------------- header


def _implementation_lines(plan: RankPlan, not_run: dict) -> list:
    lines = console.labelled("run:", [" · ".join(f"mmloss[{b}] {m}" for b in plan.backends for m in MODES)])
    if "open_clip" in plan.peers:
        version = peers.PEERS["open_clip"].version()
        how = peers.load_peer("open_clip")[1]
        for loss in NPROC_LOSSES:
            for label, _, text in OPEN_CLIP_VARIANTS[loss]:
                lines.append(f"  {'':<10}{label + (' ' + version if version else ''):<24} {text}")
        lines.append(f"  {'':<10}({how})")
    lines += console.labelled("not run:", (f"{name:<22} {reason}" for name, reason in not_run.items()))
    return lines


def header_lines(command: str, info: dict, plan: RankPlan, not_run: dict, notes: list) -> list:
    device = "cpu" if plan.device_type == "cpu" else f"cuda:0 … cuda:{plan.nproc - 1} (rank r on cuda:r)"
    threads = (f" · {plan.threads} torch thread(s) per rank" if plan.threads else
               " · torch threads per rank: OMP_NUM_THREADS" if plan.device_type == "cpu" else "")
    probe = ("torch.cuda.max_memory_allocated delta, one call (NCCL's own buffers are not counted)"
             if plan.device_type == "cuda" else
             "replay of this rank's torch CPU allocator events (mmloss.bench.allocations), calls repeated until "
             "two readings agree, the smallest kept (gloo's own buffers are not counted)")
    sizes = sorted({c[1] for c in plan.configs})
    repeats = plan.repeats or ", ".join(f"B_local={b}: {plan.repeats_for(b)}" for b in sizes)
    lines = [f"mmloss benchmark: {command}"] + console.environment_lines(info) + [
        f"  {'ranks:':<10}{plan.nproc} processes (torch.multiprocessing spawn, file:// rendezvous) · {plan.comm} · "
        f"{device}{threads}",
        f"  {'time:':<10}1 warm-up call each, then the rounds: implementations alternated (order rotated every "
        "round), a barrier before every call; per round the slowest rank's time",
        f"  {'memory:':<10}per rank, peak above the inputs (gradients included), untimed calls = {probe}",
        f"  {'inputs:':<10}--sizes are per-rank batch sizes B_local; the global batch is {plan.nproc}·B_local; "
        "mmloss with its default uneven-shard exchange (one small all-gather)",
    ] + _implementation_lines(plan, not_run) + [
        f"  {'sweep:':<10}{', '.join(dict.fromkeys(c[0] for c in plan.configs))} · B_local "
        f"{','.join(map(str, sizes))} · D {','.join(map(str, sorted({c[2] for c in plan.configs})))} · "
        f"{', '.join(dict.fromkeys(c[3] for c in plan.configs))} · repeats {repeats}",
    ] + [f"  {'note:':<10}{note}" for note in notes]
    return lines + console.labelled("columns:", legend_lines())


def metadata(command: str, info: dict, plan: RankPlan, not_run: dict, notes: list) -> dict:
    """The ``meta`` block of the JSON file (``nproc`` marks a multi-process file for --from-json)."""
    implementations = {impl.label: impl.how for loss in NPROC_LOSSES
                       for impl in implementations_for(loss, plan.backends, plan.peers)}
    return {"command": command, "environment": info, "mode": "multi-process", "nproc": plan.nproc,
            "comm": plan.comm, "device_type": plan.device_type, "threads_per_rank": plan.threads,
            "options": {"configs": [list(c) for c in plan.configs], "backends": list(plan.backends),
                        "modes": list(MODES), "peers": list(plan.peers), "repeats": plan.repeats,
                        "seed": plan.seed, "batch_is_per_rank": True},
            "implementations": implementations,
            "open_clip": {"version": peers.PEERS["open_clip"].version(),
                          "loaded": peers.load_peer("open_clip")[1]} if "open_clip" in plan.peers else None,
            "not_run": not_run, "notes": notes}


# ----------------------------------------------------------------------------- the run


class MultiProcessRun:
    """Spawns the ranks and turns their messages into rows, handed to the sinks per configuration
    (``skipped`` and ``elapsed`` are what ``report.JsonSink`` reads of a run)."""

    def __init__(self, plan: RankPlan, sinks):
        self.plan, self.sinks = plan, list(sinks)
        self.rows: list = []
        self.skipped: list = []  # stays empty: --nproc has no time limit
        self.failures: list = []
        self.payloads: dict = {}  # config index -> {rank: payload}
        self.started = time.monotonic()
        self.device_text = (f"{plan.nproc} ranks × " + ("cpu" if plan.device_type == "cpu" else "GPU")
                            + f", {plan.comm}")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def config(self, index: int) -> Config:
        loss, batch, dim, dtype = self.plan.configs[index]
        return Config(CASES[loss], getattr(torch, dtype), dim, batch)

    def on_message(self, message: tuple) -> None:
        kind = message[0]
        if kind == "progress":
            print(message[1], file=sys.stderr, flush=True)
        elif kind == "failed":
            _, index, rank, text = message
            loss, batch, dim, dtype = self.plan.configs[index]
            self.failures.append(f"rank {rank} failed at {loss} B_local={batch} D={dim} {dtype}:\n{text}")
        elif kind == "result":
            _, index, rank, payload = message
            arrived = self.payloads.setdefault(index, {})
            arrived[rank] = payload
            if len(arrived) == self.plan.nproc:
                config = self.config(index)
                rows = combine(config, [arrived[r] for r in range(self.plan.nproc)], self.plan.comm,
                               self.device_text)
                self.rows.extend(rows)
                for sink in self.sinks:
                    sink.add(config, rows)

    def _drain(self, queue, wait: float) -> None:
        while True:
            try:
                self.on_message(queue.get(timeout=wait))
            except queue_module.Empty:
                return
            wait = 0.0

    def run(self) -> list:
        mp = torch.multiprocessing
        queue = mp.get_context("spawn").Queue()
        for sink in self.sinks:
            sink.start(self)
        print(f"starting {self.plan.nproc} ranks ({self.plan.comm})…", file=sys.stderr, flush=True)
        context = mp.start_processes(run_rank, args=(self.plan, queue), nprocs=self.plan.nproc, join=False,
                                     start_method="spawn")
        stopped = None
        try:
            while True:
                self._drain(queue, 0.2)
                if context.join(timeout=0.05):
                    break
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            stopped = str(exc)  # torch terminates the other ranks
        except BaseException:
            for process in context.processes:  # the ranks this run started
                if process.is_alive():
                    process.terminate()
            raise
        finally:
            self._drain(queue, 0.2)
        if stopped is not None and not self.failures:  # a rank died before it could say why
            self.failures.append(stopped)
        for sink in self.sinks:
            sink.finish(self)
        return self.rows


def main(parser, args, command: str) -> int:
    """The ``--nproc`` command: plan → header → spawn and collect → summary (exit status 1 when a
    rank failed; the configurations measured before are kept in the tables and the JSON)."""
    with tempfile.TemporaryDirectory(prefix="mmloss-bench-nproc-") as workdir:
        plan, not_run, notes = make_plan(parser, args, os.path.join(workdir, "rendezvous"))
        device = torch.device("cuda", 0) if plan.device_type == "cuda" else torch.device("cpu")
        info = environment.describe(device, "n/a (allocation events)" if plan.device_type == "cpu"
                                    else "n/a (GPU allocator statistics)")
        if plan.threads:
            info["torch_threads"] = plan.threads  # what every rank uses (the header's device line)
        for line in header_lines(command, info, plan, not_run, notes):
            print(line, flush=True)
        table = table_for([impl.label for loss in NPROC_LOSSES
                           for impl in implementations_for(loss, plan.backends, plan.peers)], plan.nproc)
        sinks = [report.ConsoleSink(lambda text: print(text, flush=True), table, CASES)]
        json_sink = report.JsonSink(args.json, metadata(command, info, plan, not_run, notes)) if args.json else None
        if json_sink:
            sinks.append(json_sink)
        run = MultiProcessRun(plan, sinks)
        rows = run.run()
    console.print_summary(rows, [])
    for failure in run.failures:
        print(f"\n── run stopped ──\n{failure}", file=sys.stderr)
    print(f"\nwall time {run.elapsed():.0f} s · {plan.nproc} ranks · mmloss {mmloss.__version__} · "
          f"torch {torch.__version__}")
    if json_sink:
        json_sink.set("wall_seconds", round(run.elapsed(), 1))
        if run.failures:
            json_sink.set("failures", run.failures)
    return 1 if run.failures else 0
