"""Rows and tables of the multi-process bench (``--nproc``): ``RankRow`` (a ``results.Row`` with
the per-rank numbers), ``combine`` (the ranks' payloads of one configuration → rows, with the
agreement check and the ratios to open_clip) and the table the console sink and ``--from-json``
print."""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import fmean
from typing import Callable, Optional

from . import measure
from .cases import CASES
from .report import DASH, TIME_COLUMNS, TableFormat, fmt_number, fmt_ratio, fmt_stat_ms, print_tables
from .results import Row
from .sweep import Config, judge_agreement, relative_error


@dataclass
class RankRow(Row):
    """One implementation at one configuration of an N-process run. ``batch`` is B_local, ``cols``
    B_global; the times are per round the slowest rank's, ``peak_bytes`` the largest rank's peak,
    ``loss_value`` the mean over ranks of the returned values (the global loss)."""

    world_size: int = 0
    comm: str = ""  # "gloo" | "nccl"
    rank_peak_bytes: Optional[list] = None
    rank_values: Optional[list] = None
    versus: str = ""  # the peer row the ratios refer to
    time_vs_peer: Optional[float] = None
    memory_vs_peer: Optional[float] = None

    @property
    def global_batch(self) -> int:
        return self.cols

    def to_dict(self) -> dict:
        d = super().to_dict()
        peaks = d.pop("rank_peak_bytes")
        d["rank_peak_mib"] = None if peaks is None else [None if p is None else p / 2**20 for p in peaks]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RankRow":
        d = dict(d)
        peaks = d.pop("rank_peak_mib", None)
        row = super().from_dict(d)
        row.rank_peak_bytes = None if peaks is None else [None if p is None else int(p * 2**20) for p in peaks]
        return row


def _slowest_rank_stat(per_rank: list, keys: tuple) -> measure.Stat:
    """Median [min–max] over the rounds of the slowest rank's Σ ``keys`` seconds in each round."""
    rounds = len(per_rank[0][keys[0]])
    return measure.Stat.of(max(sum(r[k][i] for k in keys) for r in per_rank) for i in range(rounds))


def _merge_status(row: RankRow, per_rank: list) -> None:
    """A row is ok only when it ran on every rank; else the first rank's reason (with its rank)."""
    for rank, result in enumerate(per_rank):
        if result["status"] != "ok":
            row.status = result["status"]
            same = all(r["status"] == result["status"] and r["note"] == result["note"] for r in per_rank)
            row.note = result["note"] if same else f"rank {rank}: {result['note']}"
            return


def _fill_measurements(row: RankRow, per_rank: list) -> None:
    row.forward = _slowest_rank_stat(per_rank, ("forward",))
    row.backward = _slowest_rank_stat(per_rank, ("backward",))
    row.total = _slowest_rank_stat(per_rank, ("forward", "backward"))
    row.rank_peak_bytes = [r.get("peak") for r in per_rank]
    known = [p for p in row.rank_peak_bytes if p is not None]
    row.peak_bytes = max(known) if known else None
    row.rank_values = [r["value"] for r in per_rank]
    row.loss_value = fmean(row.rank_values)


def _check_against(row: RankRow, per_rank: list, reference: RankRow, dtype) -> None:
    if any(r.get("reference") != reference.impl for r in per_rank):
        row.check = "n/a (the ranks' references differ)"
        return
    row.loss_rel_err = relative_error(row.loss_value, reference.loss_value)
    err = sum(r["grad_sq_err"] for r in per_rank)
    ref = sum(r["grad_sq_ref"] for r in per_rank)
    row.grad_rel_err = math.inf if math.isinf(err) else math.sqrt(err) / max(math.sqrt(ref), 1e-30)
    judge_agreement(row, reference.impl, dtype)


