"""SimCLR-style self-supervised training with mmloss.NTXentLoss on scikit-learn's 8×8 digits.

Two random augmentations of each image (a shift of up to one pixel, pixel dropout, contrast
jitter and noise) go through one encoder + projection head; NT-Xent pulls the two views of an
image together. Labels are never used in training; the learned encoder features are
evaluated by k-NN (k = 5, cosine) accuracy of the 8-d encoder features on held-out digits,
against the same encoder before training (8-d, so that the untrained encoder is not already
near the ~98% that raw pixels give). Swap in ``NTXentLoss(memory_bank_size=(4096, 32))`` for the MoCo-style memory bank, or
``mmloss.MultiViewInfoNCELoss`` with more than two views.

    pip install "mmloss[examples]"        # scikit-learn
    python examples/simclr_digits.py            # full run (< 2 min on a laptop CPU)
    python examples/simclr_digits.py --quick    # CI: asserts k-NN accuracy improves
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import mmloss


def load_digits_split(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    train, test = train_test_split(torch.arange(len(labels)).numpy(), test_size=0.25, random_state=seed,
                                   stratify=digits.target)
    return (images[train], labels[train]), (images[test], labels[test])


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, 8, 8) → (B, 64): random shift (≤ 1 pixel each way, zero fill), pixel dropout (15%),
    contrast jitter (×0.7–1.3) and Gaussian noise (σ 0.1)."""
    b = images.shape[0]
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (b,), generator=generator)
    dx = torch.randint(0, 3, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(8))[:, :, None].expand(b, 8, 8)
    cols = (dx[:, None] + torch.arange(8))[:, None, :].expand(b, 8, 8)
    shifted = padded[torch.arange(b)[:, None, None], rows, cols]
    keep = (torch.rand(b, 8, 8, generator=generator) > 0.15).float()
    contrast = 0.7 + 0.6 * torch.rand(b, 1, 1, generator=generator)
    noise = 0.1 * torch.randn(b, 8, 8, generator=generator)
    return (shifted * keep * contrast + noise).reshape(b, 64)


class SimCLR(torch.nn.Module):
    def __init__(self, feature_dim: int = 8, projection_dim: int = 32):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, feature_dim))
        self.head = torch.nn.Sequential(torch.nn.GELU(), torch.nn.Linear(feature_dim, 128), torch.nn.GELU(),
                                        torch.nn.Linear(128, projection_dim))

    def forward(self, x):
        return self.head(self.encoder(x))


@torch.no_grad()
def knn_accuracy(encoder, train, test, k: int = 5) -> float:
    """Percent of held-out digits whose k nearest training digits (cosine, encoder features)
    vote for the right class."""
    (train_x, train_y), (test_x, test_y) = train, test
    f = torch.nn.functional.normalize
    bank = f(encoder(train_x.reshape(-1, 64)), dim=1)
    queries = f(encoder(test_x.reshape(-1, 64)), dim=1)
    neighbours = (queries @ bank.T).topk(k, dim=1).indices
    votes = torch.nn.functional.one_hot(train_y[neighbours], 10).sum(dim=1)
    return 100.0 * float((votes.argmax(dim=1) == test_y).float().mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run for CI; asserts accuracy improves")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.2)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    epochs = args.epochs or (15 if args.quick else 150)
    train, test = load_digits_split()
    torch.manual_seed(0)
    model = SimCLR()
    loss_fn = mmloss.NTXentLoss(temperature=args.temperature)
    before = knn_accuracy(model.encoder, train, test)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    images = train[0]
    n = images.shape[0]
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        for first in range(0, n - args.batch_size + 1, args.batch_size):
            batch = images[order[first:first + args.batch_size]]
            out0, out1 = model(augment(batch, generator)), model(augment(batch, generator))
            loss = loss_fn(out0, out1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    after = knn_accuracy(model.encoder, train, test)
    print(f"digits: {n} unlabelled training images, {test[0].shape[0]} held-out; {epochs} epochs, "
          f"batch {args.batch_size}, τ = {args.temperature}")
    print(f"5-NN accuracy of the 8-d encoder features: {before:.1f}% (untrained) → {after:.1f}% "
          f"(last loss {float(loss.detach()):.3f}, {time.perf_counter() - start:.1f} s)")
    if not after > before + 5.0:
        print("FAILED: k-NN accuracy did not improve over the untrained encoder", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
