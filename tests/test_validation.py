"""Input validation (docs/design.md "Input validation"): one test per bad input.

``ValueError`` for shapes, sizes, values, devices and unsupported combinations; ``TypeError`` for
dtypes and argument types; the message names the argument. A second device is made with the
"meta" device, which needs no hardware.
"""
from __future__ import annotations

import pytest
import torch

import mmloss
from oracle import features

ops = mmloss.ops
INF, NAN = float("inf"), float("nan")


def X(n: int = 7, d: int = 3, dtype=torch.float32) -> torch.Tensor:
    """A valid (n, d) feature matrix."""
    return features(n, d, dtype=dtype, seed=n * 100 + d, requires_grad=False)


def META(n: int = 7, d: int = 3) -> torch.Tensor:
    return torch.empty(n, d, device="meta")


def L(*values) -> torch.Tensor:
    """An int64 label tensor."""
    return torch.tensor(values, dtype=torch.long)


LABELS7 = (0, 1, 0, 2, 1, 0, 3)

# id → (call, expected error type, regex the message must match: the argument's name)
CASES = {
    # ---- feature matrices: types and dtypes
    "clip/image_features-list": (lambda: mmloss.clip_loss([[1.0, 0.0, 0.0]] * 7, X(), 5.0), TypeError,
                                 r"image_features"),
    "clip/text_features-numpy": (lambda: mmloss.clip_loss(X(), X().numpy(), 5.0), TypeError, r"text_features"),
    "lse/x-float": (lambda: ops.similarity_lse(3.0, X(), 1.0), TypeError, r"\bx\b"),
    "sigmoid/y-None": (lambda: ops.pairwise_sigmoid(X(), None, 1.0), TypeError, r"\by\b"),
    "siglip/image_features-int64": (lambda: mmloss.siglip_loss(torch.ones(7, 3, dtype=torch.long), X(), 5.0),
                                    TypeError, r"image_features"),
    "infonce/keys-bool": (lambda: mmloss.infonce_loss(X(), torch.ones(7, 3, dtype=torch.bool), 5.0), TypeError,
                          r"keys"),
    "sigmoid/y-int32": (lambda: ops.pairwise_sigmoid(X(), torch.ones(7, 3, dtype=torch.int32), 1.0), TypeError,
                        r"\by\b"),
    "clip/text_features-complex": (lambda: mmloss.clip_loss(X(), torch.ones(7, 3, dtype=torch.complex64), 5.0),
                                   TypeError, r"text_features"),
    # ---- feature matrices: ranks and sizes
    "clip/image_features-1d": (lambda: mmloss.clip_loss(torch.randn(7), X(), 5.0), ValueError, r"image_features"),
    "infonce/keys-3d": (lambda: mmloss.infonce_loss(X(), torch.randn(2, 7, 3), 5.0), ValueError, r"keys"),
    "lse/x-0d": (lambda: ops.similarity_lse(torch.tensor(1.0), X(), 1.0), ValueError, r"\bx\b"),
    "lse/x-zero-rows": (lambda: ops.similarity_lse(torch.empty(0, 3), X(), 1.0), ValueError, r"\bx\b"),
    "sigmoid/y-zero-rows": (lambda: ops.pairwise_sigmoid(X(), torch.empty(0, 3), 1.0), ValueError, r"\by\b"),
    "siglip/image_features-zero-rows": (lambda: mmloss.siglip_loss(torch.empty(0, 3), torch.empty(0, 3), 5.0),
                                        ValueError, r"image_features"),
    "clip/image_features-zero-D": (lambda: mmloss.clip_loss(torch.empty(7, 0), torch.empty(7, 0), 5.0), ValueError,
                                   r"image_features"),
    "clip/mismatched-D": (lambda: mmloss.clip_loss(X(7, 3), X(7, 67), 5.0), ValueError,
                          r"image_features.*text_features|text_features.*image_features"),
    "lse/mismatched-D": (lambda: ops.similarity_lse(X(7, 3), X(5, 130), 1.0), ValueError, r"\bx\b.*\by\b"),
    "infonce/mismatched-D": (lambda: mmloss.infonce_loss(X(7, 1), X(9, 3), 5.0), ValueError, r"query.*keys"),
    # ---- devices (meta stands in for a second device)
    "clip/text_features-other-device": (lambda: mmloss.clip_loss(X(), META(), 5.0), ValueError, r"text_features"),
    "lse/y-other-device": (lambda: ops.similarity_lse(X(), META(5), 1.0), ValueError, r"\by\b"),
    "sigmoid/x-other-device": (lambda: ops.pairwise_sigmoid(META(), X(5), 1.0), ValueError, r"\bx\b|\by\b"),
    "lse/scale-other-device": (lambda: ops.similarity_lse(X(), X(5), torch.ones(7, device="meta")), ValueError,
                               r"scale"),
    "lse/y_labels-other-device": (lambda: ops.similarity_lse(X(), X(5), 1.0, exclude="same_label",
                                                             x_labels=L(*LABELS7),
                                                             y_labels=torch.zeros(5, dtype=torch.long,
                                                                                  device="meta")),
                                  ValueError, r"y_labels"),
    # ---- N ≠ M where the loss needs a square problem
    "clip/N-ne-M": (lambda: mmloss.clip_loss(X(7), X(8), 5.0), ValueError, r"text_features|image_features"),
    "siglip/N-ne-M-without-label-pair": (lambda: mmloss.siglip_loss(X(7), X(8), 5.0), ValueError,
                                         r"text_features|image_features|texts|images"),
    "siglip/N-ne-M-with-label-ids": (lambda: mmloss.siglip_loss(X(7), X(8), 5.0, labels=L(*LABELS7)), ValueError,
                                     r"text_features|image_features|texts|images|labels"),
    # ---- logit scale (losses: finite and > 0; primitives: finite)
    "clip/logit_scale-nan-float": (lambda: mmloss.clip_loss(X(), X(), NAN), ValueError, r"logit_scale"),
    # tensors with NaN/Inf propagate (docs/guarantees.md) unless check_finite=True asks to raise
    "clip/logit_scale-inf-tensor-checked": (lambda: mmloss.clip_loss(X(), X(), torch.tensor(INF), check_finite=True),
                                            ValueError, r"logit_scale.*inf"),
    "clip/features-nan-checked": (lambda: mmloss.clip_loss(X(), X().index_fill(0, L(3), NAN), 5.0,
                                                           check_finite=True), ValueError, r"text_features\[3, 0\]"),
    "clip/logit_scale-overflows-fp32": (lambda: mmloss.clip_loss(X(), X(), 1e39), ValueError,
                                        r"logit_scale.*float32.*1e\+39"),
    "siglip/logit_bias-overflows-fp32": (lambda: mmloss.siglip_loss(X(), X(), 5.0, torch.tensor(-1e39, dtype=torch.float64)),
                                         ValueError, r"logit_bias"),
    "clip/logit_scale-zero-float": (lambda: mmloss.clip_loss(X(), X(), 0.0), ValueError, r"logit_scale"),
    "siglip/logit_scale-negative-tensor": (lambda: mmloss.siglip_loss(X(), X(), torch.tensor(-1.0)), ValueError,
                                           r"logit_scale"),
    "infonce/logit_scale-negative-float": (lambda: mmloss.infonce_loss(X(), X(), -2.0), ValueError,
                                           r"logit_scale"),
    "infonce/logit_scale-inf-float": (lambda: mmloss.infonce_loss(X(), X(), INF), ValueError, r"logit_scale"),
    "siglip/logit_scale-zero-tensor": (lambda: mmloss.siglip_loss(X(), X(), torch.tensor(0.0)), ValueError,
                                       r"logit_scale"),
    "clip/logit_scale-per-row-shape": (lambda: mmloss.clip_loss(X(), X(), torch.ones(7)), ValueError,
                                       r"logit_scale"),
    "siglip/logit_scale-2d": (lambda: mmloss.siglip_loss(X(), X(), torch.ones(1, 1)), ValueError, r"logit_scale"),
    "clip/logit_scale-int-tensor": (lambda: mmloss.clip_loss(X(), X(), torch.tensor(5)), TypeError,
                                    r"logit_scale"),
    "infonce/logit_scale-string": (lambda: mmloss.infonce_loss(X(), X(), "5"), TypeError, r"logit_scale"),
    "lse/scale-wrong-length": (lambda: ops.similarity_lse(X(7), X(5), torch.ones(5)), ValueError, r"scale"),
    "lse/scale-2d": (lambda: ops.similarity_lse(X(7), X(5), torch.ones(7, 1)), ValueError, r"scale"),
    "sigmoid/scale-nan-float": (lambda: ops.pairwise_sigmoid(X(), X(5), NAN), ValueError, r"scale"),
    "lse/scale-per-row-overflows-fp32": (lambda: ops.similarity_lse(X(), X(5), torch.tensor([1.0] * 6 + [1e39],
                                                                                          dtype=torch.float64)),
                                         ValueError, r"scale.*1e\+39"),
    "lse/scale-int-tensor": (lambda: ops.similarity_lse(X(), X(5), torch.ones(7, dtype=torch.long)), TypeError,
                             r"scale"),
    # ---- bias
    "siglip/logit_bias-shape": (lambda: mmloss.siglip_loss(X(), X(), 5.0, torch.zeros(7)), ValueError,
                                r"logit_bias"),
    "clip/logit_bias-int-tensor": (lambda: mmloss.clip_loss(X(), X(), 5.0, torch.tensor(1)), TypeError,
                                   r"logit_bias"),
    "lse/bias-per-row": (lambda: ops.similarity_lse(X(), X(5), 1.0, torch.zeros(7)), ValueError, r"bias"),
    "sigmoid/bias-string": (lambda: ops.pairwise_sigmoid(X(), X(5), 1.0, "0"), TypeError, r"bias"),
    # ---- labels
    "clip/labels-wrong-length": (lambda: mmloss.clip_loss(X(), X(), 5.0, labels=L(*LABELS7, 1)), ValueError,
                                 r"labels"),
    "clip/labels-2d": (lambda: mmloss.clip_loss(X(), X(), 5.0, labels=L(*LABELS7)[:, None]), ValueError,
                       r"labels"),
    "clip/labels-float": (lambda: mmloss.clip_loss(X(), X(), 5.0, labels=torch.zeros(7)), TypeError, r"labels"),
    "clip/labels-bool": (lambda: mmloss.clip_loss(X(), X(), 5.0, labels=torch.zeros(7, dtype=torch.bool)),
                         TypeError, r"labels"),
    "siglip/labels-wrong-length": (lambda: mmloss.siglip_loss(X(), X(), 5.0, labels=L(0, 1)), ValueError,
                                   r"labels"),
    "siglip/labels-float": (lambda: mmloss.siglip_loss(X(), X(), 5.0, labels=torch.zeros(7)), TypeError,
                            r"labels"),
    "siglip/label-pair-text-length": (lambda: mmloss.siglip_loss(X(7), X(8), 5.0, labels=(L(*LABELS7), L(0, 1))),
                                      ValueError, r"labels"),
    "siglip/label-pair-of-three": (lambda: mmloss.siglip_loss(X(7), X(8), 5.0, labels=(L(*LABELS7),) * 3),
                                   ValueError, r"labels"),
    "lse/x_labels-wrong-length": (lambda: ops.similarity_lse(X(), X(5), 1.0, exclude="same_label",
                                                             x_labels=L(0, 1), y_labels=L(0, 1, 2, 3, 4)),
                                  ValueError, r"x_labels"),
    "sigmoid/y_labels-float": (lambda: ops.pairwise_sigmoid(X(), X(5), 1.0, positives="same_label",
                                                            x_labels=L(*LABELS7), y_labels=torch.zeros(5)),
                               TypeError, r"y_labels"),
    "lse/same_label-without-labels": (lambda: ops.similarity_lse(X(), X(5), 1.0, exclude="same_label"),
                                      ValueError, r"x_labels|y_labels"),
    "lse/same_label-without-y_labels": (lambda: ops.similarity_lse(X(), X(5), 1.0, exclude="same_label",
                                                                   x_labels=L(*LABELS7)),
                                        ValueError, r"y_labels"),
    "sigmoid/same_label-without-labels": (lambda: ops.pairwise_sigmoid(X(), X(5), 1.0, positives="same_label"),
                                          ValueError, r"x_labels|y_labels"),
    "lse/labels-with-diagonal": (lambda: ops.similarity_lse(X(), X(5), 1.0, exclude="diagonal",
                                                            x_labels=L(*LABELS7), y_labels=L(0, 1, 2, 3, 4)),
                                 ValueError, r"x_labels|y_labels"),
    "lse/labels-with-none": (lambda: ops.similarity_lse(X(), X(5), 1.0, y_labels=L(0, 1, 2, 3, 4)), ValueError,
                             r"y_labels"),
    "sigmoid/labels-with-diagonal": (lambda: ops.pairwise_sigmoid(X(), X(5), 1.0, x_labels=L(*LABELS7),
                                                                  y_labels=L(0, 1, 2, 3, 4)),
                                     ValueError, r"x_labels|y_labels"),
    # ---- option strings and other options
    "lse/unknown-exclude": (lambda: ops.similarity_lse(X(), X(5), 1.0, exclude="diag"), ValueError, r"exclude"),
    "lse/exclude-not-string": (lambda: ops.similarity_lse(X(), X(5), 1.0, exclude=None), TypeError, r"exclude"),
    "sigmoid/unknown-positives": (lambda: ops.pairwise_sigmoid(X(), X(5), 1.0, positives="same"), ValueError,
                                  r"positives"),
    "lse/offset-float": (lambda: ops.similarity_lse(X(), X(5), 1.0, exclude="diagonal", offset=1.5), TypeError,
                         r"offset"),
    "lse/rows-and-cols-false": (lambda: ops.similarity_lse(X(), X(5), 1.0, rows=False, cols=False), ValueError,
                                r"rows|cols"),
    "clip/unknown-reduction": (lambda: mmloss.clip_loss(X(), X(), 5.0, reduction="avg"), ValueError,
                               r"reduction"),
    "siglip/unknown-reduction": (lambda: mmloss.siglip_loss(X(), X(), 5.0, reduction="batchmean"), ValueError,
                                 r"reduction"),
    "infonce/unknown-reduction": (lambda: mmloss.infonce_loss(X(), X(), 5.0, reduction="Mean"), ValueError,
                                  r"reduction"),
    "sigmoid/unknown-reduction": (lambda: ops.pairwise_sigmoid(X(), X(5), 1.0, reduction="max"), ValueError,
                                  r"reduction"),
    "InfoNCELoss/unknown-reduction": (lambda: mmloss.InfoNCELoss(reduction="avg"), ValueError, r"reduction"),
    "clip/label_smoothing-1": (lambda: mmloss.clip_loss(X(), X(), 5.0, label_smoothing=1.0), ValueError,
                               r"label_smoothing"),
    "clip/label_smoothing-negative": (lambda: mmloss.clip_loss(X(), X(), 5.0, label_smoothing=-0.1), ValueError,
                                      r"label_smoothing"),
    "ClipLoss/label_smoothing-1.5": (lambda: mmloss.ClipLoss(label_smoothing=1.5), ValueError, r"label_smoothing"),
    "ClipLoss/unknown-distributed": (lambda: mmloss.ClipLoss(distributed="ddp"), ValueError, r"distributed"),
    # ---- InfoNCE positives
    "infonce/targets-too-large": (lambda: mmloss.infonce_loss(X(7), X(9), 5.0, targets=L(0, 1, 2, 3, 4, 5, 9)),
                                  ValueError, r"targets"),
    "infonce/targets-negative": (lambda: mmloss.infonce_loss(X(7), X(9), 5.0, targets=L(0, 1, 2, 3, 4, 5, -1)),
                                 ValueError, r"targets"),
    "infonce/targets-wrong-length": (lambda: mmloss.infonce_loss(X(7), X(9), 5.0, targets=L(0, 1)), ValueError,
                                     r"targets"),
    "infonce/targets-float": (lambda: mmloss.infonce_loss(X(7), X(9), 5.0, targets=torch.zeros(7)), TypeError,
                              r"targets"),
    "infonce/soft_targets-wrong-shape": (lambda: mmloss.infonce_loss(X(7), X(9), 5.0,
                                                                     soft_targets=torch.full((7, 8), 1 / 8)),
                                         ValueError, r"soft_targets"),
    "infonce/soft_targets-transposed": (lambda: mmloss.infonce_loss(X(7), X(9), 5.0,
                                                                    soft_targets=torch.full((9, 7), 1 / 7)),
                                        ValueError, r"soft_targets"),
    "infonce/targets-and-soft_targets": (lambda: mmloss.infonce_loss(X(7), X(9), 5.0, targets=L(*range(7)),
                                                                     soft_targets=torch.full((7, 9), 1 / 9)),
                                         ValueError, r"targets.*soft_targets|soft_targets.*targets"),
    "infonce/targets-and-labels": (lambda: mmloss.infonce_loss(X(7), X(9), 5.0, targets=L(*range(7)),
                                                               query_labels=L(*LABELS7), key_labels=L(*range(9))),
                                   ValueError, r"targets.*labels|labels.*targets"),
    "infonce/labels-and-soft_targets": (lambda: mmloss.infonce_loss(X(7), X(9), 5.0, query_labels=L(*LABELS7),
                                                                    key_labels=L(*range(9)),
                                                                    soft_targets=torch.full((7, 9), 1 / 9)),
                                        ValueError, r"labels.*soft_targets|soft_targets.*labels"),
    "infonce/query_labels-without-key_labels": (lambda: mmloss.infonce_loss(X(7), X(9), 5.0,
                                                                            query_labels=L(*LABELS7)),
                                                ValueError, r"key_labels"),
    "infonce/key_labels-without-query_labels": (lambda: mmloss.infonce_loss(X(7), X(9), 5.0,
                                                                            key_labels=L(*range(9))),
                                                ValueError, r"query_labels"),
    "infonce/key_labels-wrong-length": (lambda: mmloss.infonce_loss(X(7), X(9), 5.0, query_labels=L(*LABELS7),
                                                                    key_labels=L(*range(7))),
                                        ValueError, r"key_labels"),
    "infonce/default-targets-fewer-keys": (lambda: mmloss.infonce_loss(X(7), X(5), 5.0), ValueError, r"keys"),
    # ---- backends and chunking
    "clip/unknown-backend": (lambda: mmloss.clip_loss(X(), X(), 5.0, backend="gpu"), ValueError, r"backend"),
    "lse/unknown-backend": (lambda: ops.similarity_lse(X(), X(5), 1.0, backend="Torch"), ValueError, r"backend"),
    "ClipLoss/unknown-backend": (lambda: mmloss.ClipLoss(backend="fast"), ValueError, r"backend"),
    "SigLipLoss/unknown-backend": (lambda: mmloss.SigLipLoss(backend="fast"), ValueError, r"backend"),
    "lse/chunk_size-zero": (lambda: ops.similarity_lse(X(), X(5), 1.0, chunk_size=0), ValueError, r"chunk_size"),
    "sigmoid/chunk_size-negative": (lambda: ops.pairwise_sigmoid(X(), X(5), 1.0, chunk_size=-4), ValueError,
                                    r"chunk_size"),
    "lse/chunk_size-float": (lambda: ops.similarity_lse(X(), X(5), 1.0, chunk_size=2.5), TypeError,
                             r"chunk_size"),
    "sigmoid/chunk_size-string": (lambda: ops.pairwise_sigmoid(X(), X(5), 1.0, chunk_size="4"), TypeError,
                                  r"chunk_size"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case):
    call, error, names = CASES[case]
    with pytest.raises(error, match=names):
        call()


def test_good_inputs_pass():
    """The valid counterparts of the cases above run (so each error is specific to its case)."""
    mmloss.clip_loss(X(), X(), 5.0, torch.tensor(-1.0), labels=L(*LABELS7), label_smoothing=0.1)
    mmloss.siglip_loss(X(7), X(8), torch.tensor(5.0), -1.0, labels=(L(*LABELS7), L(*range(8))))
    mmloss.infonce_loss(X(7), X(9), 5.0, targets=L(0, 1, 2, 3, 4, 5, 8))
    mmloss.infonce_loss(X(7), X(9), 5.0, query_labels=L(*LABELS7), key_labels=L(0, 1, 2, 3, 0, 1, 2, 3, 0))
    mmloss.infonce_loss(X(7), X(9), 5.0, soft_targets=torch.full((7, 9), 1 / 9))
    ops.similarity_lse(X(), X(5), torch.ones(7), 0.5, exclude="same_label", x_labels=L(*LABELS7),
                       y_labels=L(0, 1, 2, 3, 4), chunk_size=2)
    ops.pairwise_sigmoid(X(), X(5), 0.0, torch.tensor(0.5), positives="diagonal", offset=-2, chunk_size=1)


# ----------------------------------------------------------------------------- backends


def test_unavailable_backend_on_cpu_tensors():
    """The "cuda" backend never runs on CPU tensors: RuntimeError naming it, with a reason."""
    with pytest.raises(RuntimeError, match=r"cuda") as info:
        mmloss.clip_loss(X(), X(), 5.0, backend="cuda")
    assert len(str(info.value)) > 40, f"no reason given: {info.value}"


UNAVAILABLE = [name for name, reason in mmloss.available_backends().items() if reason is not None]


@pytest.mark.parametrize("name", UNAVAILABLE or ["cuda"], ids=lambda n: f"backend={n}")
def test_unavailable_backend_raises_with_reason(name):
    """Every backend ``available_backends()`` reports unusable raises RuntimeError when asked for
    explicitly (function, primitive and module)."""
    for call in (lambda: ops.similarity_lse(X(), X(5), 1.0, backend=name),
                 lambda: ops.pairwise_sigmoid(X(), X(5), 1.0, backend=name),
                 lambda: mmloss.SigLipLoss(backend=name)(X(), X(), 5.0, -1.0)):
        with pytest.raises(RuntimeError, match=name) as info:
            call()
        assert len(str(info.value)) > 40, f"no reason given: {info.value}"


@pytest.mark.parametrize("value", ["gpu", "Torch", "reference,torch"])
def test_bad_mmloss_backend_env(monkeypatch, value):
    monkeypatch.setenv("MMLOSS_BACKEND", value)
    with pytest.raises(ValueError, match=r"MMLOSS_BACKEND"):
        mmloss.clip_loss(X(), X(), 5.0)
    with pytest.raises(ValueError, match=r"MMLOSS_BACKEND"):
        ops.pairwise_sigmoid(X(), X(5), 1.0)


def test_unavailable_mmloss_backend_env(monkeypatch):
    """MMLOSS_BACKEND naming a backend that cannot run these tensors: RuntimeError with a reason."""
    monkeypatch.setenv("MMLOSS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"cuda"):
        mmloss.siglip_loss(X(), X(), 5.0)


def test_nonfinite_tensors_propagate():
    """NaN policy (docs/guarantees.md): a NaN/Inf inside a tensor argument propagates to the
    result, as in torch, instead of raising (or being hidden); only rows it touches are NaN."""
    loss = mmloss.clip_loss(X(), X(), torch.tensor(INF))
    assert torch.isnan(loss), loss
    row, col = ops.similarity_lse(X(), X(5), torch.tensor([1.0] * 6 + [NAN]))
    assert torch.isnan(row[6]) and torch.isfinite(row[:6]).all(), row
    assert torch.isnan(col).all(), col  # every column meets the NaN row
    y = X()
    y.data[3, 0] = NAN
    assert torch.isnan(mmloss.clip_loss(X(), y, 5.0))


def test_numpy_scalars_are_numbers():
    """A numpy scalar or 0-d array logit_scale is a number, like a Python float."""
    np = pytest.importorskip("numpy")
    want = mmloss.clip_loss(X(), X(), 10.0)
    for value in (np.float32(10.0), np.float64(10.0), np.array(10.0), np.int64(10)):
        got = mmloss.clip_loss(X(), X(), value)
        assert torch.allclose(got, want), (type(value), got, want)
