import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _exact_fp32_matmul():
    """Tests compare fp32 paths with exact fp32 products (DESIGN.md: tests force "ieee")."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(prev)


@pytest.fixture
def small_chunks(monkeypatch):
    """A tiny workspace budget for chunked backends: many row chunks with a ragged last one."""
    monkeypatch.setenv("MMLOSS_CHUNK_BYTES", "1KiB")
