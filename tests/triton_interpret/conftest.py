"""The Triton interpreter suite: kernels run on CPU tensors with numpy (docs/design.md, "Testing rules").

TRITON_INTERPRET=1 must be in the environment before Python imports triton (scripts/run_tests.sh
runs this directory in its own pytest process with it set): the kernels are compiled or
interpreted at import time, so setting it here would be too late. Fail loudly otherwise.
"""
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    raise pytest.UsageError(
        "tests/triton_interpret must run with TRITON_INTERPRET=1 set before Python starts, e.g. "
        "`TRITON_INTERPRET=1 python -m pytest tests/triton_interpret` (scripts/run_tests.sh does this)"
    )
