"""Host time of small calls: what mmloss spends above its GEMMs (issue 12, "low per-call overhead").

At B = 64, D = 64 a CLIP forward+backward is a few hundred microseconds, most of it Python and
dispatcher time, and a shared machine makes wall-clock medians noisy. This script therefore
times with ``time.process_time`` (CPU time of this process: time spent descheduled does not
count), runs each case as a batch of ``--calls`` back-to-back forward+backward calls, alternates
the cases within every round (order rotated each round), repeats ``--rounds`` rounds and prints
the per-call median and min over rounds in microseconds. Run it with one thread
(``OMP_NUM_THREADS=1``), as the numbers in benchmarks/results/cpu/overhead.md were:

    OMP_NUM_THREADS=1 python benchmarks/overhead.py --sizes 64,256 --dim 64

Cases (inputs as ``python -m mmloss.bench`` makes them: L2-normalised fp32 leaves requiring grad,
0-d fp32 scale / bias tensors without grad):

- ``ops`` (opt-in): ``gemm1`` (one x·yᵀ) and ``torch.ops.mmloss_C.similarity_lse{,_backward}``
  called directly on detached inputs (the C++ op alone, no wrapper or autograd);
- ``gemm4``: the 4 products of the similarity_lse shapes (x·yᵀ twice, G·y, Gᵀ·x), no autograd;
- ``lse[b]``: ``similarity_lse(x, y, s, exclude="diagonal", backend=b)`` and the backward of
  ``½·(mean row + mean col)`` (the bench's ``lse`` case);
- ``clip[b]`` / ``clip dense``: ``mmloss.clip_loss(x, y, s, backend=b)`` + backward / the dense
  torch loss of the bench (``mmloss.bench.cases``);
- ``siglip[b]`` / ``siglip dense``: likewise for ``mmloss.siglip_loss(x, y, s, bias)``.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

import mmloss
from mmloss.bench.cases import CLIP, LSE, SIGLIP


def _cases(batch: int, dim: int, backends: list[str], which: list[str]):
    """(name, zero-argument callable running one forward+backward) per case."""
    out = []
    pair = LSE.make_inputs(batch, dim, torch.float32, "cpu")
    x, y = pair.leaves
    s = pair.scale
    xd, yd = x.detach(), y.detach()

    def gemm4():
        g = xd @ yd.T
        xd @ yd.T
        g @ yd
        g.T @ xd

    def clear():
        x.grad = None
        y.grad = None

    if "lse" in which:
        out.append((f"gemm4 B={batch}", gemm4))
        for b in backends:
            def lse(b=b):
                row, col = mmloss.ops.similarity_lse(x, y, s, exclude="diagonal", backend=b)
                (0.5 * (row.mean() + col.mean())).backward()
                clear()
            out.append((f"lse[{b}] B={batch}", lse))
    if "ops" in which:
        # The compiled ops called directly (no Python wrapper, no autograd graph: x, y detached):
        # what the C++ op costs above its GEMMs (1 forward, 3 backward).
        import mmloss._C  # noqa: F401  (registers torch.ops.mmloss_C)
        fwd_op = torch.ops.mmloss_C.similarity_lse.default
        bwd_op = torch.ops.mmloss_C.similarity_lse_backward.default
        args = (xd, yd, s, 1.0, None, 0.0, "diagonal", 0, None, None, True, True, "cpu", 0, False, 0)
        _, _, rs, cs, lg = fwd_op(*args)
        g = torch.full((batch,), 0.5 / batch)
        out.append((f"gemm1 B={batch}", lambda: torch.mm(xd, yd.T)))
        out.append((f"lse op fwd B={batch}", lambda: fwd_op(*args)))
        out.append((f"lse op bwd B={batch}", lambda: bwd_op(g, g, *args[:12], "cpu", 0, False, 0, rs, cs, lg,
                                                            True, True, False, False)))
    if "clip" in which:
        for b in backends:
            def clip(b=b):
                mmloss.clip_loss(x, y, s, backend=b).backward()
                clear()
            out.append((f"clip[{b}] B={batch}", clip))

        def clip_dense():
            CLIP.dense(x, y, s).backward()
            clear()
        out.append((f"clip dense B={batch}", clip_dense))
    if "siglip" in which:
        sb = SIGLIP.make_inputs(batch, dim, torch.float32, "cpu")
        bias = sb.bias
        ssig = sb.scale
        for b in backends:
            def siglip(b=b):
                mmloss.siglip_loss(x, y, ssig, bias, backend=b).backward()
                clear()
            out.append((f"siglip[{b}] B={batch}", siglip))

        def siglip_dense():
            SIGLIP.dense(x, y, ssig, bias).backward()
            clear()
        out.append((f"siglip dense B={batch}", siglip_dense))
    return out


def _run(cases, rounds: int, calls: int) -> dict[str, list[float]]:
    samples = {name: [] for name, _ in cases}
    for _, fn in cases:  # warm-up
        for _ in range(5):
            fn()
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            k = r % len(cases)
            for name, fn in cases[k:] + cases[:k]:
                t0 = time.process_time()
                for _ in range(calls):
                    fn()
                samples[name].append((time.process_time() - t0) / calls * 1e6)
    finally:
        gc.enable()
    return samples


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="64,256", help="batch sizes B, comma list (default 64,256)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--backends", default="cpu,torch", help="mmloss backends (default cpu,torch)")
    p.add_argument("--cases", default="lse,clip,siglip",
                   help="comma list of lse, clip, siglip, ops (the compiled similarity_lse ops called directly)")
    p.add_argument("--rounds", type=int, default=15, help="alternated rounds (default 15)")
    p.add_argument("--calls", type=int, default=100, help="calls per case per round (default 100)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    backends = [b for b in a.backends.split(",") if b]
    which = a.cases.split(",")
    print(f"torch {torch.__version__} · threads {torch.get_num_threads()} · OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')} · clock time.process_time · {a.rounds} rounds × "
          f"{a.calls} calls · µs per forward+backward call")
    print(f"{'case':<22} {'median':>9} {'min':>9} {'max':>9}")
    for batch in (int(v) for v in a.sizes.split(",")):
        samples = _run(_cases(batch, a.dim, backends, which), a.rounds, a.calls)
        for name, v in samples.items():
            print(f"{name:<22} {statistics.median(v):9.1f} {min(v):9.1f} {max(v):9.1f}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
