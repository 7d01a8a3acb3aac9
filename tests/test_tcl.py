"""docs/losses.md §10: ``tcl_loss`` / ``TripleContrastiveLoss`` (TCL: CMA + IMC + LMI).

The fast path (batch and queue scored separately, soft targets through the teacher's key
average, LMI against the locals of the other samples) is compared with the dense float64
reference ``mmloss.reference.tcl_loss`` (concatenated keys, ``log_softmax`` cross-entropy).
"""
from __future__ import annotations

import math

import pytest
import torch

import mmloss
from oracle import assert_loss_close, compare, features, oracle, cpu_fast_backends

ref = mmloss.reference
HALF = [torch.float16, torch.bfloat16]


FAST = cpu_fast_backends()
FP64_BACKENDS = ("torch", "cpu")   # docs/design.md: the others take fp32/fp16/bf16


def unit(*shape, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)
    return t.to(dtype).requires_grad_(grad)


def tcl_inputs(b, d, *, queue=0, image_locals=0, text_locals=0, dtype=torch.float32, seed=0, noncontig=False):
    v = features(b, d, dtype=dtype, seed=seed, noncontig=noncontig)
    t = features(b, d, dtype=dtype, seed=seed + 1, noncontig=noncontig)
    v_m, t_m = unit(b, d, dtype=dtype, seed=seed + 2), unit(b, d, dtype=dtype, seed=seed + 3)
    q_v = unit(queue, d, dtype=dtype, seed=seed + 4) if queue else None
    q_t = unit(queue + 2, d, dtype=dtype, seed=seed + 5) if queue else None
    l_v = unit(b, image_locals, d, dtype=dtype, seed=seed + 6) if image_locals else None
    l_t = unit(b, text_locals, d, dtype=dtype, seed=seed + 7) if text_locals else None
    return v, t, v_m, t_m, q_v, q_t, l_v, l_t


def text_mask(b, p, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, p, generator=g) > 0.35
    mask[:, 0] = True
    if b > 2:
        mask[1] = False                       # a sample with no real local: skipped by LMI
    return mask


def check(inputs, tau, dtype, backend="torch", **options):
    v, t, v_m, t_m, q_v, q_t, l_v, l_t = inputs
    kw = lambda qv, qt, lv, lt: dict(image_queue=qv, text_queue=qt, image_locals_m=lv, text_locals_m=lt,  # noqa: E731
                                     **options)
    return compare(
        lambda a, b, c, e, s, qv, qt, lv, lt: mmloss.tcl_loss(a, b, c, e, s, backend=backend, **kw(qv, qt, lv, lt)),
        lambda a, b, c, e, s, qv, qt, lv, lt: ref.tcl_loss(a, b, c, e, s, **kw(qv, qt, lv, lt)),
        [v, t, v_m, t_m, tau, q_v, q_t, l_v, l_t], dtype, what="tcl_loss",
    )


def temperature(value=0.07, dtype=torch.float32):
    return torch.tensor(value, dtype=dtype, requires_grad=True)


# ----------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("b,d,queue,pi,pt", [(1, 3, 4, 0, 0), (5, 1, 3, 2, 3), (9, 67, 11, 4, 5), (7, 3, 0, 1, 6)])
def test_matches_reference(backend, b, d, queue, pi, pt):
    dtype = torch.float64 if backend in FP64_BACKENDS else torch.float32
    inputs = tcl_inputs(b, d, queue=queue, image_locals=pi, text_locals=pt, dtype=dtype, seed=b + d)
    mask = text_mask(b, pt, seed=b) if pt else None
    check(inputs, temperature(0.07, dtype), dtype, backend, text_local_mask=mask)


def test_matches_reference_fp32_noncontiguous_with_both_masks():
    b, d = 10, 67
    inputs = tcl_inputs(b, d, queue=13, image_locals=4, text_locals=7, seed=3, noncontig=True)
    image_mask = torch.ones(b, 4, dtype=torch.long)
    image_mask[:, 3] = 0
    check(inputs, temperature(0.05), torch.float32, text_local_mask=text_mask(b, 7, 1), image_local_mask=image_mask)


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_half_inputs_accumulate_in_fp32(dtype):
    inputs = tcl_inputs(8, 67, queue=5, image_locals=3, text_locals=4, dtype=dtype, seed=4)
    out, _ = check(inputs, temperature(0.07), dtype, text_local_mask=text_mask(8, 4, 2))
    assert out.dtype == torch.float32


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_extremes(alpha):
    inputs = tcl_inputs(6, 5, queue=4, dtype=torch.float64, seed=5)
    check(inputs, temperature(0.1, torch.float64), torch.float64, alpha=alpha)


