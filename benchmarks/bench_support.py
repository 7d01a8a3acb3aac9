"""Sizes, device and helpers shared by the benchmark suites (imported by ``conftest.py`` and the
test modules; a unique module name, so ``pytest tests benchmarks`` in one process has no clash)."""
from __future__ import annotations

import os

import torch

from mmloss.bench import measure

SMOKE = os.environ.get("MMLOSS_BENCH_SMOKE", "") not in ("", "0")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if SMOKE:
    SIZES, DIM, DTYPE = (32,), 16, torch.float32
elif DEVICE.type == "cuda":
    SIZES, DIM, DTYPE = (16384, 65536), 768, torch.bfloat16
else:
    SIZES, DIM, DTYPE = (1024, 4096), 512, torch.float32

# Equivalent implementations agree tightly in fp32 and more loosely where dense peers round
# their logits to bf16.
LOSS_RTOL = 1e-3 if DTYPE == torch.float32 else 1e-2

# Freed blocks must leave the resident set for the CPU memory probe (python -m mmloss.bench
# re-executes itself with MALLOC_MMAP_THRESHOLD_; in-process we use mallopt).
MALLOC_SETTING = measure.ensure_mmap_threshold()


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
