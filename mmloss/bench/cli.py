"""``python -m mmloss.bench``: time and memory of mmloss against what people use today.

With no arguments it runs a sweep sized for the device present — on a CPU: CLIP, SigLIP and
NT-Xent at B = 1024, 2048, 4096, D = 512, fp32 (a few minutes at most on two cores); on a CUDA GPU:
B = 4096 … 65536, D = 768, bf16 — over every available mmloss backend and every installed peer, and
prints one table per loss, the mmloss-versus-peer ratios and two honesty checks (a re-timed
configuration must land inside its first min–max; the dense baseline at N = M = 4096 fp32 CLIP
must show at least its 64 MiB of logits). ``--from-json`` re-renders saved results without
measuring. ``--nproc N`` measures the distributed losses across N processes instead
(``multiprocess.py``). See ``--help`` for the options and ``benchmarks/README.md`` for the method.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Optional

import torch

import mmloss
from mmloss.ops import BACKENDS

from . import busy, console, environment, measure, multiprocess, multiprocess_report, peers, report
from .cases import CASES, describe_flop_model
from .implementations import mmloss_implementation, peer_implementation
from .options import Selection, backend_reason, build_parser, choose_device, select
from .progress import Progress
from .results import Row
from .sweep import Plan, Sweep


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


def _tolerate_narrow_locales() -> None:
    """The tables use "—", "×", "≥": never crash on a narrow locale."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass


