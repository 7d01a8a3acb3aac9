"""Kept logits (issue 12, "a memory budget that buys speed"): with ``mmloss.logit_budget(n)`` /
``MMLOSS_LOGIT_BUDGET`` the torch backend's ``similarity_lse`` keeps its N×M compute-dtype logits
from the forward when ``0 < N·M·elem ≤ budget`` and the backward forms its gradient from them
instead of recomputing them (docs/design.md, "Memory").

Checked here: values and gradients equal the budget-0 path (bit for bit: the same chunk plan
and the same GEMMs form S either way) and the float64 reference, for every mark mode, per-row
scale, bias, rows/cols subsets and ragged chunks; the exact budget threshold; a second
``retain_graph=True`` backward; ``torch.compile(fullgraph=True)``; that the kept path really
holds N×M bytes between forward and backward and the default path does not; and that the
backward then runs 2 GEMMs per chunk instead of 3.
"""
from __future__ import annotations

import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mmloss
from _foundation_helpers import ids, lse_vector, pair, row_scale, scalar_tensor, upstream
from memtrack import peak_bytes_above_start
from oracle import compare
from mmloss.ops import torch_chunked
from mmloss.ops._budget import current_logit_budget, parse_budget
from mmloss.ops._spec import PairSpec

ops = mmloss.ops
ref = mmloss.reference
BIG = 1 << 30  # admits every test problem


@pytest.fixture
def kept_log(monkeypatch):
    """Records, per torch-backend forward, whether it kept its logits (their shape)."""
    log = []
    real = torch_chunked.similarity_lse_forward

    def spy(spec, rows, cols):
        out = real(spec, rows, cols)
        log.append(tuple(out[4].shape))
        return out

    monkeypatch.setattr(torch_chunked, "similarity_lse_forward", spy)
    return log


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
            for t in tensors]


def _run(budget, x, y, scale, bias, weights, **kw):
    """(row, col, grads of x, y, scale, bias) of ⟨weights, [row, col]⟩ under ``budget``."""
    x, y, scale, bias = _leaves(x, y, scale, bias)
    with mmloss.logit_budget(budget):
        row, col = ops.similarity_lse(x, y, scale, bias, backend="torch", **kw)
    parts = [t for t in (row, col) if t is not None]
    out = torch.cat(parts)
    finite = torch.where(torch.isfinite(out), out, 0)
    (finite * weights.to(out.dtype)).sum().backward()
    grads = [t.grad if isinstance(t, torch.Tensor) else None for t in (x, y, scale, bias)]
    return row, col, grads


def _assert_same(a, b):
    """Bit-for-bit equality of two (row, col, grads) results."""
    for u, v in zip(a[:2] + tuple(a[2]), b[:2] + tuple(b[2])):
        if u is None or v is None:
            assert u is None and v is None
        else:
            assert torch.equal(u, v), (u - v).abs().max()


MARKS = {
    "none": dict(exclude="none"),
    "diag": dict(exclude="diagonal"),
    "diag+5": dict(exclude="diagonal", offset=5),
    "diag-3": dict(exclude="diagonal", offset=-3),
    "same_label": dict(exclude="same_label", x_labels=ids(29, 5, 1), y_labels=ids(23, 4, 2)),
}
SCALES = {"float": lambda: 4.0, "0d": lambda: scalar_tensor(5.0), "per_row": lambda: row_scale(29, 3)}
BIASES = {"none": lambda: None, "float": lambda: -0.5, "tensor": lambda: scalar_tensor(0.7)}
DIRECTIONS = {"both": dict(), "rows": dict(cols=False), "cols": dict(rows=False)}


@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("bias", list(BIASES))
@pytest.mark.parametrize("scale", list(SCALES))
@pytest.mark.parametrize("mark", list(MARKS))
def test_kept_equals_default_and_reference(kept_log, mark, scale, bias, direction):
    # 29 rows in chunks of 8 (8+8+8+5: ragged), fp32
    x, y = pair(29, 23, 6, seed=7)
    s, b = SCALES[scale](), BIASES[bias]()
    kw = dict(chunk_size=8, **MARKS[mark], **DIRECTIONS[direction])
    n_out = (29 if kw.get("rows", True) else 0) + (23 if kw.get("cols", True) else 0)
    w = upstream(n_out, 11)
    kept = _run(BIG, x, y, s, b, w, **kw)
    default = _run(0, x, y, s, b, w, **kw)
    assert kept_log == [(29, 23), (0,)]
    _assert_same(kept, default)
    with mmloss.logit_budget(BIG):  # and against the float64 dense reference
        compare(lse_vector(ops.similarity_lse, backend="torch", **kw),
                lse_vector(ref.similarity_lse, **{k: v for k, v in kw.items() if k != "chunk_size"}),
                _leaves(x, y, s, b), torch.float32, what="similarity_lse kept", weights=w)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_kept_other_dtypes(kept_log, dtype):
    # fp64 keeps fp64 logits (8 bytes each); half inputs keep fp32 logits
    x, y = pair(13, 17, 5, dtype=dtype, seed=2)
    w = upstream(30, 3)
    kw = dict(exclude="diagonal", offset=1, chunk_size=4)
    _assert_same(_run(BIG, x, y, scalar_tensor(3.0), 0.25, w, **kw), _run(0, x, y, scalar_tensor(3.0), 0.25, w, **kw))
    assert kept_log == [(13, 17), (0,)]
    with mmloss.logit_budget(13 * 17 * 4):
        ops.similarity_lse(x, y, 3.0, backend="torch")
    elem = 8 if dtype == torch.float64 else 4
    assert kept_log[-1] == ((13, 17) if elem == 4 else (0,))


