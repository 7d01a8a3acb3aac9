"""Compile-only checks of the triton backend's "gemm" path kernels (``mmloss/ops/triton/epilogue.py``)
for sm_90 and sm_80 (no GPU needed).

The path's host code runs on ``meta`` tensors at the issue's sizes (CLIP / SigLIP N = M = 32768,
D = 768; distillation with D_t = 1024): its launches are recorded instead of run
(``gemm_path.launch``), and every distinct epilogue, merge and finish kernel is compiled for
bf16 and fp32 inputs (the operand dtype only changes the gradient block the backward epilogues
store; fp16 compiles the same code), together with the Triton GEMM (the path's GEMM where torch
lacks an fp32-output ``mm`` for half operands) for bf16 and TF32: shared memory within the
architecture's per-block budget, no register spills, and the GEMM on tensor cores (wgmma on
sm_90, mma.sync on sm_80)."""
from __future__ import annotations

import contextlib

import pytest
import torch

import _capture as C
from mmloss.ops._spec import KLSpec
from mmloss.ops.triton import epilogue, gemm_path, gemm_path_kl

N = M = 32768
D = 768
MMA = {"sm90": "wgmma.mma_async", "sm80": "mma.sync"}


@contextlib.contextmanager
def recording():
    records: list[C.Launch] = []
    saved = (gemm_path.launch, gemm_path_kl.launch)

    def launch(kernel, grid, **kwargs):
        records.append(C.Launch(kernel, dict(kwargs), kwargs.get("num_warps", 4), 1, kernel.fn.__name__))

    gemm_path.launch = gemm_path_kl.launch = launch
    try:
        yield records
    finally:
        gemm_path.launch, gemm_path_kl.launch = saved


def _kl_spec(dtype) -> KLSpec:
    def meta(rows, dim):
        return torch.empty((rows, dim), dtype=dtype, device="meta")

    s = torch.empty((), device="meta")
    return KLSpec(meta(N, D), meta(M, D), meta(N, 1024), meta(M, 1024), s, 0.0, s, 0.0, 0, True)


def epilogue_launches(dtype) -> list[C.Launch]:
    needs = (True, True, True, True)
    meta = dict(device="meta")
    with recording() as rec:
        spec = C.meta_spec(N, M, D, dtype, scale="rows", marks="same_label", labels=True)
        _, _, rs, cs = gemm_path.similarity_lse_forward(spec, True, True)
        gemm_path.similarity_lse_backward(spec, torch.empty(N, **meta), torch.empty(M, **meta), rs, cs, needs)
        gemm_path.pairwise_sigmoid_sum(spec, needs)
        kl = _kl_spec(dtype)
        _, _, rs, cs = gemm_path_kl.similarity_kl_forward(kl, True, True, True)
        gemm_path_kl.similarity_kl_backward(kl, torch.empty(N, **meta), torch.empty(M, **meta), rs, cs,
                                            (True, True, True))
    unique = {}
    for r in rec:
        r.signature, r.constexprs, r.divisible = C._specialise(r.kernel, r.kwargs)
        unique.setdefault(r.key(), r)
    return list(unique.values())


def gemm_launches(dtype) -> list[C.Launch]:
    """The path's GEMM shapes: products (r×c over D), dx (r×D over c), dy (c×D over r; G
    transposed), accumulating into fp32."""
    r = c = 3328
    meta = dict(device="meta")
    x = torch.empty((r, D), dtype=dtype, **meta)
    g = torch.empty((r, c), dtype=dtype, **meta)
    out = []
    for a, b, acc in ((x, x.t(), False), (g, x, True), (g.t(), x, True)):
        res = torch.empty((a.shape[0], b.shape[1]), dtype=torch.float32, **meta)
        grid, kwargs = epilogue.gemm_launch(a, b, res, acc, "tf32")
        launch = C.Launch(epilogue._gemm_kernel, kwargs, kwargs["num_warps"], kwargs["num_stages"], "gemm")
        launch.signature, launch.constexprs, launch.divisible = C._specialise(launch.kernel, kwargs)
        out.append(launch)
    return out


def _check(launch: C.Launch, arch: str, expect_mma: bool):
    compiled = C.compile_launch(launch, arch)
    what = f"{launch.name} on {arch} ({launch.constexprs})"
    shared = C.shared_bytes(compiled)
    assert shared <= C.SHARED_BUDGET[arch], f"{what}: {shared} B of shared memory > {C.SHARED_BUDGET[arch]}"
    if expect_mma:
        assert MMA[arch] in compiled.asm["ptx"], f"{what}: no {MMA[arch]} in the PTX"
    usage = C.resource_usage(compiled)
    if usage:
        assert usage.get("LOCAL", 0) == 0 and usage.get("STACK", 0) == 0, f"{what}: register spills {usage}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("arch", ["sm90", "sm80"])
def test_epilogue_kernels_compile(arch, dtype):
    launches = epilogue_launches(dtype)
    names = {launch.name for launch in launches}
    assert names == {"_lse_forward_epilogue", "_merge_lse_kernel", "_finish_lse_kernel", "_lse_backward_epilogue",
                     "_sigmoid_epilogue", "_kl_forward_epilogue", "_merge_kl_kernel", "_finish_kl_kernel",
                     "_kl_backward_epilogue"}, names
    for launch in launches:
        _check(launch, arch, expect_mma=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "tf32"])
@pytest.mark.parametrize("arch", ["sm90", "sm80"])
def test_gemm_kernel_compiles(arch, dtype):
    for launch in gemm_launches(dtype):
        _check(launch, arch, expect_mma=True)
