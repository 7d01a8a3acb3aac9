"""Capture the exact kernel launches the triton backend makes for a GPU, without a GPU, and
compile them ahead of time for a given architecture.

The backend's host code runs on ``meta`` tensors with the device-dependent choices patched to a
named architecture (its tile-table row, 132 SMs, the GPU column-split alignment); every launch
is recorded instead of run. ``compile_launch`` turns a record into
``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))`` with
the same specialisation the runtime would apply (integer arguments equal to 1 become constants).
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch
import triton

from mmloss.ops import triton as backend
from mmloss.ops._spec import PairSpec
from mmloss.ops.triton import _autotune, _config, lse_forward, owner

CAPABILITY = {"sm90": 90, "sm80": 80}
SMS = 132
# Per-block shared memory a kernel may use: 228 KiB on sm_90 and 164 KiB on sm_80, minus the
# 1 KiB the hardware reserves per block.
SHARED_BUDGET = {"sm90": 228 * 1024 - 1024, "sm80": 164 * 1024 - 1024}

_TORCH_TO_TRITON = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
}


@dataclass
class Launch:
    kernel: object
    kwargs: dict
    num_warps: int
    num_stages: int
    label: str = ""
    constexprs: dict = field(default_factory=dict)
    signature: dict = field(default_factory=dict)
    divisible: list = field(default_factory=list)

    def key(self):
        return (self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__,
                tuple(sorted(self.signature.items())), tuple(sorted((k, str(v)) for k, v in self.constexprs.items())),
                self.num_warps, self.num_stages)

    @property
    def name(self) -> str:
        return self.key()[0]


def _specialise(kernel, kwargs) -> tuple[dict, dict, list]:
    """(signature, constexprs, indices of 16-divisible arguments) as the runtime would build them:
    integers equal to 1 become constants, pointers (allocations are 256-byte aligned) and
    integers divisible by 16 carry the divisibility hint that enables vectorised and
    asynchronous (cp.async / TMA) loads and hence software pipelining."""
    signature, constexprs, divisible = {}, {}, []
    for i, p in enumerate(kernel.params):
        v = kwargs[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + _TORCH_TO_TRITON[v.dtype]
            divisible.append(i)
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                signature[p.name] = "constexpr"
                constexprs[p.name] = 1
            else:
                signature[p.name] = "i32" if -(2 ** 31) <= v < 2 ** 31 else "i64"
                if v % 16 == 0:
                    divisible.append(i)
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{p.name}: cannot type {type(v).__name__}")
    return signature, constexprs, divisible


@contextlib.contextmanager
def capturing(arch: str):
    """Record launches instead of running them, with the device choices of ``arch``."""
    records: list[Launch] = []
    saved = (_autotune.launch, _autotune.launch_fixed, _config.arch_key,
             lse_forward.target_programs, owner.target_programs, lse_forward.split_align, owner.split_align)

    def launch(kernel, kind, t, grid, kwargs, atomic_target=""):
        full = dict(kwargs, BLOCK_B=t.block_b, BLOCK_K=t.block_k)
        records.append(Launch(kernel, full, t.num_warps, t.num_stages, kind))

    def launch_fixed(kernel, grid, kwargs, num_warps):
        records.append(Launch(kernel, dict(kwargs), num_warps, 1, "combine"))

    _autotune.launch, _autotune.launch_fixed = launch, launch_fixed
    _config.arch_key = lambda device: arch
    lse_forward.target_programs = owner.target_programs = lambda device, per_sm: SMS * per_sm
    lse_forward.split_align = owner.split_align = lambda device: 256
    try:
        yield records
    finally:
        (_autotune.launch, _autotune.launch_fixed, _config.arch_key, lse_forward.target_programs,
         owner.target_programs, lse_forward.split_align, owner.split_align) = saved


def meta_spec(n, m, d, dtype, *, marks="diagonal", scale="tensor", bias=True, deterministic=True,
              labels=False) -> PairSpec:
    x = torch.empty((n, d), dtype=dtype, device="meta")
    y = torch.empty((m, d), dtype=dtype, device="meta")
    if scale == "rows":
        s = torch.empty(n, dtype=torch.float32, device="meta")
    elif scale == "tensor":
        s = torch.empty((), dtype=torch.float32, device="meta")
    else:
        s = None
    b = torch.empty((), dtype=torch.float32, device="meta") if bias else None
    xl = torch.empty(n, dtype=torch.int64, device="meta") if labels else None
    yl = torch.empty(m, dtype=torch.int64, device="meta") if labels else None
    return PairSpec(x, y, s, 10.0, b, 0.0, marks, 0, xl, yl, 0, deterministic)


def production_launches(arch: str, dtype: torch.dtype, *, n=32768, m=32768, d=768) -> list[Launch]:
    """Every distinct launch of the CLIP (LSE) and SigLIP (sigmoid) paths at a production size:
    statistics + combine (both directions, and columns only), row/column owners, the atomic fast mode, the fused SigLIP pass, the
    sigmoid forward."""
    needs = (True, True, True, True)
    with capturing(arch) as rec:
        spec = meta_spec(n, m, d, dtype)
        row, col, row_stats, col_stats, kept = backend.similarity_lse_forward(spec, True, True)
        backend.similarity_lse_forward(spec, False, True)  # columns only: the swapped problem, x·yᵀ tiles
        backend.similarity_lse_backward(spec, row, col, row_stats, col_stats, kept, needs)
        fast = meta_spec(n, m, d, dtype, deterministic=False, scale="rows")
        backend.similarity_lse_backward(fast, row, col, row_stats, col_stats, kept, needs)
        sig = meta_spec(n, m, d, dtype, marks="same_label", labels=True)
        backend.pairwise_sigmoid_sum(sig, needs)
        backend.pairwise_sigmoid_forward(meta_spec(n, m, d, dtype, scale="float", bias=False))
    unique = {}
    for r in rec:
        r.signature, r.constexprs, r.divisible = _specialise(r.kernel, r.kwargs)
        unique.setdefault(r.key(), r)
    return list(unique.values())


def _ast_source(kernel, signature, constexprs, divisible):
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    try:
        return ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    except TypeError:  # Triton ≤ 3.2: ``constants`` and an AttrsDescriptor
        from triton.backends.compiler import AttrsDescriptor

        return ASTSource(kernel, signature, constants=constexprs,
                         attrs=AttrsDescriptor.from_dict({"divisibility_16": list(divisible)}))


def compile_launch(launch: Launch, arch: str):
    from triton.backends.compiler import GPUTarget

    src = _ast_source(launch.kernel, launch.signature, launch.constexprs, launch.divisible)
    target = GPUTarget("cuda", CAPABILITY[arch], 32)
    return triton.compile(src, target=target,
                          options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})


def shared_bytes(compiled) -> int:
    meta = compiled.metadata
    return int(meta.shared if hasattr(meta, "shared") else meta["shared"])


def _cuobjdump() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else ""


def resource_usage(compiled) -> dict:
    """{'REG': registers per thread, 'STACK': bytes, 'LOCAL': spill bytes, ...} from the cubin,
    or {} when Triton ships no cuobjdump."""
    tool = _cuobjdump()
    if not tool:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        name = f.name
    try:
        out = subprocess.run([tool, "--dump-resource-usage", name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(name)
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL|CONSTANT\[0\]):(\d+)", out)}
