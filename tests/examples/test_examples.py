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

_NEEDS_SKLEARN = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                reason="scikit-learn is not installed (pip install 'mmloss[examples]')")


@_NEEDS_SKLEARN
@pytest.mark.parametrize("script", ["dual_encoder_digits.py", "simclr_digits.py"])
def test_example_quick_mode_improves_over_untrained(script):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run([sys.executable, str(EXAMPLES / script), "--quick"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, f"{script} --quick failed:\n{result.stdout}\n{result.stderr}"
    print(result.stdout)


@pytest.mark.parametrize("nproc, extra", [(2, []), (3, ["--ring", "--batch", "50"])], ids=["gather-2", "ring-3"])
def test_ddp_example_matches_single_process(nproc, extra):
    """examples/ddp_clip.py under torchrun (gloo): DDP training with ClipLoss ends with the
    parameters of single-process training on the concatenated batches (--check asserts it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(EXAMPLES / "ddp_clip.py"), "--check", "--steps", "5", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, f"torchrun ddp_clip.py failed:\n{result.stdout}\n{result.stderr}"
    assert "parameters match single-process training" in result.stdout
