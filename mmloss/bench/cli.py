"""``python -m mmloss.bench``: time and memory of mmloss against what people use today.

With no arguments it runs a sweep sized for the device present — on a CPU: CLIP, SigLIP and
NT-Xent at B = 1024, 2048, 4096, D = 512, fp32 (a few minutes at most on two cores); on a CUDA GPU:
B = 4096 … 65536, D = 768, bf16 — over every available mmloss backend and every installed peer, and
prints one table per loss, the mmloss-versus-peer ratios and two honesty checks (a re-timed
configuration must land inside its first min–max; the dense baseline at N = M = 4096 fp32 CLIP
must show at least its 64 MiB of logits). ``--from-json`` re-renders saved results without
measuring. See ``--help`` for the options and ``benchmarks/README.md`` for the method.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Optional

import torch

import mmloss
from mmloss.ops import BACKENDS, resolve_backend

from . import environment, measure, peers, report
from .cases import CASES, DEFAULT_LOSSES, describe_flop_model
from .sweep import Plan, Sweep, dense_memory_check, mmloss_implementation, peer_implementation, retime_check

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

# Default sweeps. NT-Xent's similarity matrix is 2B×2B, so its batches are half the others' (the
# same matrix sizes). The CPU sweep also gets a time limit (160 s, plus ≈ 10 s of checks and start-up),
# so it ends in under 3 minutes even on a slower or busy machine (the largest sizes are dropped
# first, and listed).
CPU_DEFAULTS = {"sizes": [1024, 2048, 4096], "ntxent_sizes": [512, 1024, 2048], "dim": 512,
                "dtype": torch.float32, "time_limit": 160.0}
CUDA_DEFAULTS = {"sizes": [4096, 8192, 16384, 32768, 65536], "ntxent_sizes": [2048, 4096, 8192, 16384, 32768],
                 "dim": 768, "dtype": torch.bfloat16, "time_limit": None}


def reexec_with_malloc_threshold() -> None:
    """Restart this command with ``MALLOC_MMAP_THRESHOLD_`` set (read by glibc only at start-up),
    so freed blocks leave the resident set and CPU peak memory can be measured."""
    if not sys.platform.startswith("linux") or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(measure.MMAP_THRESHOLD))
    argv = [sys.executable, "-m", "mmloss.bench", *sys.argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        return  # keep going in this process; measure.ensure_mmap_threshold() uses mallopt instead


# ----------------------------------------------------------------------------- options


def _csv(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def _size(text: str) -> int:
    t = text.strip().lower()
    factor = 1
    if t.endswith("k"):
        t, factor = t[:-1], 1024
    try:
        value = int(t) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a batch size: {text!r}")
    if value < 2:
        raise argparse.ArgumentTypeError(f"batch sizes must be ≥ 2, got {value}")
    return value


def _sizes(text: str) -> list:
    values = [_size(t) for t in _csv(text)]
    if not values:
        raise argparse.ArgumentTypeError("give at least one size, e.g. --sizes 1024,4096")
    return sorted(set(values))


def _dims(text: str) -> list:
    try:
        values = [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dim takes integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--dim must be ≥ 1, got {text!r}")
    return sorted(set(values))


def _dtypes(text: str) -> list:
    out = []
    for t in _csv(text):
        if t.lower() not in DTYPES:
            raise argparse.ArgumentTypeError(f"unknown dtype {t!r}; choose from float32, bfloat16, float16")
        if DTYPES[t.lower()] not in out:
            out.append(DTYPES[t.lower()])
    if not out:
        raise argparse.ArgumentTypeError("give a dtype, e.g. --dtype float32")
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmloss.bench",
        description="Time and peak memory of mmloss's fused losses against dense torch and installed "
                    "peers (open_clip, lightly, pytorch-metric-learning, Inf-CL, memeff, siglip-kernel). "
                    "Without options: a sweep sized for the device present.",
        epilog="Example (the Foundation acceptance): python -m mmloss.bench --loss clip --sizes 8192 "
               "--dim 512 --dtype float32 --backends torch --peers open_clip,dense",
    )
    p.add_argument("--loss", default=None, help=f"comma list of {', '.join(CASES)} or 'all' "
                   f"(default: {','.join(DEFAULT_LOSSES)})")
    p.add_argument("--sizes", type=_sizes, default=None,
                   help="batch sizes B, comma list, 'k' = ×1024 (default on CPU: 1024,2048,4096, NT-Xent "
                        "512,1024,2048; on CUDA: 4096…65536, NT-Xent 2048…32768)")
    p.add_argument("--dim", type=_dims, default=None, help="embedding dimension D, or a comma list "
                   "(default: 512 on CPU, 768 on CUDA)")
    p.add_argument("--dtype", type=_dtypes, default=None, help="float32 | bfloat16 | float16, or a comma "
                   "list (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--backends", default="all", help=f"mmloss backends: comma list of {', '.join(BACKENDS)}, "
                   "'all' (every available one except reference) or 'none'")
    p.add_argument("--peers", default="all", help=f"comma list of {', '.join(peers.PEERS)}, 'all' "
                   "(every installed one) or 'none'")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed repetitions per implementation (default: 10/7/5 on CPU by size, 20/10 "
                        "on CUDA; docs/design.md asks for ≥ 5)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--time-limit", type=_positive_float, default=None, metavar="SECONDS",
                   help="stop starting new configurations after this many seconds (or when the next "
                        "one is predicted to overrun its share); the skipped ones are listed (default: "
                        "160 s for the default CPU sweep, none otherwise)")
    p.add_argument("--json", metavar="PATH", help="write results as JSON (rewritten after every configuration)")
    p.add_argument("--csv", metavar="PATH", help="write results as CSV (appended after every configuration)")
    p.add_argument("--plot", metavar="PNG", help="write time and memory against batch size (log–log)")
    p.add_argument("--no-checks", action="store_true", help="skip the re-timing and dense-memory checks")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--list", action="store_true", help="list the losses, backends and peers available here and exit")
    p.add_argument("--from-json", metavar="PATH", help="measure nothing: print the tables of a saved --json "
                   "file (and write --plot / --csv from it)")
    return p


def _device(parser, text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        parser.error(f"--device: not a device: {text!r} (use cpu, cuda or cuda:N)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: only cpu and cuda are supported, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU is available to this torch build "
                         f"(torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def _backend_reason(name: str, device: torch.device) -> Optional[str]:
    try:
        resolve_backend(name, device)
    except RuntimeError as exc:
        return str(exc)
    return None


def _choose_backends(parser, text: str, device: torch.device):
    """(usable backend names, {name: reason} of those not usable here)."""
    reasons = {b: _backend_reason(b, device) for b in BACKENDS}
    key = text.strip().lower()
    if key == "none":
        return [], {}
    if key == "all":
        chosen = [b for b in BACKENDS if b != "reference" and reasons[b] is None]
        return chosen, {b: r for b, r in reasons.items() if r is not None and b != "reference"}
    chosen = []
    for name in _csv(text):
        if name not in BACKENDS:
            parser.error(f"--backends: unknown backend {name!r}; choose from {', '.join(BACKENDS)}, all, none")
        if reasons[name] is not None:
            parser.error(f"--backends: {reasons[name]}")
        if name not in chosen:
            chosen.append(name)
    return chosen, {}


def _choose_peers(parser, text: str, device: torch.device):
    """(usable peer names, {name: reason} of requested/known peers not usable here)."""
    key = text.strip().lower()
    if key == "none":
        return [], {}
    wanted = list(peers.PEERS) if key == "all" else _csv(text)
    for name in wanted:
        if name not in peers.PEERS:
            parser.error(f"--peers: unknown peer {name!r}; choose from {', '.join(peers.PEERS)}, all, none")
    usable, missing = [], {}
    for name in dict.fromkeys(wanted):
        reason = peers.peer_status(name, device)
        if reason is None:
            usable.append(name)
        else:
            missing[name] = reason
    return usable, missing


def _choose_losses(parser, text: Optional[str]):
    names = list(DEFAULT_LOSSES) if text is None else (list(CASES) if text.strip().lower() == "all" else _csv(text))
    if not names:
        parser.error("--loss: give at least one loss")
    for name in names:
        if name not in CASES:
            parser.error(f"--loss: unknown loss {name!r}; choose from {', '.join(CASES)}, all")
    return [CASES[n] for n in dict.fromkeys(names)]


# ----------------------------------------------------------------------------- progress


class Progress:
    """A one-line progress bar on stderr (tqdm when installed); silent when stderr is not a TTY."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled and total > 1
        self.started = time.monotonic()
        self.bar = None
        self.label = ""
        if self.enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="config", file=sys.stderr, dynamic_ncols=True, leave=False)
            except ImportError:
                self.bar = None

    def write(self, text: str) -> None:
        if self.enabled and self.bar is not None:
            self.bar.write(text, file=sys.stdout)
            return
        if self.enabled:
            sys.stderr.write("\r\033[K")
        print(text, flush=True)
        self._draw()

    def describe(self, label: str) -> None:
        self.label = label
        if self.bar is not None:
            self.bar.set_description(label)
        self._draw()

    def advance(self, label: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        self._draw()

    def _draw(self) -> None:
        if not self.enabled or self.bar is not None:
            return
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        elapsed = time.monotonic() - self.started
        sys.stderr.write(f"\r\033[K[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{elapsed:.0f} s  {self.label}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


# ----------------------------------------------------------------------------- main


def _list(device: torch.device) -> int:
    print(f"device: {device}")
    print("losses:")
    for case in CASES.values():
        fn = case.mmloss_function()
        state = "available" if fn is not None else f"not available in this mmloss build (mmloss.{case.mmloss_name})"
        print(f"  {case.name:<8} {case.title}: {state}")
    print("mmloss backends:")
    for name in BACKENDS:
        reason = _backend_reason(name, device)
        print(f"  {name:<10} {'usable' if reason is None else reason.split('unavailable: ', 1)[-1]}")
    print("peers:")
    for name, peer in peers.PEERS.items():
        reason = peers.peer_status(name, device)
        version = peer.version()
        state = "usable" + (f" ({version})" if version else "") if reason is None else reason
        print(f"  {name:<14} {state} — {peer.how}")
    return 0


def _from_json(parser, args) -> int:
    import json

    from .sweep import Row

    try:
        with open(args.from_json) as f:
            doc = json.load(f)
        rows = [Row.from_dict(r) for r in doc["results"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        parser.error(f"--from-json: cannot read {args.from_json}: {type(exc).__name__}: {exc}")
    meta = doc.get("meta", {})
    info = meta.get("environment", {})
    print(f"mmloss benchmark results from {args.from_json} (measured with: {meta.get('command', '?')})")
    if info:
        for label, line in zip(("stack", "device", "platform"), environment.header_lines(info)):
            print(f"  {label + ':':<10}{line}")
    gpu = any(r.device.startswith("cuda") for r in rows)
    for i, line in enumerate(report.legend_lines(gpu)):
        print(f"  {'columns:' if i == 0 else '':<10}{line}")
    report.print_tables(rows, print, gpu, CASES)
    versus = report.versus_lines(rows)
    if versus:
        print("\n── mmloss versus peers (time ratio = mmloss ÷ peer; below 1 is better) ──")
        for line in versus:
            print(line)
    if doc.get("skipped"):
        print("\n── not measured ──")
        for item in doc["skipped"]:
            print(f"{item['config']}: {item['reason']}")
    if doc.get("checks"):
        print("\n── honesty checks ──")
        for check in doc["checks"]:
            print(f"{check['name']}: {check['text']}")
    if args.csv:
        sink = report.CsvSink(args.csv)
        sink.add(None, rows)
    if args.plot:
        from .plot import plot

        title = f"mmloss benchmark · {info.get('gpu', info.get('cpu', ''))}"
        plot(rows, args.plot, title, {name: c.title for name, c in CASES.items()})
        print(f"plot written to {args.plot}")
    return 0


def main(argv: Optional[list] = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # the tables use "—", "×", "≥": never crash on a narrow locale
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_json:
        return _from_json(parser, args)
    device = _device(parser, args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # events and streams of the clock follow the current device
    if args.list:
        return _list(device)

    defaults = CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    cases = _choose_losses(parser, args.loss)
    if args.sizes:
        sizes = {c.name: args.sizes for c in CASES.values()}
    else:
        sizes = {c.name: defaults["ntxent_sizes"] if c.name == "ntxent" else defaults["sizes"] for c in CASES.values()}
    time_limit = args.time_limit
    default_limit = time_limit is None and args.sizes is None and defaults["time_limit"] is not None
    if default_limit:
        time_limit = defaults["time_limit"]
    dims = args.dim or [defaults["dim"]]
    dtypes = args.dtype or [defaults["dtype"]]
    backends, backend_missing = _choose_backends(parser, args.backends, device)
    peer_names, peer_missing = _choose_peers(parser, args.peers, device)

    notes = []
    runnable = []
    for case in cases:
        if case.mmloss_function() is None:
            notes.append(f"{case.name}: not available in this mmloss build (mmloss.{case.mmloss_name} is "
                         "missing) — not benchmarked")
        else:
            runnable.append(case)
    if not runnable:
        for note in notes:
            print(note)
        print("nothing to benchmark: none of the requested losses is in this mmloss build", file=sys.stderr)
        return 1
    if not backends and not peer_names:
        parser.error("--backends none --peers none leaves nothing to measure")
    # Only peers that implement one of the losses being run.
    relevant = {p for p in peers.PEERS if any(c.name in peers.PEERS[p].losses for c in runnable)}
    peer_names = [p for p in peer_names if p in relevant]
    peer_missing = {p: r for p, r in peer_missing.items() if p in relevant}

    malloc = measure.ensure_mmap_threshold() if device.type == "cpu" else "n/a (GPU allocator statistics)"
    info = environment.describe(device, malloc)
    impls = [mmloss_implementation(b) for b in backends] + [peer_implementation(p) for p in peer_names]
    plan = Plan(device, runnable, sizes, dims, dtypes, impls, args.repeats, time_limit, args.seed)

    progress = Progress(len(plan.configs()), enabled=sys.stderr.isatty())
    out = progress.write
    command = "python -m mmloss.bench" + ("" if not (argv if argv is not None else sys.argv[1:]) else
                                          " " + shlex.join(argv if argv is not None else sys.argv[1:]))
    out(f"mmloss benchmark: {command}")
    for label, line in zip(("stack", "device", "platform"), environment.header_lines(info)):
        out(f"  {label + ':':<10}{line}")
    probe_text = ("torch.cuda.max_memory_allocated delta" if device.type == "cuda" else
                  f"growth of VmHWM over VmRSS (/proc/self/clear_refs; malloc: {malloc})")
    clock_text = "CUDA events" if device.type == "cuda" else "time.perf_counter, all torch threads"
    out(f"  {'time:':<10}{clock_text}; 1 warm-up call each, then the repeats, implementations alternated "
        "(order rotated every round)")
    out(f"  {'memory:':<10}peak above the inputs, gradients included = {probe_text}")
    out(f"  {'floor:':<10}k × torch.mm (N×D)·(D×M) into a preallocated output; k = 4 for CLIP, 3 for SigLIP, "
        "NT-Xent, SupCon")
    out(f"  {'FLOPs:':<10}{describe_flop_model()}")
    out(f"  {'run:':<10}" + " · ".join(f"mmloss[{b}]" for b in backends) if backends else
        f"  {'run:':<10}(no mmloss backend)")
    for name in peer_names:
        peer = peers.PEERS[name]
        version = peer.version()
        how = peers.load_peer(name)[1]
        where = f" · {how}" if "loaded" in how else ""
        out(f"  {'':<10}{peer.label + (' ' + version if version else ''):<22} {peer.how}{where}")
    unavailable = [(f"mmloss[{b}]", r.split("unavailable: ", 1)[-1]) for b, r in backend_missing.items()] + \
                  list(peer_missing.items())
    for i, (name, reason) in enumerate(unavailable):
        out(f"  {'not run:' if i == 0 else '':<10}{name:<22} {reason}")
    for note in notes:
        out(f"  {'note:':<10}{note}")
    all_sizes = sorted({b for c in runnable for b in sizes[c.name]})
    repeats_text = str(args.repeats) if args.repeats else "by size (" + ", ".join(
        f"B={b}: {plan.repeats_for(b)}" for b in all_sizes) + ")"
    size_text = " · ".join(f"{c.name} B {','.join(map(str, sizes[c.name]))}" for c in runnable)
    out(f"  {'sweep:':<10}{size_text} · D {', '.join(map(str, dims))} · "
        f"{', '.join(str(d).replace('torch.', '') for d in dtypes)} · repeats {repeats_text}")
    if time_limit:
        out(f"  {'':<10}time limit {time_limit:g} s" + (" (the default sweep's; --time-limit changes it)"
                                                       if default_limit else ""))
    if args.repeats is not None and args.repeats < 5:
        out(f"  {'note:':<10}fewer than 5 repeats (docs/design.md asks for ≥ 5): treat the medians as rough")
    for i, line in enumerate(report.legend_lines(device.type == "cuda")):
        out(f"  {'columns:' if i == 0 else '':<10}{line}")

    meta = {
        "command": command, "environment": info, "flop_model": describe_flop_model(),
        "options": {"losses": [c.name for c in runnable], "sizes": {c.name: sizes[c.name] for c in runnable},
                    "dims": dims,
                    "dtypes": [str(d).replace("torch.", "") for d in dtypes], "backends": backends,
                    "peers": peer_names, "repeats": args.repeats, "time_limit": time_limit,
                    "seed": args.seed},
        "implementations": {"mmloss": backends,
                            "peers": {n: {"version": peers.PEERS[n].version(), "loaded": peers.load_peer(n)[1],
                                          "call": peers.PEERS[n].how} for n in peer_names}},
        "not_run": {**{f"mmloss[{b}]": r for b, r in backend_missing.items()}, **peer_missing},
        "notes": notes,
    }
    impl_width = max(len(i.label) for i in impls + [peer_implementation("dense")]) + 1
    table = report.TableFormat(max(impl_width, len("floor (4×mm)")), device.type == "cuda")
    sinks = [report.ConsoleSink(out, table, CASES)]
    json_sink = report.JsonSink(args.json, meta) if args.json else None
    if json_sink:
        sinks.append(json_sink)
    if args.csv:
        sinks.append(report.CsvSink(args.csv))

    sweep = Sweep(plan, sinks, progress)
    try:
        rows = sweep.run()
    finally:
        progress.close()

    versus = report.versus_lines(rows)
    if versus:
        print("\n── mmloss versus peers (time ratio = mmloss ÷ peer; below 1 is better) ──")
        for line in versus:
            print(line)
    if sweep.skipped:
        print("\n── not measured ──")
        for config, reason in sweep.skipped:
            print(f"{config}: {reason}")

    checks = []
    if not args.no_checks:
        print("\n── honesty checks ──")
        for check in (retime_check, dense_memory_check):
            try:
                result = check(sweep)
            except Exception as exc:  # noqa: BLE001 - a check must never take the report down
                result_text = f"{check.__name__}: could not run ({type(exc).__name__}: {exc})"
                print(result_text)
                checks.append({"name": check.__name__, "passed": None, "text": result_text})
                continue
            print(f"{result.name}: {result.text}")
            checks.append({"name": result.name, "passed": result.passed, "text": result.text, **result.details})
    wall = sweep.elapsed()
    print(f"\nwall time {wall:.0f} s (sweep and checks) · mmloss {mmloss.__version__} · torch {torch.__version__}")
    if json_sink:
        json_sink.set("checks", checks)
        json_sink.set("wall_seconds", round(wall, 1))
    if args.plot:
        from .plot import plot

        title = (f"mmloss benchmark · {info.get('gpu', info['cpu'])} · "
                 f"D={','.join(map(str, dims))} · {', '.join(str(d).replace('torch.', '') for d in dtypes)}")
        try:
            plot(rows, args.plot, title, {c.name: c.title for c in runnable})
            print(f"plot written to {args.plot}")
        except ValueError as exc:
            print(f"no plot: {exc}", file=sys.stderr)
    return 0
