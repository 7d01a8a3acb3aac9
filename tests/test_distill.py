"""docs/losses.md §13–§15: ContrastiveDistillLoss / DistillClipLoss, ModXLoss, CyCLIPLoss,
ScoreDistillLoss against the float64 reference, peers' code and closed forms."""
from __future__ import annotations

import importlib.util
import os
import weakref

import pytest
import torch
import torch.nn.functional as TF
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from oracle import assert_grad_close, assert_loss_close, compare, features, grads, oracle

import mmloss
from mmloss import functional as F
from mmloss import reference as R
from mmloss.losses import (
    ContrastiveDistillLoss,
    CyCLIPLoss,
    DistillClipLoss,
    ModXLoss,
    ScoreDistillLoss,
)

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16


def _scale(value, dtype):
    return torch.tensor(value, dtype=F64 if dtype == F64 else F32, requires_grad=True)


def _pair(n, m, d, dtype, seed, *, requires_grad=True, noncontig=False):
    return (features(n, d, dtype=dtype, seed=seed, requires_grad=requires_grad, noncontig=noncontig),
            features(m, d, dtype=dtype, seed=seed + 1, requires_grad=requires_grad, noncontig=noncontig))


def _old_model(x, y, noise, seed, d_old=None):
    """A previous model's features: the current ones plus noise (most argmaxes on the diagonal)."""
    g = torch.Generator().manual_seed(seed)
    d = x.shape[1] if d_old is None else d_old

    def near(t):
        base = t.detach().double()
        base = base[:, :d] if d <= base.shape[1] else TF.pad(base, (0, d - base.shape[1]))
        return TF.normalize(base + noise * torch.randn(base.shape, generator=g, dtype=F64), dim=1).to(t.dtype)

    return near(x), near(y)


# ----------------------------------------------------------------------------- §13 distillation

DISTILL_SHAPES = [(1, 1, 1, 1), (37, 23, 3, 67), (23, 37, 130, 1), (29, 29, 67, 3)]


@pytest.mark.parametrize("n,m,d,dt", DISTILL_SHAPES)
@pytest.mark.parametrize("cross_entropy", [True, False])
def test_contrastive_distill_fp64(n, m, d, dt, cross_entropy):
    x, y = _pair(n, m, d, F64, 0)
    xt, yt = _pair(n, m, dt, F64, 10, requires_grad=False)
    compare(lambda *a: F.contrastive_distill_loss(*a, cross_entropy=cross_entropy, backend="torch"),
            lambda *a: R.contrastive_distill_loss(*a, cross_entropy=cross_entropy),
            (x, y, _scale(12.0, F64), xt, yt, 20.0), F64)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_contrastive_distill_fp32_bf16_noncontiguous(dtype):
    x, y = _pair(37, 23, 67, dtype, 1, noncontig=True)
    xt, yt = _pair(37, 23, 3, dtype, 11, requires_grad=False)
    out, _ = compare(lambda *a: F.contrastive_distill_loss(*a, backend="torch"), R.contrastive_distill_loss,
                     (x, y, _scale(10.0, F32), xt, yt, torch.tensor(30.0)), dtype)
    assert out.dtype == F32


def test_contrastive_distill_kl_is_zero_for_the_teacher_itself():
    x, y = _pair(29, 29, 8, F32, 2)
    loss = F.contrastive_distill_loss(x, y, 10.0, x, y, 10.0, cross_entropy=False)
    assert float(loss.detach()) == 0.0
    ce = F.contrastive_distill_loss(x, y, 10.0, x, y, 10.0)
    L = 10.0 * x.detach().double() @ y.detach().double().T
    entropy = lambda A: -(A.softmax(1) * A.log_softmax(1)).sum(1).mean()  # noqa: E731
    assert_loss_close(ce, 0.5 * (entropy(L) + entropy(L.T)), F32, "teacher entropy")


def test_contrastive_distill_module_matches_function():
    x, y = _pair(13, 11, 5, F64, 3)
    xt, yt = _pair(13, 11, 7, F64, 13, requires_grad=False)
    module = ContrastiveDistillLoss(cross_entropy=False, backend="torch")
    assert module.distributed is None
    assert_loss_close(module(x, y, 5.0, xt, yt, 9.0),
                      F.contrastive_distill_loss(x, y, 5.0, xt, yt, 9.0, cross_entropy=False), F64)


