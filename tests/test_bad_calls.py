"""A table of bad calls across the public API (docs/design.md, "Input validation").

Each row is one wrong call: it must raise the documented exception type — ``ValueError`` for
shapes, sizes, values, devices and unsupported combinations; ``TypeError`` for dtypes and
argument types — with a message that names the offending argument AND shows its shape, dtype
or value (every listed fragment must appear, case-sensitively). Shapes are written as Python writes
``tuple(t.shape)``: "(5, 8)", and "(3,)" for one dimension. A second, shorter table lists
calls that look unusual but are valid and must be accepted (integer targets of any integer
dtype, 0-d numpy scales).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mmloss
from mmloss import ops

N, D = 4, 8


def feats(n: int = N, d: int = D, *, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)


def ints(*values, dtype=torch.int64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


X, Y = feats(seed=1), feats(seed=2)
A, B = feats(seed=3), feats(seed=4)


def poisoned(t: torch.Tensor, row: int, col: int, value: float) -> torch.Tensor:
    t = t.clone()
    t[row, col] = value
    return t


X_NAN, Y_INF = poisoned(X, 1, 2, float("nan")), poisoned(Y, 3, 0, float("inf"))


def _soft_targets(row_sum: float = 1.0, negative: bool = False, m: int = 6) -> torch.Tensor:
    t = torch.full((N, m), 1.0 / m)
    t[0] *= row_sum
    if negative:
        t[1, 0], t[1, 1] = -0.5, 0.5 + 2.0 / m
    return t


# (id, call, exception type, fragments the message must contain: argument name + shape/dtype/value)
BAD_CALLS = [
    # --- clip_loss
    ("clip/rows_differ", lambda: mmloss.clip_loss(X, feats(5), 10.0), ValueError, ["text_features", "5"]),
    ("clip/dims_differ", lambda: mmloss.clip_loss(X, feats(N, 7), 10.0), ValueError, ["text_features", "(4, 7)"]),
    ("clip/int_features", lambda: mmloss.clip_loss(X.long(), Y, 10.0), TypeError, ["image_features", "int64"]),
    ("clip/3d_features", lambda: mmloss.clip_loss(X[None], Y, 10.0), ValueError, ["image_features", "(1, 4, 8)"]),
    ("clip/nan_scale", lambda: mmloss.clip_loss(X, Y, float("nan")), ValueError, ["logit_scale", "nan"]),
    ("clip/scale_overflows_fp32", lambda: mmloss.clip_loss(X, Y, 1e39), ValueError, ["logit_scale", "1e+39"]),
    ("clip/backend_none", lambda: mmloss.clip_loss(X, Y, 10.0, backend=None), TypeError, ["backend", "None"]),
    ("clip/backend_unknown", lambda: mmloss.clip_loss(X, Y, 10.0, backend="fastest"), ValueError,
     ["backend", "'fastest'"]),
    ("clip/label_smoothing", lambda: mmloss.clip_loss(X, Y, 10.0, label_smoothing=1.5), ValueError,
     ["label_smoothing", "1.5"]),
    ("clip/labels_length", lambda: mmloss.clip_loss(X, Y, 10.0, labels=ints(0, 1, 2)), ValueError,
     ["labels", "(3,)"]),
    ("clip/float_labels", lambda: mmloss.clip_loss(X, Y, 10.0, labels=torch.zeros(N)), TypeError,
     ["labels", "float32"]),
    ("clip/reduction", lambda: mmloss.clip_loss(X, Y, 10.0, reduction="avg"), ValueError, ["reduction", "'avg'"]),
    ("clip/scale_vector", lambda: mmloss.clip_loss(X, Y, torch.ones(2)), ValueError, ["logit_scale", "(2,)"]),
    ("clip/bias_string", lambda: mmloss.clip_loss(X, Y, 10.0, "b"), TypeError, ["logit_bias", "str"]),
    ("clip/device", lambda: mmloss.clip_loss(X, Y.to("meta"), 10.0), ValueError, ["text_features", "meta"]),
    ("clip/check_finite", lambda: mmloss.clip_loss(X_NAN, Y, 10.0, check_finite=True), ValueError,
     ["image_features", "[1, 2]", "nan"]),
    # --- siglip_loss
    ("siglip/scale_overflows_fp32", lambda: mmloss.siglip_loss(X, Y, 1e39, -10.0), ValueError,
     ["logit_scale", "1e+39"]),
    ("siglip/check_finite", lambda: mmloss.siglip_loss(X, Y_INF, 10.0, -10.0, check_finite=True), ValueError,
     ["text_features", "[3, 0]", "inf"]),
    ("siglip/rows_differ", lambda: mmloss.siglip_loss(X, feats(5), 10.0, -10.0), ValueError,
     ["text_features", "5"]),
    ("siglip/bias_vector", lambda: mmloss.siglip_loss(X, Y, 10.0, torch.ones(2)), ValueError,
     ["logit_bias", "(2,)"]),
    ("siglip/label_pair_length",
     lambda: mmloss.siglip_loss(X, feats(5), 10.0, labels=(ints(0, 1, 2, 3), ints(0, 1, 2))), ValueError,
     ["labels", "(3,)"]),
    ("siglip/inf_bias", lambda: mmloss.siglip_loss(X, Y, 10.0, float("-inf")), ValueError, ["logit_bias", "inf"]),
    # --- infonce_loss
    ("infonce/target_range", lambda: mmloss.infonce_loss(X, feats(6), 10.0, targets=ints(0, 1, 2, 9)), ValueError,
     ["targets", "9"]),
    ("infonce/float_targets", lambda: mmloss.infonce_loss(X, feats(6), 10.0, targets=torch.zeros(N)), TypeError,
     ["targets", "float32"]),
    ("infonce/soft_targets_sum", lambda: mmloss.infonce_loss(X, feats(6), 10.0, soft_targets=_soft_targets(5.0)),
     ValueError, ["soft_targets", "5"]),
    ("infonce/soft_targets_negative",
     lambda: mmloss.infonce_loss(X, feats(6), 10.0, soft_targets=_soft_targets(negative=True)), ValueError,
     ["soft_targets", "-0.5"]),
    ("infonce/soft_targets_shape", lambda: mmloss.infonce_loss(X, feats(6), 10.0, soft_targets=_soft_targets(m=5)),
     ValueError, ["soft_targets", "(4, 5)"]),
    ("infonce/query_labels_alone", lambda: mmloss.infonce_loss(X, feats(6), 10.0, query_labels=ints(0, 1, 2, 3)),
     ValueError, ["key_labels"]),
    ("infonce/zero_scale", lambda: mmloss.infonce_loss(X, Y, 0.0), ValueError, ["logit_scale", "0"]),
    ("infonce/check_finite", lambda: mmloss.infonce_loss(X, Y_INF, 10.0, check_finite=True), ValueError,
     ["keys", "[3, 0]", "inf"]),
    # --- ntxent_loss / supcon_loss
    ("ntxent/check_finite", lambda: mmloss.ntxent_loss(A, Y_INF, check_finite=True), ValueError,
     ["out1", "[3, 0]", "inf"]),
    ("supcon/check_finite", lambda: mmloss.supcon_loss(X_NAN, ints(0, 0, 1, 1), check_finite=True), ValueError,
     ["embeddings", "[1, 2]", "nan"]),
    ("supcon/base_temperature_denormal", lambda: mmloss.supcon_loss(X, ints(0, 0, 1, 1), base_temperature=1e-45),
     ValueError, ["base_temperature", "1e-45"]),
    ("ntxent/pml_style_labels", lambda: mmloss.ntxent_loss(feats(8), ints(0, 0, 1, 1, 2, 2, 3, 3)), TypeError,
     ["out1", "int64", "supcon_loss"]),
    ("ntxent/rows_differ", lambda: mmloss.ntxent_loss(A, feats(5)), ValueError, ["out1", "(5, 8)"]),
    ("ntxent/zero_temperature", lambda: mmloss.ntxent_loss(A, B, 0.0), ValueError, ["temperature", "0"]),
    ("ntxent/string_temperature", lambda: mmloss.ntxent_loss(A, B, "0.5"), TypeError, ["temperature", "str"]),
    ("supcon/empty_views", lambda: mmloss.supcon_loss(torch.randn(4, 0, 3)), ValueError, ["embeddings", "(4, 0, 3)"]),
    ("supcon/2d_without_labels", lambda: mmloss.supcon_loss(feats(8)), ValueError, ["labels", "(8, 8)"]),
    ("supcon/labels_length", lambda: mmloss.supcon_loss(feats(8), ints(0, 1, 0, 1, 0, 1, 0)), ValueError,
     ["labels", "(7,)"]),
    ("supcon/base_temperature", lambda: mmloss.supcon_loss(feats(8), ints(0, 1).repeat(4), 0.1, -1.0), ValueError,
     ["base_temperature", "-1"]),
    # --- DCL / DCLW / DHEL / HCL / multi-view
    ("dcl/one_row", lambda: mmloss.dcl_loss(feats(1), feats(1)), ValueError, ["out0", "(1, 8)"]),
    ("dclw/zero_sigma", lambda: mmloss.dclw_loss(A, B, 0.1, 0.0), ValueError, ["sigma", "0"]),
    ("dclw/sigma_denormal", lambda: mmloss.dclw_loss(A, B, sigma=1e-45), ValueError, ["sigma", "1e-45"]),
    ("dhel/include_augs_type", lambda: mmloss.dhel_loss(A, B, 0.3, "yes"), TypeError, ["include_augs", "str"]),
    ("hcl/tau_plus_one", lambda: mmloss.hcl_loss(A, B, tau_plus=1.0), ValueError, ["tau_plus", "1"]),
    ("hcl/negative_temperature", lambda: mmloss.hcl_loss(A, B, temperature=-0.5), ValueError,
     ["temperature", "-0.5"]),
    ("mv_infonce/one_view", lambda: mmloss.mv_infonce_loss(torch.randn(1, 4, 8)), ValueError,
     ["views", "1"]),
    ("mv_infonce/views_differ", lambda: mmloss.mv_infonce_loss([A, feats(5)]), ValueError, ["views", "(5, 8)"]),
    # distributed keywords of the SSL losses (issue 10; no process group here)
    ("ntxent/distributed_mode", lambda: mmloss.ntxent_loss(A, B, distributed="all"), ValueError,
     ["distributed", "'all'"]),
    ("supcon/distributed_ring", lambda: mmloss.supcon_loss(feats(8), ints(0, 1).repeat(4), distributed="ring"),
     ValueError, ["supcon_loss", "distributed='ring'"]),
    ("dcl/group_type", lambda: mmloss.dcl_loss(A, B, group="world"), TypeError, ["group", "str"]),
    ("mv_dhel/uniform_shards_type", lambda: mmloss.mv_dhel_loss([A, B], uniform_shards="yes"), TypeError,
     ["uniform_shards", "str"]),
    # --- symile / cyclip / distillation / score distillation
    ("symile/one_modality", lambda: mmloss.symile_loss([A], 10.0), ValueError, ["representations", "1"]),
    ("symile/sampling", lambda: mmloss.symile_loss([A, B], 10.0, negative_sampling="m"), ValueError,
     ["negative_sampling", "'m'"]),
    ("symile/dims_differ", lambda: mmloss.symile_loss([A, feats(N, 7)], 10.0), ValueError,
     ["representations", "(4, 7)"]),
    ("cyclip/negative_lambda", lambda: mmloss.cyclip_loss(X, Y, 10.0, lambda_in=-0.1), ValueError,
     ["lambda_in", "-0.1"]),
    ("distill/teacher_rows", lambda: mmloss.contrastive_distill_loss(X, Y, 10.0, feats(5), Y, 10.0), ValueError,
     ["teacher_image_features", "(5, 8)"]),
    ("distill/teacher_scale_nan", lambda: mmloss.contrastive_distill_loss(X, Y, 10.0, X, Y, float("nan")),
     ValueError, ["teacher_logit_scale", "nan"]),
    ("modx/old_rows", lambda: mmloss.modx_loss(X, Y, 10.0, X, feats(3)), ValueError, ["old_text_features", "(3, 8)"]),
    ("modx/alpha_nan", lambda: mmloss.modx_loss(X, Y, 10.0, X, Y, alpha=float("nan")), ValueError,
     ["alpha", "nan"]),
    ("score_distill/shapes", lambda: mmloss.score_distill_loss(torch.randn(4, 5), torch.randn(4, 6)), ValueError,
     ["teacher_scores", "(4, 6)"]),
    ("score_distill/positive_index", lambda: mmloss.score_distill_loss(torch.randn(4, 5), torch.randn(4, 5), 5),
     ValueError, ["positive_index", "5"]),
    ("score_distill/alpha", lambda: mmloss.score_distill_loss(torch.randn(4, 5), torch.randn(4, 5), 0, 2.0),
     ValueError, ["alpha", "2"]),
    # --- the primitives
    ("lse/exclude", lambda: ops.similarity_lse(X, Y, 1.0, exclude="diag"), ValueError, ["exclude", "'diag'"]),
    ("lse/same_label_without_labels", lambda: ops.similarity_lse(X, Y, 1.0, exclude="same_label"), ValueError,
     ["x_labels"]),
    ("lse/labels_length", lambda: ops.similarity_lse(X, Y, 1.0, exclude="same_label", x_labels=ints(0, 1, 2, 3),
                                                     y_labels=ints(0, 1)), ValueError, ["y_labels", "(2,)"]),
    ("lse/scale_vector_length", lambda: ops.similarity_lse(X, Y, torch.ones(3)), ValueError, ["scale", "(3,)"]),
    ("lse/chunk_size", lambda: ops.similarity_lse(X, Y, 1.0, chunk_size=0), ValueError, ["chunk_size", "0"]),
    ("lse/offset_float", lambda: ops.similarity_lse(X, Y, 1.0, exclude="diagonal", offset=1.5), TypeError,
     ["offset", "float"]),
    ("lse/scale_tensor_overflows_fp32", lambda: ops.similarity_lse(X, Y, torch.tensor(1e39, dtype=torch.float64)),
     ValueError, ["scale", "1e+39"]),
    ("lse/int_scale_tensor", lambda: ops.similarity_lse(X, Y, torch.tensor(2)), TypeError, ["scale", "int64"]),
    ("sigmoid/positives", lambda: ops.pairwise_sigmoid(X, Y, 1.0, positives="all"), ValueError,
     ["positives", "'all'"]),
    ("sigmoid/float_labels", lambda: ops.pairwise_sigmoid(X, Y, 1.0, positives="same_label",
                                                          x_labels=torch.zeros(N), y_labels=torch.zeros(N)),
     TypeError, ["x_labels", "float32"]),
    ("kl/teacher_rows", lambda: ops.similarity_kl(X, Y, feats(5), Y, 1.0, 1.0), ValueError, ["x_t", "(5, 8)"]),
    ("topk/k_too_large", lambda: ops.similarity_topk(X, Y, 10), ValueError, ["k", "10"]),
    ("topk/k_float", lambda: ops.similarity_topk(X, Y, 1.5), TypeError, ["k", "float"]),
    # --- modules
    ("ClipLoss/backend_none", lambda: mmloss.ClipLoss(backend=None), TypeError, ["backend", "None"]),
    ("ClipLoss/rows_differ", lambda: mmloss.ClipLoss()(X, feats(5), 10.0), ValueError, ["text_features", "5"]),
    ("SigLipLoss/dist_impl", lambda: mmloss.SigLipLoss(dist_impl="ring2"), ValueError, ["dist_impl", "'ring2'"]),
    ("ISogCLRLoss/list_index", lambda: mmloss.ISogCLRLoss(10)(A, B, [0, 1, 2, 3]), TypeError, ["index", "list"]),
    ("ISogCLRLoss/float_index", lambda: mmloss.ISogCLRLoss(10)(A, B, torch.zeros(N)), TypeError,
     ["index", "float32"]),
    ("ISogCLRLoss/index_range", lambda: mmloss.ISogCLRLoss(10)(A, B, ints(0, 1, 2, 10)), ValueError, ["index", "10"]),
    ("ISogCLRLoss/index_length", lambda: mmloss.ISogCLRLoss(10)(A, B, ints(0, 1, 2)), ValueError, ["index", "(3,)"]),
    ("ISogCLRLoss/check_finite", lambda: mmloss.ISogCLRLoss(10, check_finite=True)(X_NAN, Y, ints(0, 1, 2, 3)),
     ValueError, ["features_a", "[1, 2]", "nan"]),
    ("ISogCLRLoss/dataset_size", lambda: mmloss.ISogCLRLoss(0), ValueError, ["dataset_size", "0"]),
    ("ISogCLRLoss/mode", lambda: mmloss.ISogCLRLoss(10, mode="trimodal"), ValueError, ["mode", "'trimodal'"]),
    ("TripleContrastiveLoss/queue_without_dim", lambda: mmloss.TripleContrastiveLoss(queue_size=8), ValueError,
     ["embed_dim", "queue_size"]),
    ("TripleContrastiveLoss/bounds_order", lambda: mmloss.TripleContrastiveLoss(temperature_bounds=(0.5, 0.1)),
     ValueError, ["temperature_bounds", "(0.5, 0.1)"]),
    ("MemoryQueue/size", lambda: mmloss.MemoryQueue(0, 8), ValueError, ["size", "0"]),
    ("MemoryQueue/dtype", lambda: mmloss.MemoryQueue(8, 4, dtype=torch.int64), TypeError, ["dtype", "int64"]),
    ("MemoryQueue/init", lambda: mmloss.MemoryQueue(8, 4, init="zeros"), ValueError, ["init", "'zeros'"]),
    ("MemoryQueue/key_dim", lambda: mmloss.MemoryQueue(8, 4).enqueue(torch.randn(2, 5)), ValueError,
     ["keys", "(2, 5)"]),
]


@pytest.mark.parametrize("call, error, fragments", [row[1:] for row in BAD_CALLS], ids=[row[0] for row in BAD_CALLS])
def test_bad_call(call, error, fragments):
    with pytest.raises(Exception) as info:
        call()
    message = str(info.value)
    assert isinstance(info.value, error), f"expected {error.__name__}, got {type(info.value).__name__}: {message}"
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message lacks {missing}: {type(info.value).__name__}: {message}"


def test_table_is_wide_enough():
    assert len(BAD_CALLS) >= 40
    assert len({row[0] for row in BAD_CALLS}) == len(BAD_CALLS)


def test_backend_none_raises_the_same_type_for_function_and_module():
    with pytest.raises(Exception) as from_function:
        mmloss.clip_loss(X, Y, 10.0, backend=None)
    with pytest.raises(Exception) as from_module:
        mmloss.ClipLoss(backend=None)
    assert type(from_function.value) is type(from_module.value) is TypeError


# ----------------------------------------------------------------------------- valid but unusual


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8])
def test_targets_of_any_integer_dtype_are_accepted(dtype):
    keys = feats(6, seed=5)
    targets = ints(0, 1, 2, 5)
    expected = mmloss.infonce_loss(X, keys, 10.0, targets=targets)
    torch.testing.assert_close(mmloss.infonce_loss(X, keys, 10.0, targets=targets.to(dtype)), expected)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32])
def test_labels_of_any_integer_dtype_are_accepted(dtype):
    labels = ints(0, 1, 0, 2)
    torch.testing.assert_close(mmloss.clip_loss(X, Y, 10.0, labels=labels.to(dtype)),
                               mmloss.clip_loss(X, Y, 10.0, labels=labels))
    emb, emb_labels = feats(8, seed=6), ints(0, 1, 0, 1, 2, 2, 3, 3)
    torch.testing.assert_close(mmloss.supcon_loss(emb, emb_labels.to(dtype)), mmloss.supcon_loss(emb, emb_labels))


@pytest.mark.parametrize("scale", [np.float32(10.0), np.float64(10.0), np.array(10.0), np.array(10.0, np.float32)],
                         ids=["np.float32", "np.float64", "0-d array", "0-d float32 array"])
def test_numpy_scalar_logit_scale_is_accepted(scale):
    expected = mmloss.clip_loss(X, Y, 10.0)
    torch.testing.assert_close(mmloss.clip_loss(X, Y, scale), expected)
    torch.testing.assert_close(mmloss.siglip_loss(X, Y, scale, np.float32(-10.0)),
                               mmloss.siglip_loss(X, Y, 10.0, -10.0))