def test_every_non_default_option_at_once():
    """Queues, both locals with masks, α = 0.7, custom weights, float temperature, terms returned."""
    b, d = 7, 3
    v, t, v_m, t_m, q_v, q_t, l_v, l_t = tcl_inputs(b, d, queue=6, image_locals=2, text_locals=5,
                                                    dtype=torch.float64, seed=6, noncontig=True)
    weights = {"i2t": 0.5, "lmi_t": 2.0, "t2t": 0.0}
    options = dict(image_queue=q_v, text_queue=q_t, image_locals_m=l_v, text_locals_m=l_t,
                   image_local_mask=torch.ones(b, 2, dtype=torch.bool), text_local_mask=text_mask(b, 5, 3),
                   alpha=0.7, weights=weights, return_terms=True)
    loss, terms = mmloss.tcl_loss(v, t, v_m, t_m, 0.2, backend="torch", **options)
    expected, expected_terms = ref.tcl_loss(oracle(v), oracle(t), v_m, t_m, 0.2, **options)
    assert set(terms) == {"i2t", "t2i", "i2i", "t2t", "lmi_v", "lmi_t"}
    for name in terms:
        assert_loss_close(terms[name], expected_terms[name], torch.float64, what=name)
    assert_loss_close(loss, expected, torch.float64)
    combined = sum({**{n: 1 / 6 for n in terms}, **weights}[n] * terms[n] for n in terms)
    assert_loss_close(loss, combined, torch.float64)


# ----------------------------------------------------------------------------- closed forms


def test_hard_targets_without_queue_or_locals_are_four_infonce_terms():
    v, t, v_m, t_m, *_ = tcl_inputs(8, 5, dtype=torch.float64, seed=7)
    tau = 0.1
    out = mmloss.tcl_loss(v, t, v_m, t_m, tau, alpha=0.0, backend="torch")
    s = 1.0 / tau
    expected = (ref.infonce_loss(v, t_m, s) + ref.infonce_loss(t, v_m, s)
                + ref.infonce_loss(v, v_m, s) + ref.infonce_loss(t, t_m, s)) / 6.0
    assert_loss_close(out, expected, torch.float64)


def test_identical_features_give_log_counts():
    """Every key equal: each CE is log(B + K) whatever α; LMI is log(1 + (B−1)·P)."""
    b, d, k, p = 5, 4, 3, 6
    u = unit(1, d, dtype=torch.float64, seed=1)
    same = lambda rows: u.expand(rows, d).clone()  # noqa: E731
    loss, terms = mmloss.tcl_loss(same(b), same(b), same(b), same(b), 0.07, image_queue=same(k),
                                  text_queue=same(k), text_locals_m=same(b * p).view(b, p, d),
                                  return_terms=True, backend="torch")
    for name in ("i2t", "t2i", "i2i", "t2t"):
        assert abs(terms[name].item() - math.log(b + k)) < 1e-10, name
    assert abs(terms["lmi_t"].item() - math.log(1 + (b - 1) * p)) < 1e-10


def test_single_pair_without_queue_has_no_negatives():
    """B = 1, no queue: every term has one candidate (the positive): loss 0, gradient 0."""
    v, t, v_m, t_m, _, _, l_v, _ = tcl_inputs(1, 3, image_locals=2, dtype=torch.float64, seed=12)
    tau = temperature(0.07, torch.float64)
    out = mmloss.tcl_loss(v, t, v_m, t_m, tau, image_locals_m=l_v, backend="torch")
    assert abs(out.item()) <= 1e-14           # the soft-target term cancels to rounding
    for g in torch.autograd.grad(out, [v, t, tau]):
        assert float(g.abs().max()) <= 1e-14


