"""Markdown for the README from saved results of ``python -m mmloss.bench --json``.

    python benchmarks/results/headline.py benchmarks/results/cpu/default.json [more.json ...]

prints, per results file, the headline table (for each loss, every implementation at the largest
batch where mmloss and a peer were both measured: time, peak memory, time over the floor, and
how mmloss compares) and, at the end, the version/compatibility matrix of every file given.
"""
from __future__ import annotations

import json
import sys

from mmloss.bench.cases import CASES
from mmloss.bench.sweep import Row


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}g}" if value < 1000 else f"{value:.0f}"


def headline(path: str) -> list:
    doc = json.load(open(path))
    rows = [Row.from_dict(r) for r in doc["results"]]
    env = doc["meta"]["environment"]
    device = env.get("gpu") or f"{env['cpu']} ({env['cpu_count']} logical CPUs, {env['torch_threads']} threads)"
    lines = [f"Measured on {device}, torch {env['torch']}, with `{doc['meta']['command']}`; "
             f"full table: `{path.replace('.json', '.txt')}`.", ""]
    for loss in dict.fromkeys(r.loss for r in rows):
        ok = [r for r in rows if r.loss == loss and r.ok and r.total is not None]
        both = [b for b in sorted({r.batch for r in ok}, reverse=True)
                if any(r.kind == "mmloss" for r in ok if r.batch == b)
                and any(r.kind == "peer" for r in ok if r.batch == b)]
        if not both:
            continue
        batch = both[0]
        group = [r for r in rows if r.loss == loss and r.batch == batch]
        ours = next(r for r in group if r.kind == "mmloss" and r.ok and r.total is not None)
        lines.append(f"**{CASES[loss].title}**, B = {batch}, D = {ours.dim}, {ours.dtype}:")
        lines.append("")
        lines.append(f"| implementation | time fwd+bwd (ms) | peak memory (MiB) | × floor | time ÷ {ours.impl} "
                     f"| memory ÷ {ours.impl} |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for r in group:
            if r.kind == "floor":
                continue
            if not r.ok or r.total is None:
                lines.append(f"| {r.impl} | {r.status}: {r.note} | | | | |")
                continue
            peak = None if r.peak_bytes is None else r.peak_bytes / 2**20
            t_ratio = r.total.median / ours.total.median
            m_ratio = (r.peak_bytes / ours.peak_bytes) if (r.peak_bytes and ours.peak_bytes) else None
            lines.append(f"| {r.impl} | {_fmt(r.total.median * 1e3)} | {_fmt(peak)} | {_fmt(r.time_over_floor)} "
                         f"| {_fmt(t_ratio)}× | {_fmt(m_ratio)}× |")
        lines.append("")
    return lines


def matrix(paths) -> list:
    lines = ["| device | Python | torch | Triton | CUDA | mmloss backends measured | results |",
             "|---|---|---|---|---|---|---|"]
    for path in paths:
        doc = json.load(open(path))
        env = doc["meta"]["environment"]
        device = env.get("gpu") or f"CPU: {env['cpu']}"
        backends = ", ".join(doc["meta"]["implementations"]["mmloss"]) or "—"
        lines.append(f"| {device} | {env['python']} | {env['torch']} | {env['triton'] or '—'} | "
                     f"{env['cuda'] or '—'} | {backends} | `{path}` |")
    return lines


def main(paths) -> int:
    if not paths:
        print(__doc__)
        return 2
    for path in paths:
        print("\n".join(headline(path)))
    print("\n".join(matrix(paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
