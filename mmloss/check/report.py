"""The table ``python -m mmloss.check`` prints: a header and one line per ``Result``."""
from __future__ import annotations

import math

from .runner import Result

_COLUMNS = (("device", 7), ("backend", 8), ("dtype", 5), ("check", 27), ("size", 22),
            ("worst error", 11), ("bound", 9), ("ratio", 7), ("status", 6))


def header() -> str:
    return "  ".join(name.ljust(width) for name, width in _COLUMNS).rstrip()


def format_row(r: Result) -> str:
    """One table line (and, for a failure, a second line naming the failing element)."""
    if r.worst is not None:
        err, bound = f"{r.worst.error:.3g}", f"{r.worst.bound:.3g}"
        ratio = "inf" if math.isinf(r.worst.ratio) else f"{r.worst.ratio:.3f}"
    else:
        err = bound = ratio = "-"
    cells = (r.device, r.backend, r.dtype, r.check, r.size, err, bound, ratio, r.status)
    line = "  ".join(str(c).ljust(w) for c, (_, w) in zip(cells, _COLUMNS)).rstrip()
    if r.failed and r.worst is not None:
        line += f"\n    -> {r.worst.what}: {r.worst.detail}"
    elif r.note:
        line += f"  ({r.note})"
    return line