def test_threshold_is_n_m_elem(kept_log):
    x, y = pair(10, 7, 3, seed=1)
    size = 10 * 7 * 4
    for budget, shape in ((size - 1, (0,)), (size, (10, 7)), (size + 1, (10, 7)), (0, (0,))):
        with mmloss.logit_budget(budget):
            ops.similarity_lse(x, y, 2.0, backend="torch")
        assert kept_log[-1] == shape, budget


def test_no_keeping_without_gradients(kept_log):
    x, y = pair(10, 7, 3, seed=1)
    with mmloss.logit_budget(BIG):
        with torch.no_grad():
            ops.similarity_lse(x, y, 2.0, backend="torch")
        ops.similarity_lse(x.detach(), y.detach(), 2.0, backend="torch")
    assert kept_log == [(0,), (0,)]


def test_retain_graph_second_backward_is_right():
    # the backward only reads the saved logits: a second backward gives the same gradients
    x, y = pair(21, 18, 4, seed=5)
    s = scalar_tensor(6.0)
    w = upstream(39, 2).float()
    with mmloss.logit_budget(BIG):
        row, col = ops.similarity_lse(x, y, s, exclude="diagonal", backend="torch", chunk_size=5)
    loss = (torch.cat([row, col]) * w).sum()
    first = torch.autograd.grad(loss, (x, y, s), retain_graph=True)
    second = torch.autograd.grad(loss, (x, y, s), retain_graph=True)
    third = torch.autograd.grad(loss, (x, y, s))
    row0, col0 = ops.similarity_lse(x, y, s, exclude="diagonal", backend="torch", chunk_size=5)
    want = torch.autograd.grad((torch.cat([row0, col0]) * w).sum(), (x, y, s))
    for a, b, c, e in zip(first, second, third, want):
        assert torch.equal(a, e) and torch.equal(b, e) and torch.equal(c, e)


def test_kept_logits_are_the_masked_matrix():
    # the op's last output is S = s·x·yᵀ with excluded pairs −inf and no bias
    x, y = pair(6, 8, 3, seed=4, dtype=torch.float64)
    labels_x, labels_y = ids(6, 3, 5), ids(8, 3, 6)
    out = torch.ops.mmloss.similarity_lse(x, y, None, 2.5, None, 1.0, "same_label", 0, labels_x, labels_y,
                                          True, True, "torch", 0, True, BIG)
    want = (2.5 * x @ y.T).masked_fill(labels_x[:, None] == labels_y[None, :], float("-inf"))
    torch.testing.assert_close(out[4], want, rtol=1e-12, atol=1e-12)


def test_opcheck_with_a_budget():
    x, y = pair(9, 7, 3, seed=8)
    s, b = scalar_tensor(2.0), scalar_tensor(-0.5)
    for budget in (0, 9 * 7 * 4):
        args = (x, y, s, 0.0, b, 0.0, "diagonal", 1, None, None, True, True, "torch", 4, True, budget)
        torch.library.opcheck(torch.ops.mmloss.similarity_lse.default, args)


def test_compiled_fullgraph_keeps_and_matches(kept_log):
    torch._dynamo.reset()
    x, y = pair(12, 10, 4, seed=9)
    s = scalar_tensor(4.0)

    def loss(x, y, s):
        row, col = ops.similarity_lse(x, y, s, exclude="diagonal", backend="torch")
        return row.mean() + col.mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    with mmloss.logit_budget(BIG):  # read while tracing: a constant of the compiled graph
        got = compiled(x, y, s)
        got_grads = torch.autograd.grad(got, (x, y, s))
    assert (12, 10) in kept_log
    want = loss(x, y, s)
    want_grads = torch.autograd.grad(want, (x, y, s))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, e in zip(got_grads, want_grads):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