def _open_clip_loss_module():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed (its loss.py is the DistillClipLoss oracle)")
    path = os.path.join(spec.submodule_search_locations[0], "loss.py")
    loader_spec = importlib.util.spec_from_file_location("_open_clip_loss_for_tests", path)
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", [F64, F32])
def test_distill_clip_loss_matches_open_clip(dtype):
    """Values and student gradients of both terms equal open_clip's DistillClipLoss (run in
    float64 on the same inputs); teacher D differs from the student's."""
    open_clip_loss = _open_clip_loss_module()
    x, y = _pair(29, 29, 67, dtype, 4)
    xt, yt = _pair(29, 29, 3, dtype, 14, requires_grad=False)
    s = _scale(14.0, dtype)
    ours = DistillClipLoss(backend="torch")(x, y, s, xt, yt, torch.tensor(25.0))
    leaves = [oracle(t) for t in (x, y, s)]
    theirs = open_clip_loss.DistillClipLoss()(*leaves, xt.double(), yt.double(), torch.tensor(25.0, dtype=F64))
    for a, b, what in zip(ours, theirs, ("contrastive_loss", "distill_loss")):
        assert_loss_close(a, b, dtype, what)
        for g_a, g_b in zip(grads(a, (x, y, s)), torch.autograd.grad(b, leaves, retain_graph=True)):
            assert_grad_close(g_a, g_b, dtype, f"{what} gradient")


def test_distill_clip_loss_output_dict_and_constructor():
    x, y = _pair(9, 9, 4, F32, 6)
    xt, yt = _pair(9, 9, 4, F32, 16, requires_grad=False)
    module = DistillClipLoss(False, False, False, 0, 1, False, backend="torch")
    out = module(x, y, 10.0, xt, yt, 10.0, output_dict=True)
    assert set(out) == {"contrastive_loss", "distill_loss"}
    contrastive, distill = module(x, y, 10.0, xt, yt, 10.0)
    assert_loss_close(out["contrastive_loss"], contrastive, F32)
    assert_loss_close(out["distill_loss"], distill, F32)
    assert_loss_close(contrastive, F.clip_loss(x, y, 10.0), F32)
    with pytest.raises(ValueError, match="Horovod"):
        DistillClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="as many texts"):
        module(x, y[:8], 10.0, xt, yt[:8], 10.0)


# ----------------------------------------------------------------------------- §13 ModX


def _authors_modx(x, y, logit_scale, x_old, y_old, alpha):
    """The Mod-X script's computation, dense (old rows whose argmax misses the diagonal are
    replaced by the new model's rows, KL with reduction='sum')."""
    def align(old, new):
        old = old.clone()
        wrong = old.argmax(dim=1) != torch.arange(old.shape[0])
        old[wrong] = new[wrong]
        return old

    per_image, per_text = x @ y.T, y @ x.T
    old_image, old_text = align(x_old @ y_old.T, per_image), align(y_old @ x_old.T, per_text)
    kl_image = TF.kl_div(per_image.softmax(-1).log(), old_image.softmax(-1), reduction="sum")
    kl_text = TF.kl_div(per_text.softmax(-1).log(), old_text.softmax(-1), reduction="sum")
    labels = torch.arange(x.shape[0])
    clip = (TF.cross_entropy(logit_scale * per_image, labels) + TF.cross_entropy(logit_scale * per_text, labels)) / 2
    return clip + alpha * (kl_image + kl_text) / 2


@pytest.mark.parametrize("n,d", [(1, 3), (37, 67), (29, 130)])
def test_modx_fp64_matches_reference_and_authors(n, d):
    x, y = _pair(n, n, d, F64, 20)
    x_old, y_old = _old_model(x, y, 0.6, seed=21)
    s = _scale(10.0, F64)
    compare(lambda *a: F.modx_loss(*a, backend="torch"), R.modx_loss, (x, y, s, x_old, y_old, 20.0), F64)
    keep = R.distill._diagonal_is_argmax(x_old, y_old)
    if n > 1:
        assert 0 < int(keep.sum()) < n  # both kinds of rows occur
    leaves = [oracle(t) for t in (x, y, s)]
    authors = _authors_modx(*leaves, x_old, y_old, 20.0)
    ours = F.modx_loss(x, y, s, x_old, y_old, 20.0, backend="torch")
    assert_loss_close(ours, authors, F64, "vs the authors' script")
    for a, b in zip(grads(ours, (x, y, s)), torch.autograd.grad(authors, leaves)):
        assert_grad_close(a, b, F64, "vs the authors' script")


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_modx_fp32_bf16_other_old_dim(dtype):
    x, y = _pair(37, 37, 67, dtype, 22, noncontig=True)
    x_old, y_old = _old_model(x, y, 0.5, seed=23, d_old=5)
    compare(lambda *a: F.modx_loss(*a, backend="torch"), R.modx_loss,
            (x, y, _scale(10.0, F32), x_old, y_old, 3.0), dtype)


