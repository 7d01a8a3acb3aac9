"""One result row of the sweep (``Row``): an implementation at one configuration, with its
times, peak memory, ratios and agreement check; JSON/CSV round-trips through ``to_dict`` /
``from_dict``."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from . import measure


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class Row:
    """One implementation at one configuration (times in seconds, memory in bytes)."""

    loss: str
    impl: str
    kind: str  # "floor" | "mmloss" | "peer"
    batch: int
    dim: int
    dtype: str
    device: str
    rows: int
    cols: int
    status: str = "ok"  # "ok" | "skipped" | "error"
    note: str = ""
    repeats: int = 0
    forward: Optional[measure.Stat] = None
    backward: Optional[measure.Stat] = None
    total: Optional[measure.Stat] = None
    peak_bytes: Optional[int] = None
    estimate_bytes: Optional[int] = None
    useful_flops: float = 0.0
    throughput: Optional[float] = None  # useful FLOP/s (the floor row: its own GEMM FLOP/s)
    time_over_floor: Optional[float] = None
    time_vs_dense: Optional[float] = None
    memory_vs_dense: Optional[float] = None
    check: str = ""
    loss_value: Optional[float] = None
    loss_rel_err: Optional[float] = None
    grad_rel_err: Optional[float] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("forward", "backward", "total"):
            stat = getattr(self, key)
            d.pop(key)
            for part in ("median", "min", "max"):
                d[f"{key}_ms_{part}"] = None if stat is None else getattr(stat, part) * 1e3
        d["peak_mib"] = None if self.peak_bytes is None else self.peak_bytes / 2**20
        d["estimate_mib"] = None if self.estimate_bytes is None else self.estimate_bytes / 2**20
        d.pop("peak_bytes")
        d.pop("estimate_bytes")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Row":
        d = dict(d)
        stats = {}
        for key in ("forward", "backward", "total"):
            parts = [d.pop(f"{key}_ms_{p}", None) for p in ("median", "min", "max")]
            stats[key] = None if parts[0] is None else measure.Stat(*(v / 1e3 for v in parts))
        peak = d.pop("peak_mib", None)
        estimate = d.pop("estimate_mib", None)
        names = {f.name for f in cls.__dataclass_fields__.values()}
        row = cls(**{k: v for k, v in d.items() if k in names}, **stats)
        row.peak_bytes = None if peak is None else int(peak * 2**20)
        row.estimate_bytes = None if estimate is None else int(estimate * 2**20)
        return row
