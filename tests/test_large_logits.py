"""Large-logit conformance of the torch backend (docs/guarantees.md, "Large logits"): CLIP,
InfoNCE, SigLIP and similarity_kl gradients at L = 1e2 … 1e6 within 4× dense fp32's error on the
same inputs + 1e-7·max|grad|. The checker is shared with the other backends (tests/large_logits.py)."""
from __future__ import annotations

import pytest

import large_logits


@pytest.mark.parametrize("case", large_logits.CASES, ids=str)
def test_torch_backend(case):
    large_logits.check("torch", case)



@pytest.mark.parametrize("logits", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("backend", ["torch"])
def test_tied_keys_keep_fp32_accuracy(backend, logits):
    """Every key appears twice, so the best keys tie exactly and rows are 50/50 softmaxes at any
    scale: the probabilities must come out at fp32 accuracy. Recomputing exp(L − LSE) from one
    rounded fp32 LSE was off by |L|·2⁻²⁴ in every exponent (gradient errors 7e-5·max|grad| at
    L = 1e4, 2e-3 at 1e6); the unrounded max and sum keep them at ~1e-7."""
    import torch

    import mmloss

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(20, 33, generator=g, dtype=torch.float64), dim=1)
    y = x[torch.randperm(20, generator=g)[:10]].repeat(2, 1)
    norm, scale = 10.0, logits / 100.0
    x, y = (x * norm).float(), (y * norm).float()

    def grads(fn, dtype):
        leaves = [x.to(dtype).clone().requires_grad_(), y.to(dtype).clone().requires_grad_(),
                  torch.tensor(scale, dtype=dtype, requires_grad=True)]
        row, col = fn(*leaves)
        (row.sum() + 0.5 * col.sum()).backward()
        return [t.grad.double() for t in leaves]

    exact = grads(mmloss.reference.similarity_lse, torch.float64)
    fast = grads(lambda a, b, s: mmloss.ops.similarity_lse(a, b, s, backend=backend), torch.float32)
    for name, f, e in zip(("dx", "dy", "dscale"), fast, exact):
        err, bound = float((f - e).abs().max()), 1e-6 * float(e.abs().max())
        assert err <= bound, f"{name} at L={logits:g}: max error {err:.3g} > {bound:.3g}"
