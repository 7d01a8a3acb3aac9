"""The torch.compile stage: every test that runs ``torch.compile`` (dynamo, AOTAutograd,
inductor) or ``torch.library.opcheck``'s AOT-dispatch checks lives here, out of the main suite.

scripts/run_tests.sh runs this directory in its own pytest process with TRITON_INTERPRET removed
from the environment: the interpreter would replace inductor's Triton code generation, and the
main suite stays free of compiles (its time budget on 2 cores assumes none). Budget: ≤ 4 min on
the 2-core reference machine (README, "Tests").

Every test starts and ends with a fresh dynamo state (``torch.compiler.reset()``), so compile and
recompile counts of one test never depend on what an earlier test traced.

tests/conftest.py (the parent) still applies: tests/ on sys.path (oracle, helpers), exact fp32
matmuls, the hypothesis profile.
"""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise pytest.UsageError(
        "tests/compile must run without TRITON_INTERPRET (the interpreter replaces inductor's "
        "Triton code generation): `env -u TRITON_INTERPRET python -m pytest tests/compile`"
    )


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """A clean dynamo cache around each test (compile counts start from zero)."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()