def main(argv: Optional[list] = None) -> int:
    """The command: parse the options → plan what to run → run the sweep → report (exit status)."""
    _tolerate_narrow_locales()
    parser = build_parser()
    args = parser.parse_args(argv)
    multiprocess.check_options(parser, args)
    if args.busy and (args.nproc is not None or args.from_json):
        parser.error("--busy loads the machine during a single-process sweep; not with --nproc or --from-json")
    if args.nproc is not None:
        return multiprocess.main(parser, args, command_line(argv))
    if args.from_json:
        return from_json(parser, args)
    if args.model:
        from . import model

        return model.main(parser, args)
    if args.measured or args.paths:
        parser.error("--measured and --paths go with --model")
    device = choose_device(parser, args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # events and streams of the clock follow the current device
    if args.list:
        return list_here(device)
    selection = select(parser, args, device)
    if not selection.runnable:
        for note in selection.notes:
            print(note)
        print("nothing to benchmark: none of the requested losses is in this mmloss build", file=sys.stderr)
        return 1
    return run(selection, args, device, command_line(argv))


def command_line(argv: Optional[list]) -> str:
    """``python -m mmloss.bench`` with the arguments as given (the first line of the report)."""
    given = argv if argv is not None else sys.argv[1:]
    return "python -m mmloss.bench" + (" " + shlex.join(given) if given else "")


# ----------------------------------------------------------------------------- --list, --from-json


def list_here(device: torch.device) -> int:
    """``--list``: the losses, mmloss backends and peers, and whether each can run here."""
    print(f"device: {device}")
    print("losses:")
    for case in CASES.values():
        fn = case.mmloss_function()
        state = "available" if fn is not None else f"not available in this mmloss build (mmloss.{case.mmloss_name})"
        print(f"  {case.name:<8} {case.title}: {state}")
    print("mmloss backends:")
    for name in BACKENDS:
        reason = backend_reason(name, device)
        print(f"  {name:<10} {'usable' if reason is None else reason.split('unavailable: ', 1)[-1]}")
    print("peers:")
    for name, peer in peers.PEERS.items():
        reason = peers.peer_status(name, device)
        version = peer.version()
        state = "usable" + (f" ({version})" if version else "") if reason is None else reason
        print(f"  {name:<14} {state} — {peer.how}")
    return 0


def from_json(parser, args) -> int:
    """``--from-json``: print saved results (and write --csv / --plot from them); measures nothing."""
    try:
        with open(args.from_json) as f:
            doc = json.load(f)
        rows = [Row.from_dict(r) for r in doc["results"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        parser.error(f"--from-json: cannot read {args.from_json}: {type(exc).__name__}: {exc}")
    if doc.get("meta", {}).get("nproc"):
        return _multiprocess_from_json(parser, args, doc)
    console.print_saved(args.from_json, doc, rows)
    if args.csv:
        report.CsvSink(args.csv).add(None, rows)
    if args.plot:
        from .plot import plot

        info = doc.get("meta", {}).get("environment", {})
        title = f"mmloss benchmark · {info.get('gpu', info.get('cpu', ''))}"
        plot(rows, args.plot, title, {name: c.title for name, c in CASES.items()})
        print(f"plot written to {args.plot}")
    return 0


def _multiprocess_from_json(parser, args, doc: dict) -> int:
    """``--from-json`` of a ``--nproc`` file: its tables and summary (no --plot / --csv)."""
    if args.csv or args.plot:
        parser.error("--from-json: --csv and --plot are not available for --nproc results")
    info = doc["meta"].get("environment", {})
    rows = multiprocess_report.print_saved(args.from_json, doc, print,
                                           console.environment_lines(info) if info else [])
    console.print_summary(rows, [])
    for failure in doc.get("failures") or ():
        print(f"\n── run stopped ──\n{failure}")
    return 0


# ----------------------------------------------------------------------------- a measured run


def _metadata(command: str, info: dict, selection: Selection, args) -> dict:
    """The ``meta`` block of the JSON file: command, machine, options and how each peer was loaded."""
    s = selection
    return {
        "command": command, "environment": info, "flop_model": describe_flop_model(),
        "options": {"losses": [c.name for c in s.runnable], "sizes": {c.name: s.sizes[c.name] for c in s.runnable},
                    "dims": s.dims,
                    "dtypes": [str(d).replace("torch.", "") for d in s.dtypes], "backends": s.backends,
                    "peers": s.peer_names, "repeats": args.repeats, "time_limit": s.time_limit,
                    "seed": args.seed, "busy": args.busy,
                    "logit_budgets": [b for b in s.logit_budgets if b is not None] or None},
        "implementations": {"mmloss": s.backends,
                            "peers": {n: {"version": peers.PEERS[n].version(), "loaded": peers.load_peer(n)[1],
                                          "call": peers.PEERS[n].how} for n in s.peer_names}},
        "not_run": {**{f"mmloss[{b}]": r for b, r in s.backend_missing.items()}, **s.peer_missing},
        "notes": s.notes,
    }


def _sinks(write, implementations: list, device: torch.device, args, meta: dict):
    """(the sinks the sweep hands rows to: console table, --json, --csv; the JSON sink or None)."""
    impl_width = max(len(i.label) for i in implementations + [peer_implementation("dense")]) + 1
    table = report.TableFormat(max(impl_width, len("floor (4×mm)")), device.type == "cuda")
    sinks = [report.ConsoleSink(write, table, CASES)]
    json_sink = report.JsonSink(args.json, meta) if args.json else None
    if json_sink:
        sinks.append(json_sink)
    if args.csv:
        sinks.append(report.CsvSink(args.csv))
    return sinks, json_sink


def _plot_run(rows: list, path: str, info: dict, selection: Selection) -> None:
    from .plot import plot

    title = (f"mmloss benchmark · {info.get('gpu', info['cpu'])} · "
             f"D={','.join(map(str, selection.dims))} · "
             f"{', '.join(str(d).replace('torch.', '') for d in selection.dtypes)}")
    try:
        plot(rows, path, title, {c.name: c.title for c in selection.runnable})
        print(f"plot written to {path}")
    except ValueError as exc:
        print(f"no plot: {exc}", file=sys.stderr)


def run(selection: Selection, args, device: torch.device, command: str) -> int:
    """Measures the selection: header, one table per loss as configurations finish, the summary,
    the honesty checks, then the JSON's closing fields and the plot."""
    malloc = measure.ensure_mmap_threshold() if device.type == "cpu" else "n/a (GPU allocator statistics)"
    info = environment.describe(device, malloc)
    impls = [mmloss_implementation(b, budget) for b in selection.backends for budget in selection.logit_budgets] + \
            [peer_implementation(p) for p in selection.peer_names]
    plan = Plan(device, selection.runnable, selection.sizes, selection.dims, selection.dtypes, impls,
                args.repeats, selection.time_limit, args.seed)
    # --busy: the competing processes run from before the first warm-up to after the checks.
    with busy.CompetingLoad(args.busy) as load:
        progress = Progress(len(plan.configs()), enabled=sys.stderr.isatty())
        for line in console.header_lines(command, info, malloc, selection, plan, args.repeats):
            progress.write(line)
        if args.busy:
            progress.write(f"  {'load:':<10}{load.describe()}")
        sinks, json_sink = _sinks(progress.write, impls, device, args, _metadata(command, info, selection, args))
        sweep = Sweep(plan, sinks, progress)
        try:
            rows = sweep.run()
        finally:
            progress.close()
        console.print_summary(rows, sweep.skipped)
        checks = [] if args.no_checks else console.run_checks(sweep)
    wall = sweep.elapsed()
    print(f"\nwall time {wall:.0f} s (sweep and checks) · mmloss {mmloss.__version__} · torch {torch.__version__}")
    if json_sink:
        json_sink.set("checks", checks)
        json_sink.set("wall_seconds", round(wall, 1))
    if args.plot:
        _plot_run(rows, args.plot, info, selection)
    return 0