def test_memory_kept_holds_n_by_m_default_does_not():
    n = m = 384
    matrix = n * m * 4
    x, y = pair(n, m, 16, seed=3)
    held = {}

    def forward(budget):
        def fn():
            with mmloss.logit_budget(budget):
                held[budget] = ops.similarity_lse(x, y, 10.0, exclude="diagonal", backend="torch")
        return fn

    _, end_kept = peak_bytes_above_start(forward(matrix))
    _, end_default = peak_bytes_above_start(forward(0))
    assert end_kept >= matrix, end_kept           # the logits stay alive until the backward
    assert end_default < matrix // 16, end_default  # only O(N + M) statistics stay
    # the backward frees them
    row, col = held.pop(matrix)
    peak_bwd, end_bwd = peak_bytes_above_start(lambda: (row.sum() + col.sum()).backward())
    assert end_bwd < 0 and -end_bwd >= matrix - 2 * n * 16 * 4, end_bwd


class CountGemms(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("chunk", [0, 7])
def test_backward_with_kept_logits_makes_two_gemms_per_chunk(chunk):
    x, y = (t.detach() for t in pair(30, 20, 5, seed=6))
    spec = PairSpec(x, y, None, 3.0, None, 0.0, "diagonal", 0, None, None, chunk, True, BIG)
    chunks = len(list(torch_chunked.ChunkedLogits(spec, True).ranges()))
    row, col, rs, cs, kept = torch_chunked.similarity_lse_forward(spec, True, True)
    assert kept.shape == (30, 20)
    saved = kept.clone()
    needs = (True, True, False, False)
    counts = {}
    results = {}
    for name, logits in (("kept", kept), ("recompute", kept.new_empty(0))):
        with CountGemms() as mode:
            results[name] = torch_chunked.similarity_lse_backward(spec, torch.ones(30), torch.ones(20), rs, cs,
                                                                  logits, needs)
        counts[name] = mode.count
    assert counts == {"kept": 2 * chunks, "recompute": 3 * chunks}
    assert torch.equal(kept, saved)  # read, never overwritten
    for a, b in zip(results["kept"][:2], results["recompute"][:2]):
        assert torch.equal(a, b)


def test_backward_rejects_mismatched_logits():
    x, y = pair(5, 4, 3, seed=1)
    spec = PairSpec(x.detach(), y.detach(), None, 1.0, None, 0.0, "none", 0, None, None, 0, True, 0)
    _, _, rs, cs, _ = torch_chunked.similarity_lse_forward(spec, True, True)
    with pytest.raises(ValueError, match="kept logits must be"):
        torch_chunked.similarity_lse_backward(spec, torch.ones(5), None, rs, cs, torch.zeros(4, 5),
                                              (True, False, False, False))


# ----------------------------------------------------------------------------- the knob


def test_env_context_and_threads(monkeypatch):
    monkeypatch.delenv("MMLOSS_LOGIT_BUDGET", raising=False)
    assert current_logit_budget() == 0
    monkeypatch.setenv("MMLOSS_LOGIT_BUDGET", "80MiB")
    assert current_logit_budget() == 80 << 20
    seen = []
    with mmloss.logit_budget("1KiB") as value:
        assert value == 1024 and current_logit_budget() == 1024
        with mmloss.logit_budget(0):
            assert current_logit_budget() == 0
        assert current_logit_budget() == 1024
        # another thread sees the environment, not this thread's context
        t = threading.Thread(target=lambda: seen.append(current_logit_budget()))
        t.start()
        t.join()
    assert seen == [80 << 20]
    assert current_logit_budget() == 80 << 20


def test_env_budget_reaches_the_op(monkeypatch, kept_log):
    monkeypatch.setenv("MMLOSS_LOGIT_BUDGET", str(10 * 7 * 4))
    x, y = pair(10, 7, 3, seed=1)
    ops.similarity_lse(x, y, 2.0, backend="torch")
    assert kept_log == [(10, 7)]


def test_bad_budgets(monkeypatch):
    for bad in ("-1", "lots", "MiB"):
        with pytest.raises(ValueError):
            parse_budget(bad)
    with pytest.raises(ValueError):
        with mmloss.logit_budget(-5):
            pass
    with pytest.raises(TypeError):
        with mmloss.logit_budget(1.5):
            pass
    with pytest.raises(TypeError):
        with mmloss.logit_budget(True):
            pass
    monkeypatch.setenv("MMLOSS_LOGIT_BUDGET", "eighty")
    x, y = pair(4, 4, 2, seed=0)
    with pytest.raises(ValueError, match="MMLOSS_LOGIT_BUDGET"):
        ops.similarity_lse(x, y, 2.0, backend="torch")
