"""Timings of the triton backend against its GEMM floor, for the issue's GPU targets.

    python benchmarks/gpu/kernel_bench.py --out results.jsonl [--only clip,siglip,clip1m,parts]
                                          [--time-limit SECONDS] [--repeats R] [--dry-run]

Sections (each result is appended to ``--out`` as one JSON line the moment it is measured):
- ``clip``: symmetric CLIP, N = M = 32768, D = 768, bf16, forward + backward — the floor (4 ×
  torch.mm into a preallocated output), ``clip_loss(backend="triton")`` (the deterministic
  default) and the fastest mode (the same loss composed from ``similarity_lse(...,
  deterministic=False)``); peak memory above the inputs (and above inputs + gradients);
- ``parts``: the CLIP kernels alone (statistics forward; backward deterministic / atomic);
- ``siglip``: SigLIP, N = M = 65536, D = 768, bf16 — floor (3 × mm), ``siglip_loss`` (default)
  and ``pairwise_sigmoid(..., reduction="sum", deterministic=False)``;
- ``clip1m``: CLIP at N = M = 1,048,576, D = 768, bf16: one forward + backward must complete
  (a line when it starts, one after the forward, one at the end).
Times: CUDA events, median of ``--repeats`` after two warm-up runs (the first compiles). Every
line carries ``path``: the triton backend's ``MMLOSS_TRITON_PATH`` ("fused", "gemm"; "auto"
when unset), which ``python -m mmloss.bench --model ... --measured`` matches to its predictions.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

SECTIONS = ("clip", "parts", "siglip", "clip1m")
MIB = 1 << 20


def _features(n, d, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, d, device="cuda", generator=g, dtype=torch.float32)
    return torch.nn.functional.normalize(x, dim=1).to(torch.bfloat16).requires_grad_(True)


def _events():
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def time_fwd_bwd(loss_fn, leaves, repeats, warmup=2):
    """(forward ms, backward ms, total ms) medians, and min/max of the total."""
    fwd, bwd, tot = [], [], []
    for i in range(warmup + repeats):
        e0, e1, e2 = _events()
        e0.record()
        loss = loss_fn()
        e1.record()
        torch.autograd.grad(loss, leaves)
        e2.record()
        torch.cuda.synchronize()
        if i >= warmup:
            fwd.append(e0.elapsed_time(e1))
            bwd.append(e1.elapsed_time(e2))
            tot.append(e0.elapsed_time(e2))
    return statistics.median(fwd), statistics.median(bwd), statistics.median(tot), min(tot), max(tot)


def time_call(fn, repeats, warmup=2):
    out = []
    for i in range(warmup + repeats):
        e0, e1, _ = _events()
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        if i >= warmup:
            out.append(e0.elapsed_time(e1))
    return statistics.median(out)


def peak_above(loss_fn, leaves):
    """Bytes held at the peak of one forward + backward beyond what was held just before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = torch.autograd.grad(loss_fn(), leaves)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    del grads
    return peak, grad_bytes


def floor_ms(x, y, gemms, repeats):
    out = torch.empty(x.shape[0], y.shape[0], dtype=x.dtype, device="cuda")
    a, b = x.detach(), y.detach()

    def run():
        for _ in range(gemms):
            torch.mm(a, b.t(), out=out)

    return time_call(run, repeats)


class Writer:
    def __init__(self, path):
        self.path = path

    def __call__(self, **row):
        row.setdefault("path", os.environ.get("MMLOSS_TRITON_PATH", "") or "auto")
        row["time"] = time.strftime("%H:%M:%S")
        line = json.dumps(row)
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def clip_fast_loss(x, y, s):
    """CLIP (docs/losses.md §1, no labels) from the primitive in its deterministic=False mode — the
    same math as clip_loss, which always runs the deterministic default."""
    from mmloss import ops

    diag = s * (x.float() * y.float()).sum(dim=1)
    row, col = ops.similarity_lse(x, y, s, exclude="diagonal", backend="triton", deterministic=False)
    sp = torch.nn.functional.softplus
    return (0.5 * (sp(row - diag) + sp(col - diag))).mean()


def section_clip(write, repeats, n=32768, d=768):
    import mmloss.functional as F

    x, y = _features(n, d, 1), _features(n, d, 2)
    s = torch.tensor(100.0, device="cuda", requires_grad=True)
    leaves = [x, y, s]
    flops = 6.0 * n * n * d
    fl = floor_ms(x, y, 4, repeats)
    write(section="clip", impl="floor (4 x mm)", N=n, D=d, total_ms=fl)
    for impl, fn in (("triton deterministic (default)", lambda: F.clip_loss(x, y, s, backend="triton")),
                     ("triton fastest (deterministic=False)", lambda: clip_fast_loss(x, y, s))):
        f, b, t, lo, hi = time_fwd_bwd(fn, leaves, repeats)
        peak, grad_bytes = peak_above(fn, leaves)
        write(section="clip", impl=impl, N=n, D=d, fwd_ms=f, bwd_ms=b, total_ms=t, min_ms=lo, max_ms=hi,
              over_floor=t / fl, useful_tflops=flops / t / 1e9, peak_mib=peak / MIB,
              peak_above_grads_mib=(peak - grad_bytes) / MIB)


