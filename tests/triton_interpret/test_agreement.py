"""Randomized agreement of the triton backend's primitives with the float64 reference, run by the
Triton interpreter on CPU tensors (TRITON_INTERPRET=1; hypothesis).

Each example is one fully specified primitive call (``mmloss.check.PrimitiveCase``) on
backend="triton": random N, M (1..24), D (1..40), fp32 or fp16 (the interpreter has no bf16),
logit bounds L from 0.1 to 1e4 (and scale 0), scalar / 0-d tensor / frozen / per-row scales,
no / float / tensor bias, every exclude / positives mode with offsets and labels, rows-only /
cols-only outputs, non-contiguous features, the summed sigmoid, KL with a teacher of another D
and cross-entropy. Values and gradients are held to docs/design.md's rules as ``mmloss.check`` states
them. CI runs 45 + 30 + 25 = 100 derandomized examples (about a minute on 2 cores);
``MMLOSS_HYPOTHESIS_EXAMPLES=<n>`` runs n per test.
"""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mmloss.check import PrimitiveCase, run_primitive_case
from oracle import hypothesis_examples

BACKEND = "triton"
MAX_ROWS, MAX_D, MAX_LOG_LOGIT = 24, 40, 4.0


@st.composite
def interpreter_cases(draw, primitive: str) -> PrimitiveCase:
    """A random ``PrimitiveCase`` of ``primitive`` ("lse", "sigmoid" — also its summed form —
    or "kl") small enough for the interpreter."""
    n = draw(st.integers(1, MAX_ROWS))
    m = draw(st.integers(1, MAX_ROWS))
    d = draw(st.integers(1, MAX_D))
    radius = 10.0 ** draw(st.floats(-0.5, 1.0))
    if draw(st.integers(0, 19)) == 0:
        scale = 0.0
    else:
        scale = 10.0 ** draw(st.floats(-1.0, MAX_LOG_LOGIT)) / radius**2 * draw(st.sampled_from([1.0, -1.0]))
    scale_kinds = ["float", "tensor", "frozen"] + ([] if primitive == "kl" else ["per_row"])
    fields = dict(n=n, m=m, d=d, dtype=draw(st.sampled_from(["fp32", "fp16"])), seed=draw(st.integers(0, 2**31 - 1)),
                  radius=radius, scale=scale, scale_kind=draw(st.sampled_from(scale_kinds)),
                  noncontiguous=draw(st.booleans()))
    if primitive == "kl":
        fields.update(rows=draw(st.booleans()), teacher_d=draw(st.one_of(st.none(), st.integers(1, MAX_D))),
                      teacher_scale=10.0 ** draw(st.floats(-1.0, MAX_LOG_LOGIT)) / radius**2,
                      cross_entropy=draw(st.booleans()))
        fields["cols"] = draw(st.booleans()) if fields["rows"] else True
        return PrimitiveCase("kl", **fields)
    mode = draw(st.sampled_from(["none", "diagonal", "same_label"]))
    fields.update(mode=mode, offset=draw(st.integers(-3, 3)) if mode == "diagonal" else 0,
                  classes=draw(st.integers(1, 4)), bias=draw(st.one_of(st.none(), st.floats(-10.0, 10.0))),
                  bias_kind=draw(st.sampled_from(["float", "tensor"])))
    if primitive == "lse":
        fields["rows"] = draw(st.booleans())
        fields["cols"] = draw(st.booleans()) if fields["rows"] else True
        return PrimitiveCase("lse", **fields)
    return PrimitiveCase(draw(st.sampled_from(["sigmoid", "sigmoid_sum"])), **fields)


def assert_agrees(case: PrimitiveCase) -> None:
    comparisons = run_primitive_case(case, BACKEND)
    failed = [c for c in comparisons if not c.ok]
    assert not failed, f"{BACKEND} disagrees with the reference on {case}:\n" + "\n".join(map(str, failed))


@settings(max_examples=hypothesis_examples(45))
@given(interpreter_cases("lse"))
def test_similarity_lse_agrees(case):
    assert_agrees(case)


@settings(max_examples=hypothesis_examples(30))
@given(interpreter_cases("sigmoid"))
def test_pairwise_sigmoid_agrees(case):
    assert_agrees(case)


@settings(max_examples=hypothesis_examples(25))
@given(interpreter_cases("kl"))
def test_similarity_kl_agrees(case):
    assert_agrees(case)