def test_all_padding_leaves_lmi_at_zero():
    v, t, v_m, t_m, _, _, _, l_t = tcl_inputs(4, 3, text_locals=3, dtype=torch.float64, seed=13)
    mask = torch.zeros(4, 3, dtype=torch.bool)
    loss, terms = mmloss.tcl_loss(v, t, v_m, t_m, 0.07, text_locals_m=l_t, text_local_mask=mask,
                                  return_terms=True, backend="torch")
    assert terms["lmi_t"].item() == 0.0
    expected = ref.tcl_loss(v, t, v_m, t_m, 0.07, text_locals_m=l_t, text_local_mask=mask)
    assert_loss_close(loss, expected, torch.float64)
    assert all(bool(torch.isfinite(g).all()) for g in torch.autograd.grad(loss, [v, t]))


# ----------------------------------------------------------------------------- module


def test_module_clamps_learns_temperature_and_queues_momentum_keys():
    b, d, size = 4, 3, 6
    loss_fn = mmloss.TripleContrastiveLoss(embed_dim=d, queue_size=size, temperature=1.0, backend="torch").double()
    queue_v0 = loss_fn.image_queue.keys.clone()
    queue_t0 = loss_fn.text_queue.keys.clone()
    v, t, v_m, t_m, *_ = tcl_inputs(b, d, dtype=torch.float64, seed=8)
    out = loss_fn(v, t, v_m, t_m)
    assert loss_fn.temperature.item() == 0.5                     # clamped to the upper bound
    out.backward()
    assert loss_fn.temperature.grad is not None and torch.isfinite(loss_fn.temperature.grad)
    expected = ref.tcl_loss(v, t, v_m, t_m, 0.5, image_queue=queue_v0, text_queue=queue_t0)
    assert_loss_close(out, expected, torch.float64)
    # step 2 sees this step's momentum features in the first B slots (FIFO from slot 0)
    queue_v1 = loss_fn.image_queue.keys
    assert torch.equal(queue_v1[:b], v_m.detach()) and torch.equal(queue_v1[b:], queue_v0[b:])
    assert torch.equal(loss_fn.text_queue.keys[:b], t_m.detach())
    assert "image_queue.queue" in loss_fn.state_dict() and "temperature" in loss_fn.state_dict()


def test_module_alpha_override_and_no_queue():
    v, t, v_m, t_m, *_ = tcl_inputs(5, 3, dtype=torch.float64, seed=9)
    loss_fn = mmloss.TripleContrastiveLoss(backend="torch").double()
    assert loss_fn.image_queue is None and loss_fn.distributed is None
    out = loss_fn(v, t, v_m, t_m, alpha=0.0)
    tau = loss_fn.temperature.detach()
    assert_loss_close(out, ref.tcl_loss(v, t, v_m, t_m, tau, alpha=0.0), torch.float64)


def test_module_refuses_a_distributed_loss_and_keeps_its_state():
    """TCL has no distributed form: "gather" / "ring" (and "auto" under a world size > 1, see
    tests/distributed/test_defaults.py) raise a RuntimeError before any state changes — never a
    silent rank-local loss. "auto" without a process group is the local loss."""
    v, t, v_m, t_m, *_ = tcl_inputs(4, 3, dtype=torch.float64, seed=12)
    for mode in ("gather", "ring"):
        loss_fn = mmloss.TripleContrastiveLoss(3, 6, temperature=0.9, distributed=mode, backend="torch").double()
        before = {k: b.clone() for k, b in loss_fn.state_dict().items()}
        with pytest.raises(RuntimeError, match=rf"distributed='{mode}' is not supported.*distributed=None"):
            loss_fn(v, t, v_m, t_m)
        after = loss_fn.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), mode
    auto = mmloss.TripleContrastiveLoss(distributed="auto", backend="torch").double()
    assert torch.equal(auto(v, t, v_m, t_m), mmloss.TripleContrastiveLoss(backend="torch").double()(v, t, v_m, t_m))


