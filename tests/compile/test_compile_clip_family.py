"""torch.compile of the CLIP-family losses (§1–§3, §13–§15): ``fullgraph=True, dynamic=True``
traces each loss once; ten steps with varying batch sizes then run without a recompile, and
values and gradients match eager mode at every step (docs/guarantees.md, "Compilation")."""
from __future__ import annotations

import pytest
import torch

import mmloss

SIZES = (6, 9, 7, 12, 5, 10, 8, 11, 6, 13)  # ten steps; the first compiles


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def _inputs(n: int, seed: int):
    """Leaves for one step: student pair, teacher pair (another D), scale, bias, labels."""
    x, y = _unit(n, 5, seed), _unit(n, 5, seed + 1)
    xt, yt = _unit(n, 3, seed + 2), _unit(n, 3, seed + 3)
    scale = torch.tensor(8.0, requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True)
    labels = torch.arange(n) % 3
    return x.requires_grad_(), y.requires_grad_(), xt, yt, scale, bias, labels


def _soft(n: int) -> torch.Tensor:
    return torch.softmax(torch.arange(n * n, dtype=torch.float32).reshape(n, n).sin(), dim=1)


LOSSES = {
    "clip": lambda x, y, xt, yt, s, b, lab: mmloss.clip_loss(x, y, s, b),
    "clip-labels-smoothing": lambda x, y, xt, yt, s, b, lab: mmloss.clip_loss(x, y, s, labels=lab,
                                                                             label_smoothing=0.1),
    "siglip-bias": lambda x, y, xt, yt, s, b, lab: mmloss.siglip_loss(x, y, s, b),
    "siglip-labels": lambda x, y, xt, yt, s, b, lab: mmloss.siglip_loss(x, y, s, b, labels=lab),
    "infonce-labels": lambda x, y, xt, yt, s, b, lab: mmloss.infonce_loss(x, y, s, query_labels=lab,
                                                                          key_labels=lab),
    "infonce-soft": lambda x, y, xt, yt, s, b, lab: mmloss.infonce_loss(x, y, s, soft_targets=_soft(x.shape[0])),
    "contrastive-distill": lambda x, y, xt, yt, s, b, lab: mmloss.contrastive_distill_loss(x, y, s, xt, yt, 4.0),
    "modx": lambda x, y, xt, yt, s, b, lab: mmloss.modx_loss(x, y, s, xt, yt),
    "cyclip": lambda x, y, xt, yt, s, b, lab: mmloss.cyclip_loss(x, y, s),
    "score-distill": lambda x, y, xt, yt, s, b, lab: mmloss.score_distill_loss(x, y, 1),
    "DistillClipLoss": lambda x, y, xt, yt, s, b, lab: sum(mmloss.DistillClipLoss(distributed=None)(
        x, y, s, xt, yt, 4.0)),
}


def _step(fn, n: int, seed: int):
    x, y, xt, yt, s, b, lab = _inputs(n, seed)
    loss = fn(x, y, xt, yt, s, b, lab)
    leaves = [t for t in (x, y, s, b) if t.requires_grad]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), [None if g is None else g.detach() for g in grads]


@pytest.mark.parametrize("name", list(LOSSES))
def test_compiles_once_for_every_batch_size(name):
    torch._dynamo.reset()
    fn = LOSSES[name]
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for step, n in enumerate(SIZES):
        if step == 1:
            torch.compiler.set_stance("fail_on_recompile")
        try:
            got, got_grads = _step(compiled, n, seed=step)
        finally:
            if step == len(SIZES) - 1 or step == 0:
                torch.compiler.set_stance("default")
        want, want_grads = _step(fn, n, seed=step)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} n={n}: {m}")
        for k, (a, e) in enumerate(zip(got_grads, want_grads)):
            assert (a is None) == (e is None), (name, n, k)
            if a is not None:
                torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name} n={n} grad {k}: {m}")
