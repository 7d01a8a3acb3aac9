"""Per-rank memory of distributed="ring" CLIP (issue 10's memory bound; allocation events, not time).

B_local = 2048 rows of D = 128 (fp32) per rank, W = 2 and W = 4 gloo CPU ranks: the peak held
above the inputs during forward + backward must stay within

    gradients (dx, dy) + 4·B_local·D·4 bytes (two travelling shards and two fp32 gradient
    accumulators) + the primitive's workspace (MMLOSS_CHUNK_BYTES, set to 1 MiB here) + a slack
    of 1 MiB for O(B_local) vectors (statistics, terms, their gradients) and the profiler,

and it must not grow with W: "gather" would hold W·B_local·D·4 bytes of gathered features (4 MiB
at W = 4 against the 4 MiB ring allowance above the gradients), so W = 4 separates the two.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from harness import spawn_ranks  # noqa: E402

B_LOCAL, D = 2048, 128
WORKSPACE = 1 << 20
SLACK = 1 << 20


def _bound() -> int:
    grads = 2 * B_LOCAL * D * 4
    return grads + 4 * B_LOCAL * D * 4 + WORKSPACE + SLACK


def _worker(rank: int, size: int, init_file: str, result_dir: str, mode: str) -> None:
    import torch.distributed as dist

    os.environ["MMLOSS_CHUNK_BYTES"] = str(WORKSPACE)
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import mmloss
    from memtrack import peak_bytes_above_start

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        g = torch.Generator().manual_seed(rank)
        x = torch.nn.functional.normalize(torch.randn(B_LOCAL, D, generator=g), dim=1).requires_grad_()
        y = torch.nn.functional.normalize(torch.randn(B_LOCAL, D, generator=g), dim=1).requires_grad_()
        small = (x[:16].detach().clone().requires_grad_(), y[:16].detach().clone().requires_grad_())
        mmloss.clip_loss(*small, 10.0, distributed=mode, backend="torch").backward()  # warm-up

        def step():
            mmloss.clip_loss(x, y, 10.0, distributed=mode, backend="torch").backward()

        peak, _ = peak_bytes_above_start(step)
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as fh:
            json.dump({"peak": peak}, fh)
    finally:
        dist.destroy_process_group()


def _peaks(size: int, mode: str, tmp) -> list:
    return [out["peak"] for out in spawn_ranks(_worker, size, tmp, mode, what="ring memory run")]


@pytest.mark.parametrize("size", [2, 4], ids=lambda w: f"W={w}")
def test_ring_peak_per_rank_is_bounded_and_flat_in_w(size, tmp_path):
    peaks = _peaks(size, "ring", tmp_path)
    bound = _bound()
    for rank, peak in enumerate(peaks):
        assert peak <= bound, (
            f"rank {rank} of {size}: ring CLIP peak {peak / 2**20:.2f} MiB above inputs > bound "
            f"{bound / 2**20:.2f} MiB (grads + 4·B·D·4 + workspace + slack)")