def test_modx_closed_forms():
    x, y = _pair(17, 17, 6, F32, 24)
    clip = F.clip_loss(x, y, 10.0)
    assert_loss_close(F.modx_loss(x, y, 10.0, x, y), clip, F32, "old model = new model")
    x_old, y_old = _old_model(x, y, 0.5, seed=25)
    assert_loss_close(F.modx_loss(x, y, 10.0, x_old, y_old, alpha=0.0), clip, F32, "alpha = 0")
    module = ModXLoss(alpha=7.0, backend="torch")
    assert module.distributed is None
    assert_loss_close(module(x, y, 10.0, x_old, y_old), F.modx_loss(x, y, 10.0, x_old, y_old, 7.0), F32)


def test_modx_argmax_ties_follow_torch_max():
    """Exact ties in the old matrix: row i is kept only if the diagonal is the first maximum."""
    base = features(4, 3, dtype=F64, seed=26, requires_grad=False)
    x_old = base.clone()
    y_old = base.clone()
    y_old[0] = base[2]          # row 2 ties between columns 0 and 2 → first max is 0: dropped
    y_old[3] = base[1]          # row 1 ties between columns 1 and 3 → first max is 1: kept
    x, y = _pair(4, 4, 3, F64, 27)
    compare(lambda *a: F.modx_loss(*a, backend="torch"), R.modx_loss, (x, y, _scale(5.0, F64), x_old, y_old), F64)
    keep = F.distill._diagonal_is_argmax(x_old, y_old)
    assert keep.tolist() == (x_old @ y_old.T).argmax(dim=1).eq(torch.arange(4)).tolist()
    assert keep[1] and not keep[2]
    leaves = [oracle(t) for t in (x, y)]
    assert_loss_close(F.modx_loss(x, y, 5.0, x_old, y_old), _authors_modx(*leaves, 5.0, x_old, y_old, 20.0), F64)


# ----------------------------------------------------------------------------- §14 CyCLIP


@pytest.mark.parametrize("n,d", [(1, 1), (37, 3), (23, 130)])
def test_cyclip_fp64(n, d):
    x, y = _pair(n, n, d, F64, 30)
    compare(lambda *a: F.cyclip_loss(*a, backend="torch"), R.cyclip_loss, (x, y, _scale(10.0, F64), 0.3, 0.7), F64)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_cyclip_fp32_bf16_noncontiguous(dtype):
    x, y = _pair(37, 37, 67, dtype, 31, noncontig=True)
    out, _ = compare(lambda *a: F.cyclip_loss(*a, backend="torch"), R.cyclip_loss, (x, y, _scale(10.0, F32)), dtype)
    assert out.dtype == F32


def test_cyclip_near_identical_views_keep_precision():
    """X ≈ Y (late training): the Gram identities cancel; float64 accumulation keeps the
    fp32 loss and gradients at the float64 reference's accuracy."""
    x = features(41, 16, dtype=F32, seed=32)
    noise = 1e-3 * features(41, 16, dtype=F32, seed=33, requires_grad=False)
    y = (x.detach() + noise).requires_grad_(True)
    cyclic = lambda a, b: F.cyclip_loss(a, b, 10.0, backend="torch") - F.clip_loss(a, b, 10.0)  # noqa: E731
    ref = lambda a, b: R.cyclip_loss(a, b, 10.0) - R.clip_loss(a, b, 10.0)  # noqa: E731
    out, expected = compare(cyclic, ref, (x, y), F32, "cyclic terms")
    assert 0 < float(expected.detach()) < 1e-3


