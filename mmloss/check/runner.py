"""What runs here, and running every selected check on it: one ``Result`` (table row) per check,
problem, dtype, backend and device."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Optional, Sequence

import torch

import mmloss

from .._device import triton_interpreting
from .cases import CHECKS, QUICK_SIZES, SIZES, Check, Problem, large_logit_problems, run_check
from .compare import DTYPES, Comparison, worst


@dataclasses.dataclass
class Result:
    """One row of the table: a check of one backend in one dtype on one problem."""

    device: str
    backend: str
    dtype: str
    check: str
    size: str
    status: str                      # "ok" | "FAIL" | "skip"
    worst: Optional[Comparison] = None
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


# ----------------------------------------------------------------------------- what runs here


def usable_backends(device: torch.device) -> dict[str, Optional[str]]:
    """Backend name (other than "reference") → None when it runs on ``device`` tensors, else why not."""
    out = {}
    for name, reason in mmloss.available_backends().items():
        if name == "reference":
            continue
        if reason is None:
            try:
                mmloss.ops.resolve_backend(name, device)
            except RuntimeError as exc:
                reason = str(exc)
        out[name] = reason
    return out


def supported_dtypes(backend: str, device: torch.device) -> dict[str, Optional[str]]:
    """dtype name → None when ``backend`` supports it on ``device``, else why not.

    docs/design.md: fp32/fp16/bf16 everywhere, fp64 on the torch and cpu backends; the Triton
    interpreter has no bf16."""
    out = {name: None for name in ("fp32", "fp16", "bf16", "fp64")}
    if backend not in ("torch", "cpu"):
        out["fp64"] = f"the {backend} backend has no fp64 kernels (use torch or reference)"
    if backend == "triton" and device.type == "cpu" and triton_interpreting():
        out["bf16"] = "the Triton interpreter has no bf16"
    return out


def resolve_devices(choice: Optional[str]) -> list[torch.device]:
    """The devices of ``--device``: None or "all" → CPU plus CUDA when present; else that device
    (ValueError for a CUDA device without a GPU)."""
    if choice in (None, "all"):
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
        return devices
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {choice}: no CUDA GPU is available here")
    return [device]


def _fp32_precision_settings() -> list:
    """The ``matmul`` settings objects of torch's newer ``fp32_precision`` API (CUDA, oneDNN)."""
    found = []
    for backend in ("cuda", "mkldnn"):
        matmul = getattr(getattr(torch.backends, backend, None), "matmul", None)
        if matmul is not None and hasattr(matmul, "fp32_precision"):
            found.append(matmul)
    return found


@contextlib.contextmanager
def exact_fp32_matmul():
    """fp32 matmuls at full precision inside the block, the previous setting restored after.

    Works with whichever API the process uses: the legacy ``set_float32_matmul_precision``
    ("highest"), or the newer ``torch.backends.*.matmul.fp32_precision`` attributes ("ieee") —
    once the latter were written, reading the legacy setting raises in recent torch.
    """
    try:
        previous = torch.get_float32_matmul_precision()
    except RuntimeError:  # the process uses the fp32_precision API
        previous = None
    if previous is not None:
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)
        return
    settings = _fp32_precision_settings()
    saved = [m.fp32_precision for m in settings]
    for m in settings:
        m.fp32_precision = "ieee"
    try:
        yield
    finally:
        for m, value in zip(settings, saved):
            m.fp32_precision = value


def _interpreter_refuses_bf16(device: torch.device) -> Result:
    """Under TRITON_INTERPRET=1 a bf16 call on the triton backend must raise, not return garbage."""
    x = torch.randn(5, 7, dtype=torch.bfloat16, device=device)
    try:
        out = mmloss.ops.similarity_lse(x, x, 1.0, backend="triton")
    except Exception as exc:  # noqa: BLE001 - any clear error is a refusal
        return Result(str(device), "triton", "bf16", "refuses bf16 (interpreter)", "5x5x7", "ok",
                      note=f"raised {type(exc).__name__}")
    return Result(str(device), "triton", "bf16", "refuses bf16 (interpreter)", "5x5x7", "FAIL",
                  Comparison("call", math.inf, 0.0, f"returned {out[0][:3].tolist()}… instead of raising"))