def test_no_grad_and_inference_mode_evaluation():
    """Soft targets come from the cross-entropy primitive, not from an autograd call inside the
    forward, so inference mode works too (it used to be refused with α > 0)."""
    v, t, v_m, t_m, *_ = tcl_inputs(4, 3, seed=10)
    with torch.no_grad():
        value = mmloss.tcl_loss(v, t, v_m, t_m, 0.07, backend="torch")
    assert_loss_close(value, ref.tcl_loss(oracle(v), oracle(t), v_m, t_m, 0.07), torch.float32)
    with torch.inference_mode():
        soft = mmloss.tcl_loss(v, t, v_m, t_m, 0.07, backend="torch")
        hard_only = mmloss.tcl_loss(v, t, v_m, t_m, 0.07, alpha=0.0, backend="torch")
    assert_loss_close(soft, ref.tcl_loss(oracle(v), oracle(t), v_m, t_m, 0.07), torch.float32)
    assert_loss_close(hard_only, ref.tcl_loss(oracle(v), oracle(t), v_m, t_m, 0.07, alpha=0.0), torch.float32)


# ----------------------------------------------------------------------------- bad inputs


def _args(b=4, d=3):
    v, t, v_m, t_m, *_ = tcl_inputs(b, d)
    return v, t, v_m, t_m


def test_rejects_mismatched_global_shapes():
    v, t, v_m, t_m = _args()
    with pytest.raises(ValueError, match="same shape"):
        mmloss.tcl_loss(v, t[:3], v_m, t_m, 0.07)


def test_rejects_momentum_of_another_shape():
    v, t, v_m, t_m = _args()
    with pytest.raises(ValueError, match="image_features_m"):
        mmloss.tcl_loss(v, t, v_m[:2], t_m, 0.07)


def test_rejects_queue_of_another_dimension():
    v, t, v_m, t_m = _args()
    with pytest.raises(ValueError, match="feature dimension"):
        mmloss.tcl_loss(v, t, v_m, t_m, 0.07, image_queue=unit(5, 4))


def test_rejects_two_dimensional_locals():
    v, t, v_m, t_m = _args()
    with pytest.raises(ValueError, match="3-D"):
        mmloss.tcl_loss(v, t, v_m, t_m, 0.07, text_locals_m=unit(4, 3))


def test_rejects_locals_of_another_batch():
    v, t, v_m, t_m = _args()
    with pytest.raises(ValueError, match="text_locals_m"):
        mmloss.tcl_loss(v, t, v_m, t_m, 0.07, text_locals_m=unit(3, 2, 3))


def test_rejects_a_floating_mask():
    v, t, v_m, t_m = _args()
    with pytest.raises(TypeError, match="text_local_mask"):
        mmloss.tcl_loss(v, t, v_m, t_m, 0.07, text_locals_m=unit(4, 2, 3), text_local_mask=torch.ones(4, 2))


def test_rejects_a_mask_of_another_shape():
    v, t, v_m, t_m = _args()
    with pytest.raises(ValueError, match="text_local_mask"):
        mmloss.tcl_loss(v, t, v_m, t_m, 0.07, text_locals_m=unit(4, 2, 3),
                        text_local_mask=torch.ones(4, 3, dtype=torch.bool))


def test_rejects_a_mask_without_locals():
    v, t, v_m, t_m = _args()
    with pytest.raises(ValueError, match="without"):
        mmloss.tcl_loss(v, t, v_m, t_m, 0.07, text_local_mask=torch.ones(4, 2, dtype=torch.bool))


def test_rejects_non_positive_temperature():
    v, t, v_m, t_m = _args()
    with pytest.raises(ValueError, match="temperature"):
        mmloss.tcl_loss(v, t, v_m, t_m, 0.0)


def test_rejects_alpha_above_one():
    v, t, v_m, t_m = _args()
    with pytest.raises(ValueError, match="alpha"):
        mmloss.tcl_loss(v, t, v_m, t_m, 0.07, alpha=1.5)


def test_rejects_unknown_weight_names():
    v, t, v_m, t_m = _args()
    with pytest.raises(ValueError, match="unknown term"):
        mmloss.tcl_loss(v, t, v_m, t_m, 0.07, weights={"itm": 1.0})


def test_rejects_weights_that_are_not_a_mapping():
    v, t, v_m, t_m = _args()
    with pytest.raises(TypeError, match="mapping"):
        mmloss.tcl_loss(v, t, v_m, t_m, 0.07, weights=[1.0] * 6)


def test_module_needs_embed_dim_for_queues():
    with pytest.raises(ValueError, match="embed_dim"):
        mmloss.TripleContrastiveLoss(queue_size=8)


def test_module_rejects_inverted_temperature_bounds():
    with pytest.raises(ValueError, match="temperature_bounds"):
        mmloss.TripleContrastiveLoss(temperature_bounds=(0.5, 0.001))