def test_cyclip_closed_forms():
    x, y = _pair(19, 19, 5, F64, 34)
    clip = F.clip_loss(x, y, 10.0)
    assert_loss_close(F.cyclip_loss(x, y, 10.0, 0.0, 0.0), clip, F64, "lambdas 0")
    assert_loss_close(F.cyclip_loss(x, x, 10.0), F.clip_loss(x, x, 10.0), F64, "X = Y")
    module = CyCLIPLoss(lambda_in=0.5, lambda_cross=0.1, backend="torch")
    assert module.distributed is None
    assert_loss_close(module(x, y, 10.0), F.cyclip_loss(x, y, 10.0, 0.5, 0.1), F64)


# ----------------------------------------------------------------------------- §15 score distillation


def _scores(b, c, dtype, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(b, c, generator=g, dtype=F64)).to(dtype).requires_grad_(requires_grad)


@pytest.mark.parametrize("b,c", [(1, 1), (7, 5), (13, 2)])
def test_score_distill_fp64(b, c):
    u, t = _scores(b, c, F64, 40), _scores(b, c, F64, 41, False)
    positive = c - 1
    compare(lambda *a: F.score_distill_loss(*a), R.score_distill_loss, (u, t, positive, 0.3), F64)


@pytest.mark.parametrize("dtype", [F32, torch.float16])
def test_score_distill_dtypes_and_positive_tensor(dtype):
    u, t = _scores(9, 6, dtype, 42), _scores(9, 6, dtype, 43, False)
    positive = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2])
    out, _ = compare(lambda *a: F.score_distill_loss(*a), R.score_distill_loss, (u, t, positive), dtype)
    assert out.dtype == F32


def test_score_distill_closed_forms():
    u, t = _scores(6, 4, F64, 44), _scores(6, 4, F64, 45, False)
    assert_loss_close(F.score_distill_loss(u, t, alpha=1.0), ((t - u) ** 2).mean(), F64, "alpha = 1")
    # Equal teacher rows share the entropy equally: the BCE term is the plain mean over rows.
    same = t[:1].expand(6, 4)
    target = torch.zeros(6, 4, dtype=F64)
    target[:, 2] = 1
    bce = TF.binary_cross_entropy_with_logits(u, target)
    assert_loss_close(F.score_distill_loss(u, same, 2, alpha=0.0), bce, F64, "equal teacher rows")
    # One candidate: every teacher entropy is 0 → uniform weights, no NaN.
    one = F.score_distill_loss(u[:, :1], t[:, :1], 0, 0.5)
    assert torch.isfinite(one)
    (gu,) = torch.autograd.grad(one, u)
    assert torch.isfinite(gu).all()


def test_score_distill_teacher_gets_no_gradient_and_module():
    u, t = _scores(5, 3, F32, 46), _scores(5, 3, F32, 47)
    module = ScoreDistillLoss(alpha=0.4)
    assert module.distributed is None
    loss = module(u, t, 1)
    loss.backward()
    assert t.grad is None and u.grad is not None
    assert_loss_close(loss, F.score_distill_loss(u, t, 1, 0.4), F32)


# ----------------------------------------------------------------------------- every option at once


def test_every_non_default_option():
    x, y = _pair(23, 23, 67, F32, 50, noncontig=True)
    xt, yt = _pair(23, 23, 3, BF16, 51, requires_grad=False)
    s = _scale(9.0, F32)
    compare(lambda *a: F.contrastive_distill_loss(*a, cross_entropy=False, backend="torch"),
            lambda *a: R.contrastive_distill_loss(*a, cross_entropy=False), (x, y, s, xt, yt, torch.tensor(4.0)), F32)
    module = DistillClipLoss(label_smoothing=0.1, distributed=None, backend="torch")
    contrastive, _ = module(x, y, s, xt, yt, 4.0)
    assert_loss_close(contrastive, R.clip_loss(oracle(x), oracle(y), 9.0, label_smoothing=0.1), F32)
    compare(lambda *a: F.modx_loss(*a, backend="torch"), R.modx_loss,
            (x, y, s, *_old_model(x, y, 0.5, 52, d_old=3), 2.0), F32)
    compare(lambda *a: F.cyclip_loss(*a, backend="torch"), R.cyclip_loss, (x, y, s, 0.1, 0.9), F32)
    u, t = _scores(6, 5, F32, 53), _scores(6, 5, BF16, 54, False)
    compare(F.score_distill_loss, R.score_distill_loss, (u, t, torch.arange(6) % 5, 0.7), F32)


