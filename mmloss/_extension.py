"""The compiled extension ``mmloss._C`` (csrc/): whether it is here, and why not.

``mmloss._C`` is built ahead of time by setup.py against the installed torch (see csrc/README.md).
Importing it registers the ``mmloss_C::*`` ops (the ``cpu`` backend, and the ``cuda`` backend
when its CUDA part was compiled). Nothing here imports it at ``import mmloss`` time; the first
question about a compiled backend does, once.
"""
from __future__ import annotations

import functools
import importlib
from typing import Optional


@functools.lru_cache(maxsize=None)
def extension_error() -> Optional[str]:
    """None when ``mmloss._C`` imports, else a one-line reason."""
    try:
        importlib.import_module("mmloss._C")
    except ImportError as exc:
        return (f"the C++ extension mmloss._C is not built in this installation ({exc}); install with "
                "`pip install --no-build-isolation -e .` on a machine with a C++ compiler (csrc/README.md)")
    except Exception as exc:  # pragma: no cover - a broken build
        return f"the C++ extension mmloss._C failed to load ({type(exc).__name__}: {exc})"
    return None


def build_info() -> dict:
    """What ``mmloss._C`` was built with ({} when it is not built)."""
    if extension_error() is not None:
        return {}
    module = importlib.import_module("mmloss._C")
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
