"""Tables (console), JSON and CSV output of the sweep; each written as configurations finish.

The console table has one block per (loss, dtype, D) and one row per implementation and batch:
forward / backward / total time as median [min–max] in ms, peak memory above the inputs in MiB,
time over the floor, useful throughput, the ratios to the dense baseline (time and memory; below
1 is better) and the agreement check against the reference implementation.
The JSON file is rewritten (atomically) after every configuration, and the CSV gets its rows
appended, so a run that is killed keeps what it had measured.
"""
from __future__ import annotations

import csv
import json
import os
import tempfile
from typing import Callable, Optional

from .results import Row

DASH = "—"


def fmt_number(value: Optional[float]) -> str:
    """Three significant digits, no exponent for the ranges a benchmark produces."""
    if value is None:
        return DASH
    a = abs(value)
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_stat_ms(stat) -> str:
    if stat is None:
        return DASH
    return f"{fmt_number(stat.median * 1e3)} [{fmt_number(stat.min * 1e3)}–{fmt_number(stat.max * 1e3)}]"


def fmt_ratio(value: Optional[float]) -> str:
    return DASH if value is None else f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


# (title, width, alignment) of the time columns, shared by the single- and multi-process tables.
TIME_COLUMNS = [("fwd ms med [min–max]", 22, ">"), ("bwd ms med [min–max]", 22, ">"),
                ("total ms med [min–max]", 23, ">")]


class TableFormat:
    """Fixed column widths, so rows can be printed one configuration at a time and still align."""

    def __init__(self, impl_width: int, gpu: bool):
        self.gpu = gpu
        self.flops_unit, self.flops_scale = ("TFLOP/s", 1e12) if gpu else ("GFLOP/s", 1e9)
        self.columns = [
            ("implementation", max(impl_width, 14), "<"),
            ("B", 6, ">"),
            *TIME_COLUMNS,
            ("peak MiB", 9, ">"),
            ("×floor", 7, ">"),
            (self.flops_unit, 8, ">"),
            ("t/dense", 8, ">"),
            ("mem/dense", 9, ">"),
        ]

    def _line(self, cells, tail: str) -> str:
        parts = [f"{cell:{align}{width}}" for cell, (_, width, align) in zip(cells, self.columns)]
        return "  ".join(parts) + ("  " + tail if tail else "")

    def header(self) -> str:
        return self._line([name for name, _, _ in self.columns], "check")

    def row(self, row: Row) -> str:
        if row.status != "ok":
            cells = [row.impl, str(row.batch)] + [DASH] * (len(self.columns) - 2)
            return self._line(cells, f"{row.status}: {row.note}")
        peak = None if row.peak_bytes is None else row.peak_bytes / 2**20
        flops = None if row.throughput is None else row.throughput / self.flops_scale
        cells = [
            row.impl, str(row.batch),
            fmt_stat_ms(row.forward) if row.kind != "floor" else DASH,
            fmt_stat_ms(row.backward) if row.kind != "floor" else DASH,
            fmt_stat_ms(row.total),
            fmt_number(peak) if row.kind != "floor" else DASH,
            fmt_ratio(row.time_over_floor),
            fmt_number(flops),
            fmt_ratio(row.time_vs_dense),
            fmt_ratio(row.memory_vs_dense),
        ]
        tail = row.check
        if row.note:
            tail = f"{tail} ({row.note})" if tail else row.note
        return self._line(cells, tail)


def group_title(case, dtype: str, dim: int, device: str) -> str:
    return f"── {case.title} · D={dim} · {dtype} · {device} ──"


def legend_lines(gpu: bool) -> list:
    unit = "TFLOP/s" if gpu else "GFLOP/s"
    return [
        "fwd / bwd / total ms: median [min–max] over the repeats (fwd = the loss call, bwd = .backward())",
        "peak MiB: most memory held during one forward+backward beyond what was held before it",
        f"×floor: total ÷ the floor's total · {unit}: useful FLOPs ÷ total (floor row: its own GEMM rate)",
        "t/dense, mem/dense: ratio to the dense baseline's time and peak memory (below 1 is better)",
        "check: agreement with the row marked ref — loss rel. error and gradient rel. norm error ≤ 1e-3 "
        "(fp32), ≤ 1e-2 (fp16/bf16: peers return bf16 losses)",
    ]


