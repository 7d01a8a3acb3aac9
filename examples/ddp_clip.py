"""Two-tower CLIP training under DistributedDataParallel with mmloss's exact global-batch loss.

    torchrun --nproc_per_node 2 examples/ddp_clip.py            # gloo on CPU, NCCL on GPUs
    torchrun --nproc_per_node 4 examples/ddp_clip.py --ring     # per-rank memory O(B_local·D)

Each rank encodes its shard of the batch; ``mmloss.ClipLoss()`` (``distributed="auto"``) computes
the loss of the *global* batch — every rank returns the same value — and gives each rank the
gradient share that DDP's averaging turns into the single-process gradient. ``--ring`` passes the
text shards around the ranks instead of gathering them. With ``--check`` the script also trains a
single-process copy on the concatenated batches and asserts both end with the same parameters.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import mmloss


class TwoTowers(torch.nn.Module):
    def __init__(self, d_image: int = 32, d_text: int = 24, d_out: int = 16):
        super().__init__()
        self.image = torch.nn.Sequential(torch.nn.Linear(d_image, 64), torch.nn.GELU(), torch.nn.Linear(64, d_out))
        self.text = torch.nn.Sequential(torch.nn.Linear(d_text, 64), torch.nn.GELU(), torch.nn.Linear(64, d_out))
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.3))  # log(10)

    def forward(self, images, texts):
        return (F.normalize(self.image(images), dim=1), F.normalize(self.text(texts), dim=1),
                self.logit_scale.exp())


def batch(step: int, rows: int, device):
    """The global batch of one step (the same on every rank; each rank takes its slice)."""
    g = torch.Generator().manual_seed(step)
    topic = torch.randn(rows, 8, generator=g)
    images = torch.cat([topic, torch.randn(rows, 24, generator=g)], dim=1)
    texts = torch.cat([topic + 0.1 * torch.randn(rows, 8, generator=g), torch.randn(rows, 16, generator=g)], dim=1)
    return images.to(device), texts.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64, help="global batch (split over the ranks)")
    parser.add_argument("--ring", action="store_true", help='distributed="ring" instead of gathering')
    parser.add_argument("--check", action="store_true", help="compare with single-process training")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    torch.manual_seed(0)
    model = TwoTowers().to(device)
    reference = TwoTowers().to(device) if args.check else None
    if reference is not None:
        reference.load_state_dict(model.state_dict())
    ddp = DDP(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5)
    loss_fn = mmloss.ClipLoss(distributed="ring" if args.ring else "auto")
    shard = slice(rank * args.batch // world, (rank + 1) * args.batch // world)  # uneven shards are fine

    for step in range(args.steps):
        images, texts = batch(step, args.batch, device)
        loss = loss_fn(*ddp(images[shard], texts[shard]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if reference is not None:
            ref_loss = mmloss.ClipLoss(distributed=None)(*reference(images, texts))
            reference.zero_grad()
            ref_loss.backward()
            with torch.no_grad():
                for p in reference.parameters():
                    p -= 0.5 * p.grad
            assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6), (step, float(loss), float(ref_loss))
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  global-batch loss {loss.item():.4f}  (world size {world})", flush=True)

    if reference is not None:
        with torch.no_grad():
            worst = max(float((p - q).abs().max() / q.abs().max().clamp_min(1e-12))
                        for p, q in zip(model.parameters(), reference.parameters()))
        assert worst < 1e-4, f"DDP and single-process parameters differ (relative {worst:.2e})"
        if rank == 0:
            print(f"parameters match single-process training (max relative difference {worst:.1e})")
    # Tear down while the interpreter is fully alive and no collective is in flight: freeing the
    # DDP reducer (and with it the gloo group) at interpreter exit once deadlocked in CI — the
    # group's destructor joined gloo's loop thread while holding the GIL, and that thread waited
    # for the GIL to release state of a finished send.
    dist.barrier()
    del ddp, optimizer
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