def test_reference_backend_passthrough():
    x, y = _pair(9, 9, 4, F64, 55)
    xt, yt = _pair(9, 9, 3, F64, 56, requires_grad=False)
    assert_loss_close(F.contrastive_distill_loss(x, y, 3.0, xt, yt, 4.0, backend="reference"),
                      F.contrastive_distill_loss(x, y, 3.0, xt, yt, 4.0, backend="torch"), F64)
    assert_loss_close(F.modx_loss(x, y, 3.0, xt, yt, backend="reference"),
                      F.modx_loss(x, y, 3.0, xt, yt, backend="torch"), F64)


def test_exported_names():
    for name in ("contrastive_distill_loss", "modx_loss", "cyclip_loss", "score_distill_loss",
                 "ContrastiveDistillLoss", "DistillClipLoss", "ModXLoss", "CyCLIPLoss", "ScoreDistillLoss"):
        assert hasattr(mmloss, name), name
    for name in ("contrastive_distill_loss", "modx_loss", "cyclip_loss", "score_distill_loss",
                 "similarity_kl", "similarity_topk"):
        assert hasattr(R, name), name


# ----------------------------------------------------------------------------- bad inputs


def _student_teacher(n=5, m=5):
    x, y = _pair(n, m, 3, F32, 60)
    xt, yt = _pair(n, m, 2, F32, 61, requires_grad=False)
    return x, y, xt, yt


def test_error_distill_teacher_rows():
    x, y, xt, yt = _student_teacher()
    with pytest.raises(ValueError, match="teacher features must cover the same batch"):
        F.contrastive_distill_loss(x, y, 1.0, xt[:4], yt, 1.0)


def test_error_distill_nonpositive_scale():
    x, y, xt, yt = _student_teacher()
    with pytest.raises(ValueError, match="teacher_logit_scale must be > 0"):
        F.contrastive_distill_loss(x, y, 1.0, xt, yt, 0.0)


def test_error_distill_scale_type():
    x, y, xt, yt = _student_teacher()
    with pytest.raises(TypeError, match="logit_scale"):
        F.contrastive_distill_loss(x, y, "1", xt, yt, 1.0)


def test_error_distill_teacher_dims_differ():
    x, y, xt, yt = _student_teacher()
    with pytest.raises(ValueError, match="same feature"):
        F.contrastive_distill_loss(x, y, 1.0, xt, torch.randn(5, 4), 1.0)


def test_error_modx_rectangular():
    x, y, xt, yt = _student_teacher(5, 4)
    with pytest.raises(ValueError, match="as many texts"):
        F.modx_loss(x, y, 1.0, xt, yt)


def test_error_modx_negative_alpha():
    x, y, xt, yt = _student_teacher()
    with pytest.raises(ValueError, match="alpha"):
        F.modx_loss(x, y, 1.0, xt, yt, alpha=-1.0)


def test_error_modx_old_rows():
    x, y, xt, yt = _student_teacher()
    with pytest.raises(ValueError, match="old-model features"):
        F.modx_loss(x, y, 1.0, xt[:3], yt[:3])


def test_error_modx_module_alpha_type():
    with pytest.raises(TypeError, match="alpha"):
        ModXLoss(alpha="20")


def test_error_cyclip_rectangular():
    x, y, _, _ = _student_teacher(5, 4)
    with pytest.raises(ValueError, match="as many texts"):
        F.cyclip_loss(x, y, 1.0)


def test_error_cyclip_negative_lambda():
    x, y, _, _ = _student_teacher()
    with pytest.raises(ValueError, match="lambda_cross"):
        F.cyclip_loss(x, y, 1.0, 0.25, -0.1)


def test_error_cyclip_module_lambda():
    with pytest.raises(ValueError, match="lambda_in"):
        CyCLIPLoss(lambda_in=float("inf"))


def test_error_score_shapes():
    with pytest.raises(ValueError, match="same shape"):
        F.score_distill_loss(torch.randn(4, 3), torch.randn(4, 2))


