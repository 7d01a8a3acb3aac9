"""``python -m mmloss.bench``: the benchmark command (docs/design.md, "Benchmarks and measurement").

Modules: ``cases`` (the losses, their inputs, dense baselines and floors), ``peers`` (adapters for
open_clip, lightly, pytorch-metric-learning, Inf-CL, memeff, siglip-kernel), ``measure`` (timing,
peak memory, the GEMM floor), ``sweep`` (configurations, alternation, agreement and honesty
checks), ``report`` (tables, JSON, CSV), ``plot`` (PNG), ``cli`` (options and the default sweep).
"""
from .cli import main

__all__ = ["main"]
