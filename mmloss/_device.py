"""Small device-scoped context managers shared by the layers."""
from __future__ import annotations

import contextlib
import os

import torch


def no_autocast(device: torch.device):
    """Autocast off on ``device``: code that picks its own precision (fp32 accumulation, the
    backends' inner matmuls) must not be re-cast to fp16/bf16."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def device_guard(device: torch.device):
    """Make ``device`` current for kernel launches (tensors on any CUDA device work)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to run kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