def test_error_score_one_dimensional():
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        F.score_distill_loss(torch.randn(4), torch.randn(4))


def test_error_score_positive_index_range():
    with pytest.raises(ValueError, match="positive_index"):
        F.score_distill_loss(torch.randn(4, 3), torch.randn(4, 3), 3)


def test_error_score_positive_index_tensor_range():
    with pytest.raises(ValueError, match="positive_index"):
        F.score_distill_loss(torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))


def test_error_score_alpha():
    with pytest.raises(ValueError, match="alpha"):
        ScoreDistillLoss(alpha=1.5)


def test_error_score_integer_scores():
    with pytest.raises(TypeError, match="student_scores"):
        F.score_distill_loss(torch.ones(4, 3, dtype=torch.long), torch.randn(4, 3))


def test_error_module_backend():
    with pytest.raises(ValueError, match="backend"):
        ContrastiveDistillLoss(backend="gpu")


# ----------------------------------------------------------------------------- memory


class _AllocationTracker(TorchDispatchMode):
    """Deterministic allocation tracking: every tensor any op produces (inside mmloss custom
    ops too), the largest one, and the peak of live storage bytes created under the mode."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.live = 0
        self.peak = 0
        self._storages = {}   # data_ptr → [live tensors, nbytes]
        self._tensors = {}    # id(tensor) → data_ptr

    def _release(self, tensor_id):
        key = self._tensors.pop(tensor_id, None)
        if key is None:
            return
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[key]

    def _track(self, t, external):
        if id(t) in self._tensors:
            return
        self.largest = max(self.largest, t.numel())
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key in self._storages:
            self._storages[key][0] += 1
        elif key in external or nbytes == 0:
            return  # a view of memory that existed before the mode
        else:
            self._storages[key] = [1, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self._tensors[id(t)] = key
        weakref.finalize(t, self._release, id(t))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "mmloss":
            # Run the custom op's Python body under the mode so its inner allocations count.
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        external = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, external)
        return out


def _memory_cases(n, d):
    """name → (tensors that receive gradients, forward closure, whether the largest-tensor
    bound applies: the score loss's own (B, C) = (N, M) gradient is allowed)."""
    x, y = _pair(n, n, d, F32, 70)
    xt, yt = _pair(n, n, d + 3, F32, 71, requires_grad=False)
    s = _scale(10.0, F32)
    x_old, y_old = _old_model(x, y, 0.3, 72)
    u, t = _scores(n, n, F32, 73), _scores(n, n, F32, 74, False)
    leaves = (x, y, s)
    return {
        "contrastive_distill_loss": (leaves, lambda: F.contrastive_distill_loss(x, y, s, xt, yt, 20.0, backend="torch"),
                                     True),
        "DistillClipLoss": (leaves, lambda: sum(DistillClipLoss(backend="torch")(x, y, s, xt, yt, 20.0)), True),
        "modx_loss": (leaves, lambda: F.modx_loss(x, y, s, x_old, y_old, backend="torch"), True),
        "cyclip_loss": (leaves, lambda: F.cyclip_loss(x, y, s, backend="torch"), True),
        "score_distill_loss": ((u,), lambda: F.score_distill_loss(u, t, 1), False),
    }


def test_no_loss_builds_an_n_by_m_tensor_and_peak_is_bounded():
    """N = M = 2048: no op (inside the custom ops too) produces a tensor of more than N·M/16
    elements, and forward + backward holds at most 10 % of one N×M fp32 matrix beyond the
    gradients (the default workspace is 1/16 of it). Score distillation's B×C input plays the
    N×M role: its temporaries stay within the same bound."""
    n, d = 2048, 16
    for name, (leaves, run, bound_largest) in _memory_cases(n, d).items():
        with _AllocationTracker() as tracker:
            run().backward()
        gradient_bytes = sum(t.grad.untyped_storage().nbytes() for t in leaves)
        if bound_largest:
            assert tracker.largest <= n * n // 16, f"{name}: a tensor of {tracker.largest} elements"
        extra = tracker.peak - gradient_bytes
        assert extra <= 0.10 * n * n * 4, f"{name}: {extra} bytes above the gradients"


# ----------------------------------------------------------------------------- distributed keywords (one process)
# The gathered results themselves are checked by tests/distributed (spawned gloo ranks).


def _distill_calls():
    """name → call(**distributed keywords) of every distillation-family function and module."""
    x, y, xt, yt = _student_teacher()
    u, t = _scores(5, 3, F32, 62), _scores(5, 3, F32, 63, False)
    return {
        "contrastive_distill_loss": lambda **kw: F.contrastive_distill_loss(x, y, 2.0, xt, yt, 3.0, **kw),
        "modx_loss": lambda **kw: F.modx_loss(x, y, 2.0, xt, yt, **kw),
        "cyclip_loss": lambda **kw: F.cyclip_loss(x, y, 2.0, **kw),
        "score_distill_loss": lambda **kw: F.score_distill_loss(u, t, 1, **kw),
        "ContrastiveDistillLoss": lambda **kw: ContrastiveDistillLoss(**kw)(x, y, 2.0, xt, yt, 3.0),
        "DistillClipLoss": lambda **kw: sum(DistillClipLoss(**kw)(x, y, 2.0, xt, yt, 3.0)),
        "ModXLoss": lambda **kw: ModXLoss(**kw)(x, y, 2.0, xt, yt),
        "CyCLIPLoss": lambda **kw: CyCLIPLoss(**kw)(x, y, 2.0),
        "ScoreDistillLoss": lambda **kw: ScoreDistillLoss(**kw)(u, t, 1),
    }


@pytest.mark.parametrize("name", list(_distill_calls()))
def test_distributed_keywords_without_a_process_group(name):
    """"auto" without a process group is the local loss, bit for bit; "gather" needs a process
    group (RuntimeError); "ring" has no form here (ValueError naming "gather"); a bad mode or
    uniform_shards is refused."""
    call = _distill_calls()[name]
    local = call(distributed=None)
    assert torch.equal(call(distributed="auto").detach(), local.detach())
    with pytest.raises(RuntimeError, match="init_process_group"):
        call(distributed="gather")
    with pytest.raises(ValueError, match=r"ring.*gather"):
        call(distributed="ring")
    with pytest.raises(ValueError, match="distributed must be one of"):
        call(distributed="ddp")
    with pytest.raises(TypeError, match="uniform_shards"):
        call(uniform_shards="yes")


def test_distill_clip_loss_defaults_to_auto_and_keeps_open_clip_arguments():
    """DistillClipLoss gathers by default like ClipLoss (open_clip's DistillClipLoss does); without
    a process group that is the local loss. open_clip's rank / world_size / local_loss /
    gather_with_grad are accepted; world_size > 1 without a process group raises (no silent
    local loss) unless distributed=None."""
    x, y, xt, yt = _student_teacher()
    assert DistillClipLoss().distributed == "auto"
    want = (F.clip_loss(x, y, 2.0), F.contrastive_distill_loss(x, y, 2.0, xt, yt, 3.0))
    for options in ({}, dict(local_loss=True, gather_with_grad=True, rank=0, world_size=1)):
        got = DistillClipLoss(**options)(x, y, 2.0, xt, yt, 3.0)
        assert all(torch.equal(g.detach(), w.detach()) for g, w in zip(got, want)), options
    with pytest.raises(RuntimeError, match=r"world_size=2"):
        DistillClipLoss(rank=1, world_size=2)(x, y, 2.0, xt, yt, 3.0)
    local = DistillClipLoss(rank=1, world_size=2, distributed=None)(x, y, 2.0, xt, yt, 3.0, output_dict=True)
    assert torch.equal(local["distill_loss"].detach(), want[1].detach())
    with pytest.raises(ValueError, match="Horovod"):
        DistillClipLoss(use_horovod=True)


def test_modules_store_the_distributed_options():
    group = object()  # stored as given; only used when gathering
    for module in (ContrastiveDistillLoss(distributed="gather", group=group, uniform_shards=True),
                   ModXLoss(distributed="gather", group=group, uniform_shards=True),
                   CyCLIPLoss(distributed="gather", group=group, uniform_shards=True),
                   ScoreDistillLoss(distributed="gather", group=group, uniform_shards=True),
                   DistillClipLoss(distributed="gather", group=group, uniform_shards=True)):
        assert (module.distributed, module.group, module.uniform_shards) == ("gather", group, True)
    with pytest.raises(ValueError, match="distributed must be one of"):
        CyCLIPLoss(distributed="ddp")
