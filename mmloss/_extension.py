"""The compiled extension ``mmloss._C`` (csrc/): whether it is here, and why not.

``mmloss._C`` is built ahead of time by setup.py against the installed torch (see csrc/README.md;
``pip install --no-build-isolation -e .``, ``MMLOSS_BUILD_CPP`` / ``MMLOSS_BUILD_CUDA`` =
auto|0|1). Importing it registers the ``mmloss_C::*`` ops (the ``cpu`` backend, and the ``cuda``
backend when its CUDA part was compiled). Nothing here imports it at ``import mmloss`` time; the
first question about a compiled backend does, once.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Optional

_HOW = "install with `pip install --no-build-isolation -e .` on a machine with a C++ compiler (csrc/README.md)"


@functools.lru_cache(maxsize=None)
def _load() -> tuple[Optional[ModuleType], Optional[str]]:
    import torch  # noqa: F401  (the extension links against the already loaded torch libraries)

    try:
        module = importlib.import_module("mmloss._C")
    except ModuleNotFoundError as exc:
        if exc.name not in ("mmloss._C", "mmloss"):
            return None, f"the C++ extension mmloss._C failed to import ({exc})"
        return None, f"the C++ extension mmloss._C is not built in this installation ({_HOW})"
    except Exception as exc:  # e.g. built against another torch: undefined symbols
        text = " ".join(str(exc).split())
        return None, (f"the C++ extension mmloss._C failed to load ({type(exc).__name__}: {text[:300]}); "
                      f"rebuild it against the installed torch ({_HOW})")
    return module, None


def load() -> ModuleType:
    """The extension module; raises RuntimeError with the reason when it is not available."""
    module, err = _load()
    if module is None:
        raise RuntimeError(err)
    return module


def extension_error() -> Optional[str]:
    """None when ``mmloss._C`` imports (its ops registered), else a one-line reason."""
    return _load()[1]


def build_info() -> dict:
    """What ``mmloss._C`` was built with ({} when it is not built): compiler, torch (the version
    built against), cuda (whether the CUDA part is in), cpu_isa (the CPU epilogue instruction set
    in use: avx512, avx2 or default; ``MMLOSS_CPU_ISA`` forces one), cpu_isas_built, op_namespace."""
    module, _ = _load()
    if module is None:
        return {}
    info = getattr(module, "build_info", None)
    return dict(info()) if callable(info) else {}


def cuda_error() -> Optional[str]:
    """None when the compiled ``cuda`` backend may run, else a one-line reason."""
    err = extension_error()
    if err is not None:
        return err
    if not build_info().get("cuda", False):
        return "mmloss._C was built without its CUDA part (MMLOSS_BUILD_CUDA, csrc/README.md)"
    return ("the cuda backend has not passed a GPU run of `python -m mmloss.check` yet "
            "(csrc/cuda/README.md says how to record one)")
