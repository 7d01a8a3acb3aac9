"""CLIP-style dual encoder on real data that ships offline: scikit-learn's 8×8 digits.

Each image gives a pair of "modalities": its top half (rows 0–3, 32 pixels) and its bottom half
(rows 4–7). Two MLP towers are trained with the symmetric contrastive loss so that a top half
retrieves its own bottom half among all held-out images. The loss is a one-line swap:

    loss_fn = mmloss.ClipLoss(distributed=None)      # instead of open_clip.loss.ClipLoss()

The script trains once with mmloss and (when open_clip is installed) once with open_clip's loss
from the same seed, and reports retrieval recall@1/5 on held-out pairs before and after.

    pip install "mmloss[examples]"        # scikit-learn
    python examples/dual_encoder_digits.py            # full run (< 2 min on a laptop CPU)
    python examples/dual_encoder_digits.py --quick    # CI: asserts recall improves
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time

import torch

import mmloss


def load_pairs(seed: int = 0):
    """(train, test) pairs of (top halves (n, 32), bottom halves (n, 32)), scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0      # (1797, 8, 8)
    top, bottom = images[:, :4].reshape(-1, 32), images[:, 4:].reshape(-1, 32)
    index = torch.arange(images.shape[0]).numpy()
    train, test = train_test_split(index, test_size=0.25, random_state=seed)
    return (top[train], bottom[train]), (top[test], bottom[test])


def tower(d_in: int, d_out: int = 64) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(d_in, 256), torch.nn.GELU(), torch.nn.Linear(256, d_out))


class DualEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.top, self.bottom = tower(32), tower(32)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))   # open_clip's init

    def forward(self, top, bottom):
        f = torch.nn.functional.normalize
        return f(self.top(top), dim=-1), f(self.bottom(bottom), dim=-1), self.logit_scale.exp()


@torch.no_grad()
def recall_at(model: DualEncoder, top, bottom, ks=(1, 5)) -> dict:
    """Recall@k (percent) of top→bottom and bottom→top retrieval over all given pairs, averaged."""
    a, b, _ = model(top, bottom)
    sims = a @ b.T
    target = torch.arange(sims.shape[0])
    out = {}
    for k in ks:
        hits_ab = (sims.topk(k, dim=1).indices == target[:, None]).any(dim=1).float().mean()
        hits_ba = (sims.T.topk(k, dim=1).indices == target[:, None]).any(dim=1).float().mean()
        out[k] = 50.0 * float(hits_ab + hits_ba)
    return out


def open_clip_loss_class():
    """open_clip's ClipLoss; its loss.py is loaded by path when the package import fails (the
    package imports torchvision, which a CPU-only environment may lack)."""
    try:
        from open_clip.loss import ClipLoss
        return ClipLoss
    except Exception:  # noqa: BLE001
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
        module_spec = importlib.util.spec_from_file_location("_example_open_clip_loss", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.ClipLoss


def train(loss_fn, data, epochs: int, batch_size: int, seed: int = 0):
    (train_top, train_bottom), (test_top, test_bottom) = data
    torch.manual_seed(seed)
    model = DualEncoder()
    before = recall_at(model, test_top, test_bottom)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    n = train_top.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):       # full batches only
            rows = order[start:start + batch_size]
            image_features, text_features, logit_scale = model(train_top[rows], train_bottom[rows])
            loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))             # open_clip's clamp
    return before, recall_at(model, test_top, test_bottom)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run for CI; asserts recall improves")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    epochs = args.epochs or (15 if args.quick else 150)
    data = load_pairs()
    print(f"digits: {data[0][0].shape[0]} train pairs, {data[1][0].shape[0]} held-out pairs; "
          f"{epochs} epochs, batch {args.batch_size}")

    runs = {"mmloss.ClipLoss": mmloss.ClipLoss(distributed=None)}
    open_clip_cls = open_clip_loss_class()
    if open_clip_cls is not None:
        runs["open_clip ClipLoss"] = open_clip_cls()
    else:
        print("open_clip is not installed: skipping the open_clip run")
    results = {}
    for name, loss_fn in runs.items():
        start = time.perf_counter()
        before, after = train(loss_fn, data, epochs, args.batch_size)
        results[name] = (before, after)
        print(f"{name:>20}: recall@1 {before[1]:5.1f} → {after[1]:5.1f}   recall@5 {before[5]:5.1f} → "
              f"{after[5]:5.1f}   ({time.perf_counter() - start:.1f} s)")

    before, after = results["mmloss.ClipLoss"]
    ok = after[1] > before[1] + 5.0 and after[5] > before[5] + 5.0
    if "open_clip ClipLoss" in results:
        theirs = results["open_clip ClipLoss"][1]
        gap = max(abs(after[k] - theirs[k]) for k in (1, 5))
        print(f"largest recall gap mmloss vs open_clip: {gap:.2f} points (acceptance: ≤ 1)")
        ok = ok and gap <= 1.0
    if not ok:
        print("FAILED: recall did not improve enough, or mmloss and open_clip differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
