"""Shared fixtures and settings of every test stage (tests/ and its subdirectories).

Hypothesis: the "mmloss" profile is loaded for every stage — derandomized (the same examples on
every run and machine, so a failure reproduces; hypothesis still shrinks it and prints the
minimal example), no deadline (shared 2-core machines), and
``max_examples = hypothesis_examples(25)`` (tests/oracle.py): 25 examples by default, sized so
each stage keeps its time budget; ``MMLOSS_HYPOTHESIS_EXAMPLES=<n>`` gives every hypothesis test
n examples instead (e.g. ``MMLOSS_HYPOTHESIS_EXAMPLES=2000 bash scripts/run_tests.sh`` for a
thorough run). A test that needs its own CI count uses
``@settings(max_examples=hypothesis_examples(n))``, which the variable overrides the same way.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import HealthCheck, settings  # noqa: E402

from oracle import hypothesis_examples  # noqa: E402

settings.register_profile(
    "mmloss",
    max_examples=hypothesis_examples(25),
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("mmloss")


@pytest.fixture(autouse=True)
def _exact_fp32_matmul():
    """Tests compare fp32 paths with exact fp32 products (docs/design.md: tests force "ieee")."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(prev)


@pytest.fixture
def small_chunks(monkeypatch):
    """A tiny workspace budget for chunked backends: many row chunks with a ragged last one."""
    monkeypatch.setenv("MMLOSS_CHUNK_BYTES", "1KiB")
