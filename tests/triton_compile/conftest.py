"""Compile-only checks of the triton kernels for sm_90 and sm_80 (no GPU needed).

They need the real compiler: TRITON_INTERPRET must be unset (scripts/run_tests.sh runs this
directory in its own pytest process with it removed from the environment).
"""
import os
import sys

import pytest

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise pytest.UsageError(
        "tests/triton_compile must run without TRITON_INTERPRET (the interpreter replaces the "
        "compiler): `env -u TRITON_INTERPRET python -m pytest tests/triton_compile`"
    )

sys.path.insert(0, os.path.dirname(__file__))
# Triton 3.9 warns while this knob is unset; 1 keeps the compiler's (and older Tritons') default.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