def test_gradients_flow_to_online_features_only():
    v, t, v_m, t_m, q_v, q_t, l_v, l_t = tcl_inputs(5, 3, queue=2, image_locals=2, text_locals=2, seed=11)
    for frozen in (v_m, t_m, q_v, q_t, l_v, l_t):
        frozen.requires_grad_()
    tau = temperature()
    out = mmloss.tcl_loss(v, t, v_m, t_m, tau, image_queue=q_v, text_queue=q_t, image_locals_m=l_v,
                          text_locals_m=l_t, backend="torch")
    out.backward()
    assert all(x.grad is not None for x in (v, t, tau))
    assert all(x.grad is None for x in (v_m, t_m, q_v, q_t, l_v, l_t))


# ----------------------------------------------------------------------------- state and value rules (issue 8)


@pytest.mark.parametrize("tau", [1e-39, torch.tensor(1e-39), torch.tensor(1e-39, dtype=torch.float64)])
def test_rejects_a_temperature_whose_reciprocal_overflows(tau):
    """Issue 8, item 7: τ = 1e-39 passed validation and gave NaN in fp32."""
    v, t, v_m, t_m = _args()
    with pytest.raises(ValueError, match="temperature"):
        mmloss.tcl_loss(v, t, v_m, t_m, tau, backend="torch")


def test_fp64_accepts_a_temperature_fp32_cannot_invert():
    v, t, v_m, t_m, *_ = tcl_inputs(4, 3, dtype=torch.float64, seed=14)
    tau = 1e-39 * 1e36                                          # 1e-3 is fine anywhere; 1e-300 only in fp64
    assert bool(torch.isfinite(mmloss.tcl_loss(v, t, v_m, t_m, tau, backend="torch")))
    with pytest.raises(ValueError, match="temperature"):
        mmloss.tcl_loss(*(x.float() for x in (v, t, v_m, t_m)), 1e-300, backend="torch")


def test_module_rejects_bounds_whose_reciprocal_overflows_fp32():
    with pytest.raises(ValueError, match="temperature_bounds"):
        mmloss.TripleContrastiveLoss(temperature_bounds=(1e-39, 0.5))


def _queued_module(**options):
    return mmloss.TripleContrastiveLoss(embed_dim=3, queue_size=6, temperature=1.0, backend="torch", **options)


def test_eval_mode_neither_clamps_nor_enqueues():
    """Issue 8, item 4: under .eval() TCL pushed validation features into its queues and
    clamped τ in place."""
    loss_fn = _queued_module().eval()
    before = {name: buf.clone() for name, buf in loss_fn.state_dict().items()}
    v, t, v_m, t_m, *_ = tcl_inputs(4, 3, seed=15)
    with torch.no_grad():
        value = loss_fn(v, t, v_m, t_m)
    after = loss_fn.state_dict()
    for name, buf in before.items():
        assert torch.equal(after[name], buf), name
    assert loss_fn.temperature.item() == 1.0 and len(loss_fn.image_queue) == 6
    expected = ref.tcl_loss(oracle(v), oracle(t), v_m, t_m, 0.5, image_queue=before["image_queue.queue"],
                            text_queue=before["text_queue.queue"])
    assert_loss_close(value, expected, torch.float32)           # scored at the clamped τ = 0.5
    loss_fn.train()
    trained = loss_fn(v, t, v_m, t_m)
    assert_loss_close(trained, expected, torch.float32)
    assert loss_fn.temperature.item() == 0.5 and torch.equal(loss_fn.image_queue.keys[:4], v_m)


def test_update_state_in_eval_keeps_tcl_behaviour():
    loss_fn = _queued_module(update_state_in_eval=True).eval()
    v, t, v_m, t_m, *_ = tcl_inputs(4, 3, seed=16)
    with torch.no_grad():
        loss_fn(v, t, v_m, t_m)
    assert loss_fn.temperature.item() == 0.5 and torch.equal(loss_fn.text_queue.keys[:4], t_m)