def combine(config: Config, payloads: list, comm: str, device_text: str) -> list:
    """The rows of one configuration from every rank's payload (rank order)."""
    size, batch, dtype = len(payloads), config.batch, config.dtype
    labels = list(payloads[0]["results"])
    rows, per_label = [], {}
    for label in labels:
        per_rank = [p["results"][label] for p in payloads]
        row = RankRow(config.case.name, label, "mmloss" if label.startswith("mmloss") else "peer", batch,
                      config.dim, str(dtype).replace("torch.", ""), device_text, batch, batch * size,
                      repeats=payloads[0]["repeats"], useful_flops=6.0 * batch * batch * size * config.dim,
                      world_size=size, comm=comm)
        _merge_status(row, per_rank)
        if row.ok:
            _fill_measurements(row, per_rank)
        rows.append(row)
        per_label[label] = per_rank
    measured = [r for r in rows if r.ok]
    if measured:
        reference = measured[0]
        reference.check = "ref"
        for row in measured[1:]:
            _check_against(row, per_label[row.impl], reference, dtype)
    peer = next((r for r in measured if r.kind == "peer"), None)
    if peer is not None:
        for row in measured:
            row.versus = peer.impl
            row.time_vs_peer = row.total.median / peer.total.median
            if row.peak_bytes is not None and peer.peak_bytes:
                row.memory_vs_peer = row.peak_bytes / peer.peak_bytes
    return rows


# ----------------------------------------------------------------------------- the table


def legend_lines() -> list:
    return [
        "fwd / bwd / total ms: in each round the slowest rank's time (a barrier before every call), "
        "then median [min–max] over the rounds (fwd = the loss call, bwd = .backward())",
        "peak MiB per rank: rank 0 / rank 1 / …: most memory held during one forward+backward beyond the "
        "inputs, gradients included (untimed calls)",
        "t/peer, mem/peer: total time and largest per-rank peak ÷ those of the first open_clip row of the "
        "configuration (below 1 is better)",
        "loss: the global loss = mean over ranks of the returned values (mmloss and open_clip's ClipLoss "
        "return it on every rank; open_clip local_loss=True and SigLipLoss return rank shares)",
        "check: agreement with the row marked ref — global loss rel. error and the feature gradients' rel. "
        "norm error over all ranks ≤ 1e-3 (fp32), ≤ 1e-2 (fp16/bf16)",
    ]


class RankTableFormat(TableFormat):
    """Fixed column widths (``world_size`` peaks per row), so configurations print as they finish."""

    def __init__(self, impl_width: int, world_size: int):
        peaks_width = max(len("peak MiB per rank"), world_size * 6 + (world_size - 1) * 3)
        self.columns = [("implementation", max(impl_width, 14), "<"), ("B_local", 7, ">"), ("B_global", 8, ">"),
                        *TIME_COLUMNS, ("peak MiB per rank", peaks_width, ">"), ("t/peer", 7, ">"),
                        ("mem/peer", 8, ">"), ("loss", 9, ">")]

    def row(self, row: RankRow) -> str:
        head = [row.impl, str(row.batch), str(row.global_batch)]
        if row.status != "ok":
            return self._line(head + [DASH] * (len(self.columns) - 3), f"{row.status}: {row.note}")
        peaks = DASH if not row.rank_peak_bytes else " / ".join(
            DASH if p is None else fmt_number(p / 2**20) for p in row.rank_peak_bytes)
        cells = head + [fmt_stat_ms(row.forward), fmt_stat_ms(row.backward), fmt_stat_ms(row.total), peaks,
                        fmt_ratio(row.time_vs_peer), fmt_ratio(row.memory_vs_peer),
                        DASH if row.loss_value is None else f"{row.loss_value:.5g}"]
        tail = row.check
        if row.note:
            tail = f"{tail} ({row.note})" if tail else row.note
        return self._line(cells, tail)


def table_for(labels, world_size: int) -> RankTableFormat:
    return RankTableFormat(max([len(label) for label in labels] + [14]) + 1, world_size)


def print_saved(path: str, doc: dict, write: Callable[[str], None], environment_lines: list) -> list:
    """The tables of a saved ``--nproc`` JSON (``--from-json``); returns its rows."""
    meta = doc.get("meta", {})
    rows = [RankRow.from_dict(r) for r in doc["results"]]
    write(f"mmloss benchmark results from {path} (measured with: {meta.get('command', '?')})")
    for line in environment_lines:
        write(line)
    for i, line in enumerate(legend_lines()):
        write(f"  {'columns:' if i == 0 else '':<10}{line}")
    table = table_for([r.impl for r in rows], max([r.world_size for r in rows] + [meta.get("nproc", 2)]))
    print_tables(rows, write, False, CASES, table)
    return rows
