"""Every triton kernel, for fp32 (TF32 and exact), fp16 and bf16, compiled for sm_90 and sm_80
with the production tile table, at the shapes of the issue's CLIP / SigLIP targets (N = M =
32768, D = 768): the shared memory fits the architecture's per-block budget, the matrix products
run on tensor cores (wgmma on sm_90, mma.sync on sm_80) and nothing spills to local memory.
"""
import pytest
import torch

import _capture as C

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MMA = {"sm90": "wgmma.mma_async", "sm80": "mma.sync"}


def _check(launch, arch, *, expect_mma=True, allow_spills=False):
    compiled = C.compile_launch(launch, arch)
    what = f"{launch.name} {launch.label} on {arch} ({launch.signature['a_ptr'] if 'a_ptr' in launch.signature else ''})"
    shared = C.shared_bytes(compiled)
    assert shared <= C.SHARED_BUDGET[arch], f"{what}: {shared} B of shared memory > {C.SHARED_BUDGET[arch]}"
    ptx = compiled.asm["ptx"]
    if expect_mma:
        assert MMA[arch] in ptx, f"{what}: no {MMA[arch]} in the PTX (matrix products off the tensor cores)"
    usage = C.resource_usage(compiled)
    if usage and not allow_spills:
        assert usage.get("LOCAL", 0) == 0 and usage.get("STACK", 0) == 0, f"{what}: register spills {usage}"
    return compiled


@pytest.fixture
def tf32():
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(prev)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("arch", ["sm90", "sm80"])
def test_production_kernels(arch, dtype, tf32):
    launches = C.production_launches(arch, DTYPES[dtype])
    names = {launch.name for launch in launches}
    assert names == {"_lse_stats_kernel", "_lse_combine_kernel", "_owner_kernel"}, names
    for launch in launches:
        # the combine kernel merges fp32 partials: no matrix product in it
        _check(launch, arch, expect_mma=launch.name != "_lse_combine_kernel")


def test_exact_fp32_compiles(monkeypatch):
    # torch's default "highest" precision: fp32 tiles multiply exactly (input_precision="ieee"),
    # i.e. with FMA instead of TF32 tensor cores; it must still compile within the budget. Under
    # MMLOSS_TRITON_PATH=auto such calls take the gemm path on a GPU (the fused owners spill:
    # test_no_spills.py checks the routing), so the fused kernels are asked for explicitly.
    monkeypatch.setenv("MMLOSS_TRITON_PATH", "fused")
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        launches = C.production_launches("sm90", torch.float32)
    finally:
        torch.set_float32_matmul_precision(prev)
    stats = [launch for launch in launches if launch.name == "_lse_stats_kernel"]
    assert stats and stats[0].constexprs["PRECISION"] == "ieee"
    # (the FMA product of a 128×64 tile spills a few registers; this path is for accuracy tests)
    compiled = _check(stats[0], "sm90", expect_mma=False, allow_spills=True)
    assert "wgmma" not in compiled.asm["ptx"]
