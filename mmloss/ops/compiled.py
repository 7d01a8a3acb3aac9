"""Python-side helpers of the compiled backends ``cpu`` and ``cuda`` (csrc/, ``mmloss._C``).

Their ops are ``mmloss_C::<name>`` and ``Primitive.__call__`` routes to them directly (autograd is
C++). What remains in Python is what works on their saved statistics, which use the ``torch``
backend's format (``[shift, sum]`` per row / column): merging two records and turning a record
into a log-sum-exp, e.g. for the ring over ranks (mmloss/ring.py).
"""
from __future__ import annotations

from .torch_chunked import lse_from_stats, merge_lse_stats

__all__ = ["lse_from_stats", "merge_lse_stats"]