# ----------------------------------------------------------------------------- running the checks


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What ``run_checks`` was asked for: named backends / dtypes (None: all usable / supported),
    the selected checks and their problems."""

    backends: Optional[Sequence[str]]
    dtypes: Optional[Sequence[str]]
    checks: Sequence[Check]
    sizes: Sequence[Problem]
    large: Sequence[Problem]


def _check_rows(plan: _Plan, device: torch.device, backend: str, dtype_name: str, emit) -> None:
    """One row per selected check and problem (large-logit problems for the checks that take them)."""
    dtype = DTYPES[dtype_name]
    for check in plan.checks:
        problems = list(plan.sizes) + (list(plan.large) if check.large else [])
        for problem in problems:
            comparisons = run_check(check, problem, backend, dtype, device)
            w = worst(comparisons)
            ok = all(c.ok for c in comparisons)
            emit(Result(str(device), backend, dtype_name, check.name,
                        problem.describe(check.square), "ok" if ok else "FAIL", w))


def _backend_rows(plan: _Plan, device: torch.device, backend: str, emit) -> None:
    """Every dtype of one usable backend: a dtype named but unsupported is a skipped row."""
    supported = supported_dtypes(backend, device)
    for dtype_name in (plan.dtypes or list(supported)):
        why_not = supported.get(dtype_name, f"unknown dtype {dtype_name!r}")
        if why_not is not None:
            if plan.dtypes:
                emit(Result(str(device), backend, dtype_name, "-", "-", "skip", note=why_not))
            continue
        _check_rows(plan, device, backend, dtype_name, emit)
    if (backend == "triton" and device.type == "cpu" and triton_interpreting()
            and (not plan.dtypes or "bf16" in plan.dtypes)):
        emit(_interpreter_refuses_bf16(device))


def _device_rows(plan: _Plan, device: torch.device, emit) -> None:
    """Every backend on one device: a backend named but unusable there is a failing row."""
    usable = usable_backends(device)
    for backend in (plan.backends or list(usable)):
        reason = usable.get(backend, f"unknown backend {backend!r}")
        if reason is not None:
            if plan.backends:  # asked for by name: it must run
                emit(Result(str(device), backend, "-", "available", "-", "FAIL",
                            Comparison("backend", math.inf, 0.0, reason)))
            continue
        _backend_rows(plan, device, backend, emit)


def run_checks(backends: Optional[Sequence[str]] = None, dtypes: Optional[Sequence[str]] = None,
               devices: Optional[Sequence[torch.device]] = None, *, quick: bool = False,
               checks: Optional[Sequence[str]] = None,
               progress: Optional[Callable[[Result], None]] = None) -> list[Result]:
    """Run the self-test; returns one ``Result`` per row, calling ``progress(row)`` as each ends.

    backends / dtypes: names to test (default: every usable backend, every dtype it supports;
    an explicitly named backend that cannot run on a device gives a failing row, an explicitly
    named dtype a backend lacks a skipped one). devices: default CPU and, when present, CUDA.
    checks: name prefixes to keep (e.g. ["lse", "clip_loss"]). quick: fewer sizes.
    """
    devices = list(devices) if devices is not None else resolve_devices(None)
    selected = [c for c in CHECKS if not checks or any(c.name.startswith(k) for k in checks)]
    plan = _Plan(backends, dtypes, selected, QUICK_SIZES if quick else SIZES, large_logit_problems(quick))
    results: list[Result] = []

    def emit(result: Result) -> None:
        results.append(result)
        if progress is not None:
            progress(result)

    with exact_fp32_matmul():
        for device in devices:
            _device_rows(plan, device, emit)
    return results
