"""torch.library registration and torch.compile (docs/design.md "The primitives").

Each primitive is a ``torch.library`` custom op with a fake kernel that works with symbolic
shapes: ``torch.library.opcheck`` passes on the ops the public functions reach (recorded below the
autograd layer, so the tests do not depend on the ops' internal argument lists), and
``torch.compile(fullgraph=True, dynamic=True)`` traces the losses without graph breaks and matches
eager mode, forward and backward, for several batch sizes. The plain CLIP and SigLIP losses go
through inductor; their option variants and the primitives use ``backend="aot_eager"`` (dynamo +
AOTAutograd with the fake kernels and symbolic shapes, where custom ops break; inductor's code
generation is covered by the first two and by test_compile_clip_family.py), which keeps the
stage within its time budget.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mmloss
from _foundation_helpers import ids, pair, row_scale, scalar_tensor
from oracle import assert_grad_close, assert_loss_close, logit_bound

ops = mmloss.ops

# The ops of the Foundation primitives (the backward ops are reached through autograd).
FOUNDATION_OPS = {"similarity_lse", "similarity_lse_backward", "pairwise_sigmoid", "pairwise_sigmoid_backward",
                  "pairwise_sigmoid_sum"}


# The backends whose ops opcheck covers: the Python ops ``mmloss::*`` (torch backend) and, when
# mmloss._C is built, the compiled ``mmloss_C::*`` (cpu backend). Named explicitly: "auto" picks
# cpu where it is built, and the torch backend must stay covered.
OP_BACKENDS = {"torch": "mmloss"}
if mmloss.available_backends()["cpu"] is None:
    OP_BACKENDS["cpu"] = "mmloss_C"


class RecordMmlossOps(TorchDispatchMode):
    """Records (op, args, kwargs) of every ``torch.ops.mmloss.*`` / ``torch.ops.mmloss_C.*`` call
    that reaches dispatch."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in ("mmloss", "mmloss_C"):
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _op_name(func) -> str:
    """"similarity_lse" for torch.ops.mmloss.similarity_lse.default."""
    return func.__name__.split(".")[0]


def _labels():
    return dict(x_labels=ids(7, 3, 1), y_labels=ids(5, 3, 2))


# Argument combinations: scale float / 0-d / per-row, bias None / float / tensor, every mark mode,
# labels, rows/cols flags, reduction="sum".
COMBINATIONS = {
    "lse-perrow-biastensor-diag+1": lambda x, y: ops.similarity_lse(
        x, y, row_scale(7, 1), scalar_tensor(0.3), exclude="diagonal", offset=1, chunk_size=3),
    "lse-float-floatbias-labels": lambda x, y: ops.similarity_lse(
        x, y, 2.0, -1.0, exclude="same_label", chunk_size=2, **_labels()),
    "lse-0d-rows-only": lambda x, y: ops.similarity_lse(x, y, scalar_tensor(3.0), cols=False),
    "lse-perrow-cols-only-diag-2": lambda x, y: ops.similarity_lse(
        x, y, row_scale(7, 2), exclude="diagonal", offset=-2, rows=False, chunk_size=4),
    "sigmoid-perrow-biastensor-diag-1": lambda x, y: ops.pairwise_sigmoid(
        x, y, row_scale(7, 3), scalar_tensor(-2.0), offset=-1, chunk_size=3),
    "sigmoid-0d-labels": lambda x, y: ops.pairwise_sigmoid(
        x, y, scalar_tensor(4.0), -3.0, positives="same_label", **_labels()),
    "sigmoid-float-nobias-none": lambda x, y: ops.pairwise_sigmoid(x, y, 1.5, positives="none", chunk_size=2),
    "sigmoid-sum-perrow-biastensor": lambda x, y: ops.pairwise_sigmoid(
        x, y, row_scale(7, 4), scalar_tensor(-1.0), reduction="sum", chunk_size=3),
    "sigmoid-sum-labels": lambda x, y: ops.pairwise_sigmoid(
        x, y, scalar_tensor(4.0), scalar_tensor(-1.0), positives="same_label", reduction="sum", **_labels()),
}


def _record(combination: str, backend: str = "torch"):
    """Run one combination forward and backward (random upstream weights) on ``backend``
    (what "auto" resolves to, via MMLOSS_BACKEND) under the recorder."""
    x, y = pair(7, 5, 3, seed=3)
    with pytest.MonkeyPatch.context() as mp, RecordMmlossOps() as recorder:
        mp.setenv("MMLOSS_BACKEND", backend)
        out = COMBINATIONS[combination](x, y)
        outs = [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None]
        g = torch.Generator().manual_seed(4)
        weights = [0.5 + torch.rand(t.shape, generator=g) for t in outs]
        torch.autograd.backward(outs, weights)
    return recorder.calls


def _fresh(arg, keep_grad: bool):
    if isinstance(arg, torch.Tensor):
        copy = arg.detach().clone()
        if keep_grad and arg.requires_grad and copy.is_floating_point():
            copy.requires_grad_(True)
        return copy
    return arg


