"""Compile-only checks of the ``similarity_kl`` triton kernels for sm_90 and sm_80 (no GPU needed).

The backend's host code runs on ``meta`` tensors at a distillation-sized problem (N = M = 32768,
student D_s = 768, teacher D_t = 1024; a second, narrow problem D_s = D_t = 128; the fast mode's
atomic owner is captured whether or not ``atomic_pays`` picks it there), every launch is recorded
(``_capture``) and each kernel is
compiled with the production tile table for fp32 (TF32), fp16 and bf16: the shared memory fits
the architecture's per-block budget, the matrix products run on tensor cores (wgmma on sm_90,
mma.sync on sm_80) and nothing spills to local memory.

One variant per kernel and dtype is compiled (the cold budget of this file is ~30 s): the
cross-entropy statistics kernel (a superset of the KL one: it adds the entropy sums), the
row-owner kernel with the scale gradient (a superset of the column owner), the atomic owner,
and the combine kernel once per architecture (it merges fp32 partials whatever the inputs).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import _capture as C
from mmloss.ops import triton as backend
from mmloss.ops._spec import KLSpec
from mmloss.ops.triton import kl_backward, kl_forward

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MMA = {"sm90": "wgmma.mma_async", "sm80": "mma.sync"}
N = M = 32768


@contextlib.contextmanager
def capturing_kl(arch: str):
    """``_capture.capturing`` plus the device choices the KL modules imported by name."""
    saved = (kl_forward.target_programs, kl_forward.split_align, kl_backward.target_programs,
             kl_backward.split_align, kl_backward.atomic_pays)
    kl_forward.target_programs = kl_backward.target_programs = lambda device, per_sm: C.SMS * per_sm
    kl_forward.split_align = kl_backward.split_align = lambda device: 256
    # the fast mode's atomic owner is compiled whether or not atomic_pays (which weighs the
    # atomic traffic, issue 11) picks it at these sizes: it is chosen where D_t ≫ D_s
    kl_backward.atomic_pays = lambda student, teacher: True
    try:
        with C.capturing(arch) as records:
            yield records
    finally:
        (kl_forward.target_programs, kl_forward.split_align, kl_backward.target_programs,
         kl_backward.split_align, kl_backward.atomic_pays) = saved


def kl_meta_spec(d_s: int, d_t: int, dtype, *, deterministic=True, teacher_dtype=None) -> KLSpec:
    def meta(rows, dim, dt):
        return torch.empty((rows, dim), dtype=dt, device="meta")

    tdt = dtype if teacher_dtype is None else teacher_dtype
    scale_s = torch.empty((), dtype=torch.float32, device="meta")
    scale_t = torch.empty((), dtype=torch.float32, device="meta")
    return KLSpec(meta(N, d_s, dtype), meta(M, d_s, dtype), meta(N, d_t, tdt), meta(M, d_t, tdt),
                  scale_s, 0.0, scale_t, 0.0, 0, deterministic)


def kl_launches(arch: str, dtype, *, teacher_dtype=None) -> list[C.Launch]:
    """Every distinct launch of the KL forward (cross-entropy and KL, rows and columns) and
    backward (deterministic owners; the fast mode with atomics)."""
    needs = (True, True, True)
    with capturing_kl(arch) as records:
        for d_s, d_t in ((768, 1024), (128, 128)):
            spec = kl_meta_spec(d_s, d_t, dtype, teacher_dtype=teacher_dtype)
            for cross_entropy in (True, False):
                row, col, row_stats, col_stats = backend.similarity_kl_forward(spec, True, True, cross_entropy)
            backend.similarity_kl_backward(spec, row, col, row_stats, col_stats, needs)
            fast = kl_meta_spec(d_s, d_t, dtype, deterministic=False, teacher_dtype=teacher_dtype)
            backend.similarity_kl_backward(fast, row, col, row_stats, col_stats, needs)
    unique = {}
    for r in records:
        r.signature, r.constexprs, r.divisible = C._specialise(r.kernel, r.kwargs)
        unique.setdefault(r.key(), r)
    return list(unique.values())


def _heaviest(launches, name: str, label: str) -> C.Launch:
    """The variant of (kernel, kind) with the most work switched on."""
    found = [r for r in launches if r.name == name and r.label == label]
    assert found, f"no {name} ({label}) launch captured"

    def weight(r):
        c = r.constexprs
        return (c.get("CROSS_ENTROPY", False), c.get("NEED_DSCALE", False), c.get("HAS_B_GRAD", False),
                c.get("NUM_DV", 0), r.kwargs.get("dim", 0))

    return max(found, key=weight)


def _check(launch: C.Launch, arch: str, *, expect_mma=True):
    compiled = C.compile_launch(launch, arch)
    what = f"{launch.name} {launch.label} on {arch} ({launch.signature.get('a_ptr', '')})"
    shared = C.shared_bytes(compiled)
    assert shared <= C.SHARED_BUDGET[arch], f"{what}: {shared} B of shared memory > {C.SHARED_BUDGET[arch]}"
    if expect_mma:
        assert MMA[arch] in compiled.asm["ptx"], f"{what}: no {MMA[arch]} in the PTX"
    usage = C.resource_usage(compiled)
    if usage:
        assert usage.get("LOCAL", 0) == 0 and usage.get("STACK", 0) == 0, f"{what}: register spills {usage}"


@pytest.fixture
def tf32():
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(prev)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("arch", ["sm90", "sm80"])
def test_kl_kernels_compile(arch, dtype, tf32):
    launches = kl_launches(arch, DTYPES[dtype])
    kinds = {(r.name, r.label) for r in launches}
    assert kinds == {("_kl_stats_kernel", "kl_stats"), ("_kl_combine_kernel", "combine"),
                     ("_kl_owner_kernel", "owner"), ("_kl_owner_kernel", "atomic")}, kinds
    for name, label in sorted(kinds):
        if name == "_kl_combine_kernel" and dtype != "fp32":
            continue  # fp32 partials whatever the features: one compile per architecture
        _check(_heaviest(launches, name, label), arch, expect_mma=name != "_kl_combine_kernel")
    # the column owner (A = y_s) forms x·yᵀ tiles and transposes them in registers, so that it
    # reproduces the forward's tiles bit for bit: its own layout conversions, its own compile
    columns = [r for r in launches if r.name == "_kl_owner_kernel" and not r.constexprs["A_IS_X"]]
    assert columns, "no column-owner launch captured"
    _check(max(columns, key=lambda r: (r.constexprs["NUM_DV"], r.kwargs["dim"])), arch)


def test_kl_workspace_is_bounded_and_grids_are_persistent():
    # the column partials are (fields, programs, M) with programs ≤ the SM count: O(P·M), not
    # O(N·M / block); the teacher's D reaches the kernel as its own loop bound
    launches = kl_launches("sm90", torch.bfloat16)
    for r in launches:
        if r.name != "_kl_stats_kernel":
            continue
        fields = 6 if r.constexprs["CROSS_ENTROPY"] else 5
        part = r.kwargs["b_part_ptr"]
        assert part.shape[0] == fields and part.shape[1] <= C.SMS and part.shape[2] == M, part.shape
        assert r.kwargs["dim_t"] in (1024, 128) and r.kwargs["dim"] in (768, 128)
        assert r.constexprs["COLS"] and r.constexprs["PRECISION"] == r.constexprs["T_PRECISION"]


def test_mixed_student_teacher_dtypes_use_the_fp32_tiles(tf32):
    # a bf16 student with an fp32 teacher: both tiles fit the fp32 row of the table
    launches = kl_launches("sm90", torch.bfloat16, teacher_dtype=torch.float32)
    stats = _heaviest(launches, "_kl_stats_kernel", "kl_stats")
    assert stats.signature["a_ptr"] == "*bf16" and stats.signature["ta_ptr"] == "*fp32"
    assert stats.kwargs["BLOCK_K"] == C._config.table_tiles("sm90", torch.float32, "kl_stats").block_k
    assert stats.constexprs["T_PRECISION"] == "tf32"
    _check(stats, "sm90")
