"""Build script.

The package is pure Python today; the C++/CUDA backends in ``csrc/`` will be compiled here as
``mmloss._C`` against the *installed* torch (build without isolation), controlled by
``MMLOSS_BUILD_CUDA=auto|0|1`` — not implemented yet: the variable is read only to say so.
Metadata lives in pyproject.toml.
"""
import os
import sys

from setuptools import setup

if os.environ.get("MMLOSS_BUILD_CUDA", "").strip() not in ("", "0"):
    print("mmloss: MMLOSS_BUILD_CUDA is set, but csrc/ has no C++/CUDA backend yet; installing the "
          "pure-Python package (backends: torch, triton)", file=sys.stderr)

setup()
