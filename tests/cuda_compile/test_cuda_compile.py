"""Compile-only checks of the CUDA backend (csrc/cuda/) without a GPU: scripts/compile_cuda.sh
compiles every kernel for sm_80 and sm_90 and the host glue with nvcc against the installed torch
(a CPU wheel is enough), then checks each CUDA kernel's C++ signature against its schema
(csrc/include/mmloss/schema.h). Nothing runs on a device: the kernels' results are checked by
``python -m mmloss.check`` on a GPU (csrc/cuda/README.md).

Skipped where nvcc is absent, unless ``MMLOSS_REQUIRE_NVCC=1`` (CI sets it: there a missing
toolkit is a failure, not a skip). Runtime: about 2 minutes on 2 busy cores, most of it the
torch headers of the host glue.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "compile_cuda.sh"


def _nvcc():
    explicit = os.environ.get("NVCC")
    if explicit:
        return explicit if shutil.which(explicit) else None
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return None


@pytest.fixture(scope="module")
def nvcc():
    path = _nvcc()
    if path is None:
        reason = "nvcc (the CUDA toolkit's compiler) is not installed: the CUDA sources cannot be compiled here"
        if os.environ.get("MMLOSS_REQUIRE_NVCC") == "1":
            pytest.fail(reason + " (MMLOSS_REQUIRE_NVCC=1)")
        pytest.skip(reason)
    return path


def _run(nvcc, *args, timeout=900):
    env = dict(os.environ, PYTHON=sys.executable, NVCC=nvcc)
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cuda_sources_compile_for_sm80_and_sm90(nvcc):
    proc = _run(nvcc)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-12000:]}"
    out = proc.stdout
    for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")) + sorted((ROOT / "csrc" / "cuda").glob("*.cpp")):
        assert f"ok      csrc/cuda/{source.name}" in out, f"{source.name} was not compiled:\n{out}"
    # ptxas reported every kernel for both architectures, and none spills to local memory
    kernels = [line.split() for line in out.splitlines() if line.startswith("  sm_")]
    archs = {k[0] for k in kernels}
    assert archs == {"sm_80", "sm_90"}, out
    assert len(kernels) >= 2 * 10, out
    spills = [k for k in kernels if "spill" in k and k[k.index("spill") + 1] != "0/0"]
    assert not spills, f"kernels spill registers: {spills}"
    assert "ok      signatures: 7 ops match" in out, out


def test_a_cuda_syntax_error_fails_the_script(nvcc, tmp_path):
    # The script must fail (and show nvcc's message) on a source that does not compile; a
    # torch-free file keeps this check to a few seconds.
    bad = tmp_path / "broken.cu"
    bad.write_text("__global__ void k(float* p) { p[threadIdx.x] = undeclared_name; }\n")
    proc = _run(nvcc, bad, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "undeclared_name" in proc.stderr and "FAILED" in proc.stderr
