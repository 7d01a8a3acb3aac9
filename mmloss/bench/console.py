"""What the command prints around the tables: the header of a run (command, machine, method, what
runs and what cannot), the summary after it (mmloss versus peers, what was not measured, the
honesty checks), and the same summary for saved results (``--from-json``)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from . import environment, peers, report
from .cases import CASES, describe_flop_model
from .checks import dense_memory_check, retime_check
from .implementations import mmloss_implementation
from .options import Selection
from .sweep import Plan

Write = Callable[[str], None]


def labelled(label: str, lines: Iterable[str]) -> list:
    """``lines`` indented under a 10-wide label column, the label on the first line only."""
    return [f"  {label if i == 0 else '':<10}{line}" for i, line in enumerate(lines)]


def environment_lines(info: dict) -> list:
    return [f"  {label + ':':<10}{line}"
            for label, line in zip(("stack", "device", "platform"), environment.header_lines(info))]


def _method_lines(device: torch.device, malloc: str) -> list:
    probe_text = ("torch.cuda.max_memory_allocated delta" if device.type == "cuda" else
                  f"growth of VmHWM over VmRSS (/proc/self/clear_refs; malloc: {malloc})")
    clock_text = "CUDA events" if device.type == "cuda" else "time.perf_counter, all torch threads"
    return [
        f"  {'time:':<10}{clock_text}; 1 warm-up call each, then the repeats, implementations alternated "
        "(order rotated every round)",
        f"  {'memory:':<10}peak above the inputs, gradients included = {probe_text}",
        f"  {'floor:':<10}k × torch.mm (N×D)·(D×M) into a preallocated output; k = 4 for CLIP, 3 for SigLIP, "
        "NT-Xent, SupCon",
        f"  {'FLOPs:':<10}{describe_flop_model()}",
    ]


def _implementation_lines(selection: Selection) -> list:
    backends = selection.backends
    labels = [mmloss_implementation(b, budget).label for b in backends for budget in selection.logit_budgets]
    lines = [f"  {'run:':<10}" + " · ".join(labels) if backends else
             f"  {'run:':<10}(no mmloss backend)"]
    for name in selection.peer_names:
        peer = peers.PEERS[name]
        version = peer.version()
        how = peers.load_peer(name)[1]
        where = f" · {how}" if "loaded" in how else ""
        lines.append(f"  {'':<10}{peer.label + (' ' + version if version else ''):<22} {peer.how}{where}")
    unavailable = [(f"mmloss[{b}]", r.split("unavailable: ", 1)[-1]) for b, r in selection.backend_missing.items()]
    unavailable += list(selection.peer_missing.items())
    lines += labelled("not run:", (f"{name:<22} {reason}" for name, reason in unavailable))
    lines += [f"  {'note:':<10}{note}" for note in selection.notes]
    return lines


def _sweep_lines(selection: Selection, plan: Plan, repeats_option) -> list:
    runnable, sizes = selection.runnable, selection.sizes
    all_sizes = sorted({b for c in runnable for b in sizes[c.name]})
    repeats_text = str(repeats_option) if repeats_option else "by size (" + ", ".join(
        f"B={b}: {plan.repeats_for(b)}" for b in all_sizes) + ")"
    size_text = " · ".join(f"{c.name} B {','.join(map(str, sizes[c.name]))}" for c in runnable)
    lines = [f"  {'sweep:':<10}{size_text} · D {', '.join(map(str, selection.dims))} · "
             f"{', '.join(str(d).replace('torch.', '') for d in selection.dtypes)} · repeats {repeats_text}"]
    if selection.time_limit:
        lines.append(f"  {'':<10}time limit {selection.time_limit:g} s"
                     + (" (the default sweep's; --time-limit changes it)" if selection.default_limit else ""))
    if repeats_option is not None and repeats_option < 5:
        lines.append(f"  {'note:':<10}fewer than 5 repeats (docs/design.md asks for ≥ 5): treat the medians as rough")
    return lines


def header_lines(command: str, info: dict, malloc: str, selection: Selection, plan: Plan, repeats_option) -> list:
    """Everything printed before the first table of a run."""
    device = plan.device
    return ([f"mmloss benchmark: {command}"] + environment_lines(info) + _method_lines(device, malloc)
            + _implementation_lines(selection) + _sweep_lines(selection, plan, repeats_option)
            + labelled("columns:", report.legend_lines(device.type == "cuda")))


def print_summary(rows: list, not_measured: list) -> None:
    """The mmloss-versus-peer ratios and the configurations skipped ((description, reason) pairs)."""
    versus = report.versus_lines(rows)
    if versus:
        print("\n── mmloss versus peers (time ratio = mmloss ÷ peer; below 1 is better) ──")
        for line in versus:
            print(line)
    if not_measured:
        print("\n── not measured ──")
        for config, reason in not_measured:
            print(f"{config}: {reason}")


def run_checks(sweep) -> list:
    """Runs and prints the honesty checks; their JSON records. A check that raises is reported
    as not run: a check must never take the report down."""
    checks = []
    print("\n── honesty checks ──")
    for check in (retime_check, dense_memory_check):
        try:
            result = check(sweep)
        except Exception as exc:  # noqa: BLE001
            result_text = f"{check.__name__}: could not run ({type(exc).__name__}: {exc})"
            print(result_text)
            checks.append({"name": check.__name__, "passed": None, "text": result_text})
            continue
        print(f"{result.name}: {result.text}")
        checks.append({"name": result.name, "passed": result.passed, "text": result.text, **result.details})
    return checks


def print_saved(path: str, doc: dict, rows: list) -> None:
    """The tables and summary of saved results (``--from-json``), as the run printed them."""
    meta = doc.get("meta", {})
    info = meta.get("environment", {})
    print(f"mmloss benchmark results from {path} (measured with: {meta.get('command', '?')})")
    if info:
        for line in environment_lines(info):
            print(line)
    gpu = any(r.device.startswith("cuda") for r in rows)
    for line in labelled("columns:", report.legend_lines(gpu)):
        print(line)
    report.print_tables(rows, print, gpu, CASES)
    print_summary(rows, [(item["config"], item["reason"]) for item in doc.get("skipped") or ()])
    if doc.get("checks"):
        print("\n── honesty checks ──")
        for check in doc["checks"]:
            print(f"{check['name']}: {check['text']}")
