"""The examples in their --quick mode, each in its own process (a separate CI stage: the main
suite spawns no processes). Each run asserts that training improves over the untrained model
(recall@1/5 for the dual encoder, k-NN accuracy for SimCLR) and, for the dual encoder, that
mmloss and open_clip's loss give recalls within one point. Needs scikit-learn (the
``examples`` extra); open_clip is optional (its comparison is skipped by the script)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                reason="scikit-learn is not installed (pip install 'mmloss[examples]')")


@pytest.mark.parametrize("script", ["dual_encoder_digits.py", "simclr_digits.py"])
def test_example_quick_mode_improves_over_untrained(script):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run([sys.executable, str(EXAMPLES / script), "--quick"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, f"{script} --quick failed:\n{result.stdout}\n{result.stderr}"
    print(result.stdout)