class ConsoleSink:
    """Prints each configuration's rows as soon as they are measured."""

    def __init__(self, write: Callable[[str], None], table: TableFormat, cases: dict):
        self.write = write
        self.table = table
        self.cases = cases
        self.group = None

    def start(self, sweep) -> None:
        """Nothing to write before the first result."""

    def add(self, config, rows) -> None:
        key = (config.case.name, rows[0].dtype, config.dim)
        if key != self.group:
            self.group = key
            self.write("")
            self.write(group_title(config.case, rows[0].dtype, config.dim, rows[0].device))
            if config.case.note:
                self.write(f"   note: {config.case.note}")
            self.write(self.table.header())
        for row in rows:
            self.write(self.table.row(row))

    def finish(self, sweep) -> None:
        """Every row was written as it was measured."""


def print_tables(rows, write: Callable[[str], None], gpu: bool, cases: dict, table=None) -> None:
    """The per-loss tables for saved rows (``--from-json``), in the order they were measured
    (``table``: the format, by default the single-process one)."""
    if table is None:
        table = TableFormat(max([len(r.impl) for r in rows] + [14]) + 1, gpu)
    group = None
    for row in rows:
        key = (row.loss, row.dtype, row.dim)
        if key != group:
            group = key
            case = cases[row.loss]
            write("")
            write(group_title(case, row.dtype, row.dim, row.device))
            if case.note:
                write(f"   note: {case.note}")
            write(table.header())
        write(table.row(row))


def _atomic_write(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".mmloss-bench-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class JsonSink:
    """{"meta": …, "results": [rows…], "skipped": […], "checks": […]}, rewritten after each configuration."""

    def __init__(self, path: str, meta: dict):
        self.path = path
        self.sweep = None
        self.document = {"meta": meta, "results": [], "skipped": [], "checks": []}
        self._flush()

    def _flush(self) -> None:
        _atomic_write(self.path, json.dumps(self.document, indent=1, default=str) + "\n")

    def start(self, sweep) -> None:
        self.sweep = sweep

    def add(self, config, rows) -> None:
        self.document["results"].extend(r.to_dict() for r in rows)
        self.document["skipped"] = [{"config": c, "reason": why} for c, why in self.sweep.skipped]
        self.document["wall_seconds"] = round(self.sweep.elapsed(), 1)
        self._flush()

    def finish(self, sweep) -> None:
        self.document["skipped"] = [{"config": c, "reason": why} for c, why in sweep.skipped]
        self.document["wall_seconds"] = round(sweep.elapsed(), 1)
        self._flush()

    def set(self, key: str, value) -> None:
        self.document[key] = value
        self._flush()


class CsvSink:
    """One line per (configuration, implementation), appended as measured (long format)."""

    def __init__(self, path: str):
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self.fields = list(Row("", "", "", 0, 0, "", "", 0, 0).to_dict())
        with open(path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writeheader()

    def start(self, sweep) -> None:
        """Nothing to write before the first result."""

    def add(self, config, rows) -> None:
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            for row in rows:
                writer.writerow(row.to_dict())
            f.flush()

    def finish(self, sweep) -> None:
        """Every row was written as it was measured."""


def versus_lines(rows) -> list:
    """Each mmloss backend against each peer at each configuration: time ratio and memory share."""
    lines = []
    groups = {}
    for row in rows:
        groups.setdefault((row.loss, row.dtype, row.dim, row.batch), []).append(row)
    for (loss, dtype, dim, batch), group in groups.items():
        ours = [r for r in group if r.kind == "mmloss" and r.ok and r.total is not None]
        theirs = [r for r in group if r.kind == "peer" and r.ok and r.total is not None]
        for m in ours:
            for p in theirs:
                time_ratio = m.total.median / p.total.median
                if m.peak_bytes is not None and p.peak_bytes:
                    memory = f"peak memory {100.0 * m.peak_bytes / p.peak_bytes:.1f}% of {p.impl}'s"
                else:
                    memory = "peak memory n/a"
                floor = f"  ({m.impl} time/floor {m.time_over_floor:.2f})" if m.time_over_floor else ""
                check = "" if p.check in ("ok", "ref") else f" [{p.impl}: {p.check}]"
                lines.append(f"{loss:<7} B={batch:<6} D={dim} {dtype:<8}  {m.impl} vs {p.impl}: "
                             f"time {time_ratio:.2f}×  {memory}{floor}{check}")
    return lines
