"""``python -m mmloss.bench``: the benchmark command (docs/design.md, "Benchmarks and measurement").

Modules, in the order a run uses them: ``options`` (parse the options, select what runs),
``cases`` (the losses, their inputs, dense baselines and floors), ``peers`` (adapters for
open_clip, lightly, pytorch-metric-learning, Inf-CL, memeff, siglip-kernel; ``peer_files`` loads
a peer's loss files by path), ``implementations`` (mmloss backends and peers as row sources),
``measure`` (timing, peak memory, the GEMM floor), ``sweep`` (configurations, alternation,
agreement), ``results`` (the rows), ``checks`` (the honesty checks), ``report`` (tables, JSON,
CSV), ``console`` (header and summary), ``progress`` (the progress bar), ``plot`` (PNG), ``cli``
(the command: parse → plan → run → report).

``--nproc N`` (the distributed losses across N processes): ``multiprocess`` (plan, spawn, collect),
``ranks`` (what each spawned rank runs), ``multiprocess_report`` (rows and tables), ``allocations``
(the CPU peak-memory probe from allocator events).
"""
from .cli import main

__all__ = ["main"]
