"""``bash benchmarks/gpu/run.sh --dry-run``: every section is planned, each limit comes from the
compile counts the code gives now (``compile_counts.py``), the 1M-row section gets ≥ 100 s, and
all limits together fit the 9-minute budget of one GPU loan."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ["wheels", "model", "tests", "kernels", "clip", "siglip", "clip1m", "compare"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture(scope="module")
def plan():
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    for key in [k for k in env if k.startswith("T_") or k in ("SEC_PER_COMPILE", "WORKERS", "TEST_PAR")]:
        env.pop(key)
    out = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--dry-run", "--out", "/tmp/mmloss-dry"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _limits(text):
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^=== (\w+) \(limit (\d+)s\)", text, re.M)}


def test_every_section_has_a_limit_within_nine_minutes(plan):
    limits = _limits(plan)
    assert list(limits) == SECTIONS
    assert sum(limits.values()) <= 540, limits
    assert limits["clip1m"] >= 100
    assert f"total {sum(limits.values())}s (budget 540s)" in plan


def test_limits_come_from_the_counted_compiles(plan):
    assert "compile counts: compile_counts.py" in plan   # counted, not the fallback defaults
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "gpu"))
    import compile_counts

    counts = compile_counts.counts("h200")
    per = int(re.search(r"compiles x (\d+)s", plan).group(1))
    limits = _limits(plan)
    for name in ("tests", "kernels", "clip", "siglip", "clip1m"):
        m = re.search(rf"^  {name}\s+(\d+) \+ (\d+) x {per}(?: / (\d+))? = (\d+)s$", plan, re.M)
        assert m, name
        base, compiles, par, total = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1), int(m.group(4))
        assert compiles == counts[name]
        assert total == base + -(-compiles * per // par) == limits[name]
    # the fallback defaults in run.sh are the counts of today's code
    script = open(os.path.join(ROOT, "benchmarks", "gpu", "run.sh")).read()
    for name, n in counts.items():
        assert f"COMPILES_{name.upper()}={n}\n" in script, (name, n)


def test_pytest_is_interrupted_not_killed(plan):
    script = open(os.path.join(ROOT, "benchmarks", "gpu", "run.sh")).read()
    assert 'timeout -s INT --kill-after=15 "$limit"' in script
    tests_line = next(line for line in plan.splitlines() if line.startswith("=== tests"))
    assert "--junitxml=" in tests_line
    if "-n " in tests_line:
        assert "--dist loadgroup" in tests_line   # no kernel compiled by two workers
    kernels_line = next(line for line in plan.splitlines() if line.startswith("=== kernels"))
    assert "for p in fused gemm" in kernels_line and "MMLOSS_TRITON_PATH=$p" in kernels_line
