"""In-process ratio of a loss call to its GEMM floor, for A/B runs of compiled builds.

    python benchmarks/floor_ratio.py --loss clip --size 8192 --repeats 5            # this tree
    PYTHONPATH=/tmp/base python benchmarks/floor_ratio.py --loss clip --size 8192   # a worktree of
                                                     # another commit, its mmloss._C built in place

Each repeat times one forward+backward of ``mmloss.<loss>_loss(..., backend=...)`` and then the
floor (the products an O((N+M)·D)-memory algorithm cannot avoid: 4 × (N×D)·(D×M) for CLIP, 3 for
SigLIP and NT-Xent, as ``python -m mmloss.bench``) back to back in one process, so a burst of
load on a shared machine hits both; it prints the medians and the median of the per-repeat
ratios. ``benchmarks/ab.py`` compares the torch backend across commits; this script exists
because a compiled backend's worktree needs its own build (``PYTHONPATH`` selects the tree).
Inputs: fp32, rows L2-normalised, D = 512, seed 0; CLIP scale 1/0.07, SigLIP scale 10 and bias
−10, NT-Xent temperature 0.1 with B = size/2 per view (a size × size similarity matrix).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import mmloss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loss", choices=["clip", "siglip", "ntxent"], default="clip")
    ap.add_argument("--size", type=int, default=8192, help="rows of the similarity matrix")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default="cpu")
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    rows = args.size // 2 if args.loss == "ntxent" else args.size
    x, y = (torch.nn.functional.normalize(torch.randn(rows, args.dim, generator=g), dim=1).requires_grad_()
            for _ in range(2))

    def call() -> float:
        t0 = time.perf_counter()
        if args.loss == "clip":
            loss = mmloss.clip_loss(x, y, torch.tensor(1 / 0.07), backend=args.backend)
        elif args.loss == "siglip":
            loss = mmloss.siglip_loss(x, y, torch.tensor(10.0), torch.tensor(-10.0), backend=args.backend)
        else:
            loss = mmloss.ntxent_loss(x, y, temperature=0.1, backend=args.backend)
        loss.backward()
        x.grad = y.grad = None
        return time.perf_counter() - t0

    a, b = (torch.cat([x, y]).detach(),) * 2 if args.loss == "ntxent" else (x.detach(), y.detach())
    out = torch.empty(a.shape[0], b.shape[0])
    gemms = 4 if args.loss == "clip" else 3

    def floor() -> float:
        t0 = time.perf_counter()
        for _ in range(gemms):
            torch.mm(a, b.t(), out=out)
        return time.perf_counter() - t0

    call(), floor()  # warm-up
    pairs = [(call(), floor()) for _ in range(args.repeats)]
    t = statistics.median(p[0] for p in pairs) * 1e3
    f = statistics.median(p[1] for p in pairs) * 1e3
    ratio = statistics.median(p[0] / p[1] for p in pairs)
    print(f"{args.loss} {args.size}x{args.size} D={args.dim} backend={args.backend} ({mmloss.__file__}): "
          f"loss {t:.0f} ms, floor {f:.0f} ms ({gemms} GEMMs), ratio {ratio:.3f} (median of {args.repeats} pairs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