def section_parts(write, repeats, n=32768, d=768):
    from mmloss import ops

    x, y = _features(n, d, 3), _features(n, d, 4)
    fl = floor_ms(x, y, 1, repeats)
    write(section="parts", impl="floor (1 x mm)", N=n, D=d, total_ms=fl)
    with torch.no_grad():
        ms = time_call(lambda: ops.similarity_lse(x, y, 100.0, exclude="diagonal", backend="triton"), repeats)
    write(section="parts", impl="similarity_lse forward, rows+cols", N=n, D=d, total_ms=ms, gemm_equivalents=ms / fl)
    with torch.no_grad():
        ms = time_call(lambda: ops.similarity_lse(x, y, 100.0, exclude="diagonal", backend="triton", cols=False),
                       repeats)
    write(section="parts", impl="similarity_lse forward, rows only", N=n, D=d, total_ms=ms, gemm_equivalents=ms / fl)
    for det in (None, False):
        def fn():
            r, c = ops.similarity_lse(x, y, 100.0, exclude="diagonal", backend="triton", deterministic=det)
            return r.sum() + c.sum()

        f, b, t, lo, hi = time_fwd_bwd(fn, [x, y], repeats)
        write(section="parts", impl=f"similarity_lse backward ({'default' if det is None else 'atomic'})",
              N=n, D=d, bwd_ms=b, gemm_equivalents=b / fl)


def section_siglip(write, repeats, n=65536, d=768):
    import mmloss.functional as F
    from mmloss import ops

    x, y = _features(n, d, 5), _features(n, d, 6)
    s = torch.tensor(10.0, device="cuda", requires_grad=True)
    bias = torch.tensor(-10.0, device="cuda", requires_grad=True)
    leaves = [x, y, s, bias]
    fl = floor_ms(x, y, 3, repeats)
    write(section="siglip", impl="floor (3 x mm)", N=n, D=d, total_ms=fl)
    impls = (
        ("triton deterministic (default)", lambda: F.siglip_loss(x, y, s, bias, backend="triton")),
        ("triton fastest (deterministic=False)",
         lambda: ops.pairwise_sigmoid(x, y, s, bias, backend="triton", reduction="sum", deterministic=False) / n),
    )
    for impl, fn in impls:
        f, b, t, lo, hi = time_fwd_bwd(fn, leaves, repeats)
        peak, grad_bytes = peak_above(fn, leaves)
        write(section="siglip", impl=impl, N=n, D=d, fwd_ms=f, bwd_ms=b, total_ms=t, min_ms=lo, max_ms=hi,
              over_floor=t / fl, useful_tflops=6.0 * n * n * d / t / 1e9, peak_mib=peak / MIB,
              peak_above_grads_mib=(peak - grad_bytes) / MIB)


def section_clip1m(write, repeats, n=1 << 20, d=768):
    import mmloss.functional as F

    x, y = _features(n, d, 7), _features(n, d, 8)
    s = torch.tensor(100.0, device="cuda", requires_grad=True)
    fn = lambda: F.clip_loss(x, y, s, backend="triton")  # noqa: E731
    impl = "triton deterministic (default)"
    write(section="clip1m", impl=impl, N=n, D=d, stage="started")
    e0, e1, e2 = _events()
    e0.record()
    loss = fn()
    e1.record()
    torch.cuda.synchronize()
    f = e0.elapsed_time(e1)
    write(section="clip1m", impl=impl, N=n, D=d, stage="forward done", fwd_ms=f)
    torch.autograd.grad(loss, [x, y, s])
    e2.record()
    torch.cuda.synchronize()
    b, t = e1.elapsed_time(e2), e0.elapsed_time(e2)
    del loss
    write(section="clip1m", impl=impl, N=n, D=d, stage="done", fwd_ms=f, bwd_ms=b, total_ms=t,
          completed=True, useful_tflops=6.0 * n * n * d / t / 1e9)
    if t < 15000:  # a second run for the memory peak only when it fits the section's time limit
        peak, grad_bytes = peak_above(fn, [x, y, s])
        write(section="clip1m", impl="triton deterministic (default)", N=n, D=d, peak_mib=peak / MIB,
              peak_above_grads_mib=(peak - grad_bytes) / MIB)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="", help="append one JSON line per result to this file")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--time-limit", type=float, default=0.0, help="start no section after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    if args.dry_run:
        for s in chosen:
            print(f"kernel_bench: would run section {s!r} ({args.repeats} repeats)")
        return 0
    if not torch.cuda.is_available():
        print("kernel_bench: no CUDA GPU", file=sys.stderr)
        return 2
    write = Writer(args.out)
    write(section="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__,
          triton=__import__("triton").__version__)
    start = time.time()
    for name in chosen:
        if args.time_limit and time.time() - start > args.time_limit:
            write(section=name, skipped=f"time limit {args.time_limit:.0f} s reached")
            continue
        t0 = time.time()
        try:
            globals()[f"section_{name}"](write, args.repeats)
        except torch.cuda.OutOfMemoryError as exc:
            write(section=name, error=f"out of memory: {exc}"[:300])
        torch.cuda.empty_cache()
        write(section=name, wall_s=round(time.time() - t0, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