def test_non_finite_momentum_features_are_never_enqueued():
    loss_fn = _queued_module()
    before = {name: buf.clone() for name, buf in loss_fn.state_dict().items()}
    v, t, v_m, t_m, *_ = tcl_inputs(4, 3, seed=17)
    t_m = t_m.clone()
    t_m[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"text_features_m \(4, 3\) has non-finite entries"):
        loss_fn(v, t, v_m, t_m)
    after = loss_fn.state_dict()
    for name in ("image_queue.queue", "image_queue.ptr", "text_queue.queue", "text_queue.ptr", "text_queue.filled"):
        assert torch.equal(after[name], before[name]), name


@pytest.mark.parametrize("cast", ["double", "half"])
def test_queued_module_works_after_a_cast_with_deferred_keys(cast):
    """Issue 8, item 5: deferred keys broke state_dict(), the next forward and ``keys`` after
    .double()/.half()."""
    dtype = torch.float64 if cast == "double" else torch.float16
    loss_fn = _queued_module()
    v, t, v_m, t_m, *_ = tcl_inputs(4, 3, seed=18)
    loss_fn(v, t, v_m, t_m)                                     # leaves deferred keys
    getattr(loss_fn, cast)()
    state = loss_fn.state_dict()
    assert state["image_queue.queue"].dtype == dtype
    assert torch.equal(state["image_queue.queue"][:4], v_m.detach().to(dtype))
    v2, t2, v2_m, t2_m, *_ = tcl_inputs(4, 3, dtype=dtype, seed=19)
    out = loss_fn(v2, t2, v2_m, t2_m)
    assert torch.isfinite(out) and len(loss_fn.image_queue) == 6
    assert torch.equal(loss_fn.image_queue.keys[4:], v2_m.detach()[:2])


def test_queued_module_survives_deepcopy_and_state_dict():
    import copy

    loss_fn = _queued_module()
    v, t, v_m, t_m, *_ = tcl_inputs(4, 3, seed=20)
    loss_fn(v, t, v_m, t_m)
    clone = copy.deepcopy(loss_fn)
    restored = _queued_module()
    restored.load_state_dict(loss_fn.state_dict())
    v2, t2, v2_m, t2_m, *_ = tcl_inputs(4, 3, seed=21)
    expected = loss_fn(v2, t2, v2_m, t2_m)
    for other in (clone, restored):
        assert torch.equal(other(v2, t2, v2_m, t2_m), expected)
        assert torch.equal(other.text_queue.keys, loss_fn.text_queue.keys)


def test_non_finite_inputs_propagate_unless_check_finite():
    v, t, v_m, t_m, q_v, q_t, *_ = tcl_inputs(4, 3, queue=3, seed=22)
    q_t = q_t.clone()
    q_t[1, 2] = float("nan")
    assert torch.isnan(mmloss.tcl_loss(v, t, v_m, t_m, 0.07, image_queue=q_v, text_queue=q_t, backend="torch"))
    with pytest.raises(ValueError, match=r"text_queue .*text_queue\[1, 2\]"):
        mmloss.tcl_loss(v, t, v_m, t_m, 0.07, image_queue=q_v, text_queue=q_t, check_finite=True, backend="torch")
    loss_fn = mmloss.TripleContrastiveLoss(check_finite=True, backend="torch")
    bad_v = v.detach().clone()
    bad_v[0, 0] = float("inf")
    with pytest.raises(ValueError, match="image_features"):
        loss_fn(bad_v, t, v_m, t_m)


def test_device_path_moves_neither_queue_when_one_side_is_non_finite(monkeypatch):
    """Off the eager CPU path the refusal is a device-side assert reported later; both queues'
    writes are gated on both sides being finite (simulated on the CPU)."""
    import mmloss._validation as validation

    fired = []
    monkeypatch.setattr(validation, "value_checks_enabled", lambda *values: False)
    monkeypatch.setattr(torch, "_assert_async", lambda flag, message: fired.append(bool(flag)))
    loss_fn = _queued_module()
    before = {name: buf.clone() for name, buf in loss_fn.state_dict().items()}
    v, t, v_m, t_m, *_ = tcl_inputs(4, 3, seed=23)
    t_m = t_m.clone()
    t_m[0, 0] = float("nan")
    loss_fn(v, t, v_m, t_m)
    after = loss_fn.state_dict()
    assert False in fired
    for name, buf in before.items():
        if name != "temperature":                              # clamped in training, as always
            assert torch.equal(after[name], buf), name
