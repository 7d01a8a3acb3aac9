"""The command line of ``python -m mmloss.check``: options, the banner, the table and the summary.

Exit status: 0 when every check passed, 1 on a failure or when no check ran, 2 for bad options
(argparse).
"""
from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import torch

import mmloss

from .cases import CHECKS
from .compare import DTYPES
from .report import format_row, header
from .runner import Result, resolve_devices, run_checks


def _names(values: Optional[Sequence[str]]) -> Optional[list[str]]:
    if not values:
        return None
    out = []
    for v in values:
        out.extend(s.strip() for s in v.split(",") if s.strip())
    return out or None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mmloss.check",
        description="Compare every usable mmloss backend with the float64 reference on this machine.")
    parser.add_argument("--backends", action="append",
                        help="comma-separated backends (default: every usable one: torch, triton, cuda, cpu)")
    parser.add_argument("--dtypes", action="append",
                        help="comma-separated dtypes among fp32, fp16, bf16, fp64 (default: all a backend supports)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N or all (default: cpu, plus cuda when a GPU is present)")
    parser.add_argument("--checks", action="append",
                        help="comma-separated check name prefixes, e.g. lse,clip_loss (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes (tiny and ragged; L = 1e4, 1e6)")
    return parser


def _validated_options(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """(dtypes, checks, devices) of the parsed options; a bad one exits through ``parser.error``."""
    dtypes = _names(args.dtypes)
    for name in dtypes or ():
        if name not in DTYPES:
            parser.error(f"--dtypes: unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    checks = _names(args.checks)
    for prefix in checks or ():
        if not any(c.name.startswith(prefix) for c in CHECKS):
            parser.error(f"--checks: no check starts with {prefix!r} ({', '.join(c.name for c in CHECKS)})")
    try:
        devices = resolve_devices(args.device)
    except (ValueError, RuntimeError) as exc:
        parser.error(str(exc))
    return dtypes, checks, devices


def _print_banner(devices: Sequence[torch.device]) -> None:
    print(f"mmloss {mmloss.__version__}, torch {torch.__version__}; devices: "
          f"{', '.join(str(d) for d in devices)}")
    for name, reason in mmloss.available_backends().items():
        print(f"  backend {name:9s} {'usable' if reason is None else 'unavailable: ' + reason}")
    print(header(), flush=True)


def _print_summary(results: Sequence[Result], elapsed: float) -> int:
    """The closing lines (counts, then every failed row again); returns the exit status."""
    failed = [r for r in results if r.failed]
    skipped = [r for r in results if r.status == "skip"]
    ran = len(results) - len(skipped)
    if not ran:
        print("no check ran (nothing selected is usable here)")
        return 1
    print(f"\n{ran} checks, {len(failed)} failed, {len(skipped)} skipped in {elapsed:.1f} s")
    if failed:
        print("FAILED:")
        for r in failed:
            print("  " + format_row(r).replace("\n", "\n  "))
        return 1
    print("all checks passed")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point; returns the exit status (0: every check passed, 1: a failure)."""
    parser = _parser()
    args = parser.parse_args(argv)
    dtypes, checks, devices = _validated_options(parser, args)
    _print_banner(devices)
    start = time.perf_counter()
    results = run_checks(_names(args.backends), dtypes, devices, quick=args.quick, checks=checks,
                         progress=lambda r: print(format_row(r), flush=True))
    return _print_summary(results, time.perf_counter() - start)
