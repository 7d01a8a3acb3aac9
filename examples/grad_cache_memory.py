"""Peak memory of one training step, full batch vs mmloss.grad_cache_step, against batch size.

Measured on CPU from the allocator's events (torch profiler, ``mmloss.bench.allocations``): the
bytes held above what existed before the step. The encoder is a 4-layer MLP of width 2048 (its activations dominate, as in real encoders); the loss is
mmloss.clip_loss, which itself needs only O(B·D). Run: python examples/grad_cache_memory.py
"""
from __future__ import annotations

import argparse

import torch

import mmloss
from mmloss.bench.allocations import peak_bytes_above_start


def peak_bytes(fn) -> int:
    """Peak bytes held above the start during ``fn()`` (mmloss.bench.allocations' event replay)."""
    return peak_bytes_above_start(fn)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--width", type=int, default=2048)
    args = parser.parse_args()
    torch.manual_seed(0)

    def tower(d_in):
        w = args.width
        return torch.nn.Sequential(torch.nn.Linear(d_in, w), torch.nn.GELU(), torch.nn.Linear(w, w),
                                   torch.nn.GELU(), torch.nn.Linear(w, w), torch.nn.GELU(), torch.nn.Linear(w, 128))

    image_tower, text_tower = tower(64), tower(32)
    scale = torch.nn.Parameter(torch.tensor(2.6))
    loss_fn = lambda i, t: mmloss.clip_loss(i, t, scale.exp())  # noqa: E731
    print(f"| batch | full-batch step peak (MiB) | grad_cache_step, chunk {args.chunk} (MiB) |")
    print("|---:|---:|---:|")
    for b in args.batches:
        images, texts = torch.randn(b, 64), torch.randn(b, 32)

        def full():
            loss_fn(image_tower(images), text_tower(texts)).backward()

        def cached():
            mmloss.grad_cache_step([image_tower, text_tower], [images, texts], loss_fn, args.chunk)

        for fn in (full, cached):      # warm-up: parameter gradients exist before measuring
            fn()
        mib = [peak_bytes(fn) / 2**20 for fn in (full, cached)]
        print(f"| {b} | {mib[0]:.1f} | {mib[1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