@pytest.mark.parametrize("backend", list(OP_BACKENDS))
@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_opcheck(combination, backend):
    calls = _record(combination, backend)
    names = {_op_name(func) for func, _, _ in calls}
    assert names, f"no torch.ops.{OP_BACKENDS[backend]} op was reached"
    assert {func.namespace for func, _, _ in calls} == {OP_BACKENDS[backend]}
    for func, args, kwargs in calls:
        # Forward ops are checked with their inputs requiring grad (autograd registration and
        # the backward through AOT dispatch); backward ops with plain inputs, since their own
        # backward is the double-backward error by contract.
        keep_grad = not _op_name(func).endswith("_backward")
        fresh_args = [_fresh(a, keep_grad) for a in args]
        fresh_kwargs = {k: _fresh(v, keep_grad) for k, v in kwargs.items()}
        torch.library.opcheck(func, fresh_args, fresh_kwargs)


@pytest.mark.parametrize("backend", list(OP_BACKENDS))
def test_opcheck_covers_every_foundation_op(backend):
    reached = set()
    for combination in COMBINATIONS:
        reached |= {_op_name(func) for func, _, _ in _record(combination, backend)}
    namespace = getattr(torch.ops, OP_BACKENDS[backend])
    missing = {name for name in FOUNDATION_OPS if not hasattr(namespace, name)}
    assert not missing, f"not registered in torch.ops.{OP_BACKENDS[backend]}: {missing}"
    assert FOUNDATION_OPS <= reached, f"never exercised by opcheck: {FOUNDATION_OPS - reached}"


# ----------------------------------------------------------------------------- torch.compile


def _compare_compiled(compiled, eager, make_inputs, sizes):
    """make_inputs(n) returns (x, y, scale[, bias, ...]); the loss rule uses their logit bound."""
    for n in sizes:
        inputs = make_inputs(n)
        bound = logit_bound(inputs[0], inputs[1], inputs[2], inputs[3] if len(inputs) > 3 else None)
        eager_inputs = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
                        and t.is_floating_point() else t for t in inputs]
        got = compiled(*inputs)
        want = eager(*eager_inputs)
        assert_loss_close(got, want.double(), torch.float32, f"compiled vs eager (N={n})",
                          logit_bound=bound)
        leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        eager_leaves = [t for t in eager_inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        g = torch.Generator().manual_seed(n)
        w = 0.5 + torch.rand(got.shape, generator=g)
        got_grads = torch.autograd.grad((got * w).sum(), leaves)
        want_grads = torch.autograd.grad((want * w).sum(), eager_leaves)
        for i, (a, e) in enumerate(zip(got_grads, want_grads)):
            assert_grad_close(a, e.double(), torch.float32, f"compiled grad {i} (N={n})")


SIZES = (5, 9, 17, 33)


def test_compile_clip_loss():
    compiled = torch.compile(mmloss.clip_loss, fullgraph=True, dynamic=True)

    def make(n):
        x, y = pair(n, n, 67, seed=n)
        return x, y, scalar_tensor(14.0)

    _compare_compiled(compiled, mmloss.clip_loss, make, SIZES)


def test_compile_clip_loss_options():
    """label_smoothing, logit_bias and reduction="none" inside the compiled graph."""
    def loss(x, y, s, b):
        return mmloss.clip_loss(x, y, s, b, label_smoothing=0.1, reduction="none")

    compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend="aot_eager")

    def make(n):
        x, y = pair(n, n, 3, seed=n + 1)
        return x, y, scalar_tensor(10.0), scalar_tensor(-2.0)

    _compare_compiled(compiled, loss, make, SIZES[:3])


def test_compile_siglip_loss():
    compiled = torch.compile(mmloss.siglip_loss, fullgraph=True, dynamic=True)

    def make(n):
        x, y = pair(n, n, 67, seed=n + 2)
        return x, y, scalar_tensor(10.0), scalar_tensor(-10.0)

    _compare_compiled(compiled, mmloss.siglip_loss, make, SIZES)


def test_compile_siglip_label_pair():
    """N ≠ M with a label pair and reduction="none"."""
    def loss(x, y, s, b, xl, yl):
        return mmloss.siglip_loss(x, y, s, b, labels=(xl, yl), reduction="none")

    compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend="aot_eager")

    def make(n):
        x, y = pair(n, n + 4, 3, seed=n + 3)
        return x, y, scalar_tensor(10.0), scalar_tensor(-5.0), ids(n, 3, n), ids(n + 4, 3, n + 1)

    _compare_compiled(compiled, loss, make, SIZES[:3])


def test_compile_primitives():
    """similarity_lse with a per-row scale and bias tensor, and pairwise_sigmoid, compiled."""
    def stats(x, y, s, b):
        row, col = ops.similarity_lse(x, y, s, b, exclude="diagonal", offset=1)
        return torch.cat([row, col, ops.pairwise_sigmoid(x, y, s, b, offset=-1)])

    compiled = torch.compile(stats, fullgraph=True, dynamic=True, backend="aot_eager")

    def make(n):
        x, y = pair(n, n + 2, 3, seed=n + 4)
        return x, y, row_scale(n, n), scalar_tensor(0.5)

    _compare_compiled(compiled, stats, make, SIZES[:3])
