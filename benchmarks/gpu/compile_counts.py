"""How many Triton kernels each section of ``run.sh`` compiles from a cold cache, counted without
a GPU: the section's calls are replayed at the backend level on ``meta`` tensors with the GPU's
device choices (``mmloss.bench.model.modelled_device``: tile-table row, SM count) while every
launch is recorded instead of run, and distinct specialisations are counted as Triton's JIT
cache keys them (kernel, constexprs, tiles, warps, stages, argument dtypes, integers equal to 1,
integers divisible by 16). A section counts only kernels no earlier section compiled (the
on-disk cache is shared).

    python benchmarks/gpu/compile_counts.py [--device h200] [--shell]

``--shell`` prints ``COMPILES_<SECTION>=<n>`` lines for run.sh. The replay mirrors
``gpu_checks.py``'s parametrisations and ``kernel_bench.py``'s calls (the fused path and, in the
kernels section, the gemm path too); keep them in step when either changes.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from mmloss.bench.devices import DEVICES  # noqa: E402
from mmloss.bench.model import modelled_device  # noqa: E402
from mmloss.ops import _traffic  # noqa: E402
from mmloss.ops._spec import KLSpec, PairSpec  # noqa: E402

META = torch.device("meta")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SECTIONS = ("tests", "kernels", "clip", "siglip", "clip1m")


def _key(kernel, kwargs: dict, extra: tuple) -> tuple:
    fn = getattr(kernel, "fn", kernel)
    params = getattr(kernel, "params", None) or getattr(fn, "params", [])
    spec = []
    for p in params:
        if p.name not in kwargs:
            continue
        v = kwargs[p.name]
        if p.is_constexpr:
            spec.append((p.name, str(v)))
        elif isinstance(v, torch.Tensor):
            spec.append((p.name, str(v.dtype)))
        elif isinstance(v, bool):
            spec.append((p.name, "i1"))
        elif isinstance(v, int):
            spec.append((p.name, "1" if v == 1 else ("d16" if v % 16 == 0 else "i")))
    return (getattr(fn, "__name__", str(fn)),) + tuple(spec) + extra


@contextlib.contextmanager
def recording():
    """Record the key of every Triton launch (the launches themselves are skipped: counting mode)."""
    from mmloss.ops.triton import _autotune

    keys: list = []
    saved = [(_autotune, "launch", _autotune.launch), (_autotune, "launch_fixed", _autotune.launch_fixed)]

    def launch(kernel, kind, t, grid, kwargs, atomic_target=""):
        keys.append(_key(kernel, dict(kwargs, BLOCK_B=t.block_b, BLOCK_K=t.block_k), (t.num_warps, t.num_stages)))

    def launch_fixed(kernel, grid, kwargs, num_warps):
        keys.append(_key(kernel, kwargs, (num_warps, 1)))

    _autotune.launch, _autotune.launch_fixed = launch, launch_fixed
    for name in ("mmloss.ops.triton.gemm_path", "mmloss.ops.triton.gemm_path_kl"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "launch"):
            saved.append((module, "launch", module.launch))

            def gemm_launch(kernel, grid, **kwargs):
                keys.append(_key(kernel, kwargs, (kwargs.get("num_warps"), kwargs.get("num_stages"))))

            module.launch = gemm_launch
    try:
        with _traffic.counting(execute=False):
            yield keys
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


@contextlib.contextmanager
def path(value: str):
    old = os.environ.get("MMLOSS_TRITON_PATH")
    os.environ["MMLOSS_TRITON_PATH"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MMLOSS_TRITON_PATH", None)
        else:
            os.environ["MMLOSS_TRITON_PATH"] = old


def _t(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device=META)


def pair(n, m, d, dtype, *, marks="diagonal", scale="tensor", bias=True, det=True, offset=0, noncontig=False):
    x = _t(n, 2 * d, dtype=dtype)[:, :d] if noncontig else _t(n, d, dtype=dtype)
    y = _t(m, d, dtype=dtype)
    s = {"tensor": _t(), "rows": _t(n), "float": None}[scale]
    labels = marks == "same_label"
    return PairSpec(x=x, y=y, scale=s, scale_value=10.0, bias=_t() if bias else None, bias_value=0.0, marks=marks,
                    offset=offset, x_labels=_t(n, dtype=torch.int64) if labels else None,
                    y_labels=_t(m, dtype=torch.int64) if labels else None, deterministic=det)


def lse(spec, rows=True, cols=True):
    from mmloss.ops import triton as backend

    out = backend.similarity_lse_forward(spec, rows, cols)
    g = _t(spec.n) if rows else None
    h = _t(spec.m) if cols else None
    needs = (True, True, spec.scale is not None, spec.bias is not None)
    backend.similarity_lse_backward(spec, g, h, *out[2:], needs)


def sigmoid(spec, reduction):
    from mmloss.ops import triton as backend

    needs = (True, True, spec.scale is not None, spec.bias is not None)
    if reduction == "sum":
        backend.pairwise_sigmoid_sum(spec, needs)
    else:
        backend.pairwise_sigmoid_forward(spec)
        backend.pairwise_sigmoid_backward(spec, _t(spec.n), needs)


def kl(n, m, d_s, d_t, dtype, det, cross_entropy):
    from mmloss.ops import triton as backend

    spec = KLSpec(_t(n, d_s, dtype=dtype), _t(m, d_s, dtype=dtype), _t(n, d_t, dtype=dtype), _t(m, d_t, dtype=dtype),
                  _t(), 0.0, None, 30.0, 0, det)
    out = backend.similarity_kl_forward(spec, True, True, cross_entropy)
    backend.similarity_kl_backward(spec, _t(n), _t(m), out[2], out[3], (True, True, True))


def section_tests():
    """gpu_checks.py (default path: "auto")."""
    for dtype in DTYPES:
        for d in (67, 768):
            for det in (True, False):
                lse(pair(1000, 1531, d, dtype, det=det, offset=3))
                lse(pair(1000, 1531, d, dtype, marks="same_label", det=det))
                lse(pair(1000, 1531, d, dtype, scale="rows", det=det, noncontig=True, offset=3))
        for det in (True, False):
            for reduction in ("none", "sum"):
                sigmoid(pair(1100, 937, 768, dtype, marks="same_label", det=det), reduction)
            for d_s, d_t in ((67, 130), (768, 512)):
                for ce in (False, True):
                    kl(1000, 1531, d_s, d_t, dtype, det, ce)
    bf16 = torch.bfloat16
    for loss_pair in (pair(2048, 2048, 512, bf16, bias=False), pair(2048, 2048, 512, bf16, bias=False,
                                                                         marks="diagonal")):
        lse(loss_pair)
    sigmoid(pair(2048, 2048, 512, bf16, bias=False), "sum")
    lse(pair(700, 900, 96, bf16, scale="float", bias=False), True, True)
    lse(pair(8192, 8269, 768, bf16))
    sigmoid(pair(8192, 8269, 768, bf16), "sum")
    sigmoid(pair(8192, 8269, 768, bf16), "none")
    lse(pair((1 << 21) + 37, 4096, 1024, bf16, scale="float", bias=False, offset=-((1 << 21) + 37 - 4096)))
    sigmoid(pair((1 << 21) + 37, 4096, 1024, bf16, scale="float"), "sum")
    lse(pair(4096, 4096, 768, bf16))
    sigmoid(pair(4096, 4096, 768, bf16), "sum")
    lse(pair(1000, 1000, 64, torch.float32, scale="float", bias=False, marks="none"))


def _kernel_bench_calls():
    lse(pair(32768, 32768, 768, torch.bfloat16, bias=False))
    lse(pair(32768, 32768, 768, torch.bfloat16, bias=False, det=False))
    lse(pair(32768, 32768, 768, torch.bfloat16, scale="float", bias=False), True, False)
    sigmoid(pair(65536, 65536, 768, torch.bfloat16), "sum")
    sigmoid(pair(65536, 65536, 768, torch.bfloat16, det=False), "sum")


def section_kernels():
    """kernel_bench.py --only clip,parts,siglip, once per path."""
    for value in ("fused", "gemm"):
        with path(value):
            _kernel_bench_calls()


def section_clip():
    lse(pair(32768, 32768, 768, torch.bfloat16, bias=False))


def section_siglip():
    sigmoid(pair(65536, 65536, 768, torch.bfloat16), "sum")


def section_clip1m():
    lse(pair(1 << 20, 1 << 20, 768, torch.bfloat16, bias=False))


def counts(device: str = "h200") -> dict:
    """Section → kernels first compiled in it (sections in run.sh's order)."""
    seen: set = set()
    out = {}
    with modelled_device(DEVICES[device]):
        for name in SECTIONS:
            with recording() as keys:
                globals()[f"section_{name}"]()
            new = set(keys) - seen
            seen |= new
            out[name] = len(new)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="h200", choices=sorted(DEVICES))
    p.add_argument("--shell", action="store_true", help="print COMPILES_<SECTION>=<n> lines")
    args = p.parse_args(argv)
    result = counts(args.device)
    for name, n in result.items():
        print(f"COMPILES_{name.upper()}={n}" if args.shell else f"{name:<8} {n} kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
