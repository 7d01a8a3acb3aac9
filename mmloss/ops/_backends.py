"""Backend registry and per-call dispatch (docs/design.md, "Backends").

``backend="auto"`` picks per call from the device of the inputs: CUDA tensors → ``triton``
(``torch`` where Triton does not work, and for fp64 inputs), CPU tensors → ``cpu`` when
``mmloss._C`` is built, else ``torch``. ``MMLOSS_BACKEND`` replaces what "auto" picks; an explicit ``backend=`` always wins;
an unavailable backend raises ``RuntimeError`` with the reason.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from .._device import triton_interpreting

BACKENDS = ("reference", "torch", "triton", "cuda", "cpu")
BACKEND_CHOICES = ("auto",) + BACKENDS  # what a ``backend=`` argument accepts


def deterministic_default() -> bool:
    """What ``deterministic=None`` means: True unless ``MMLOSS_DETERMINISTIC=0``."""
    return os.environ.get("MMLOSS_DETERMINISTIC", "1").strip().lower() not in ("0", "false", "no", "off")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    try:
        from . import triton as _kernels  # noqa: F401
    except Exception as exc:  # pragma: no cover
        return f"the mmloss triton kernels failed to load ({type(exc).__name__}: {exc})"
    return None


def _extension_error() -> Optional[str]:
    """None when ``mmloss._C`` (the compiled ``cpu`` backend) is importable, else why not."""
    from .. import _extension

    return _extension.extension_error()


def _cuda_extension_error() -> Optional[str]:
    """None when the compiled ``cuda`` backend may run, else why not (not built, or no GPU
    self-check recorded for it: csrc/cuda/README.md)."""
    from .. import _extension

    return _extension.cuda_error()


def triton_unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """None when the triton backend can run on ``device`` (or on some device, if None)."""
    err = _triton_import_error()
    if err is not None:
        return err
    if device is None:
        if triton_interpreting() or torch.cuda.is_available():
            return None
        return "no CUDA GPU is available (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
    if device.type == "cuda":
        if triton_interpreting():
            return "TRITON_INTERPRET=1 is set: the interpreter runs kernels on CPU tensors only"
        return None
    if device.type == "cpu" and triton_interpreting():
        return None
    return (
        f"triton kernels run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), "
        f"not on {device.type} tensors"
    )


def _reason(name: str, device: Optional[torch.device]) -> Optional[str]:
    if name in ("reference", "torch"):
        return None
    if name == "triton":
        return triton_unavailable_reason(device)
    if name in ("cuda", "cpu"):
        err = _extension_error() if name == "cpu" else _cuda_extension_error()
        if err is not None:
            return err
        if device is not None and device.type != name:
            return f"the {name} backend runs on {name.upper()} tensors, not on {device.type} tensors"
        return None
    raise AssertionError(name)


def available_backends() -> dict[str, Optional[str]]:
    """Backend name → None when usable on this machine, else a one-line reason."""
    return {name: _reason(name, None) for name in BACKENDS}


def _auto(device: torch.device, dtype: Optional[torch.dtype]) -> str:
    env = os.environ.get("MMLOSS_BACKEND", "").strip()
    if env and env != "auto":
        if env not in BACKENDS:
            raise ValueError(f"MMLOSS_BACKEND must be one of {list(BACKEND_CHOICES)}, got {env!r}")
        return env
    if device.type == "cuda":
        if dtype == torch.float64:
            return "torch"  # the Triton kernels are fp32/fp16/bf16; fp64 is for gradcheck
        return "triton" if triton_unavailable_reason(device) is None else "torch"
    if device.type == "cpu" and _reason("cpu", device) is None:  # pragma: no cover - needs _C
        return "cpu"
    return "torch"


def resolve_backend(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """The concrete backend for one call on tensors of ``device`` (and ``dtype``); raises if unusable.

    Under ``torch.compile`` the answer is a trace-time constant (it depends only on the
    environment and static device metadata).
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {list(BACKEND_CHOICES)}, got {backend!r}")
    return _resolve(backend, device, dtype)


@torch.compiler.assume_constant_result
def _resolve(backend: str, device: torch.device, dtype: Optional[torch.dtype]) -> str:
    name = _auto(device, dtype) if backend == "auto" else backend
    reason = _reason(name, device)
    if reason is not None:
        how = "MMLOSS_BACKEND selects" if backend == "auto" else "requested"
        raise RuntimeError(f"mmloss backend {name!r} ({how}) is unavailable: {reason}")
    return name
