"""Randomized agreement of the torch backend's primitives with the float64 reference (hypothesis).

Every example is one fully specified primitive call (``mmloss.check.PrimitiveCase``): random N, M
(1..12), D (1..70, ragged), fp32 or fp64, logit bounds L from 0.1 to 1e5 (and scale 0), scalar,
0-d-tensor, frozen or per-row scales, no / float / tensor bias, every exclude / positives mode
with offsets and labels, rows-only / cols-only outputs, non-contiguous features, chunk sizes, the
summed sigmoid, KL with a teacher of another D and cross-entropy. Values and gradients are held
to docs/design.md's rules as ``mmloss.check`` states them (``compare_values`` / ``compare_grads``:
logit-aware fp32 values, 1e-4·max|g| gradients, 4× dense fp32 at large L).

CI runs 150 + 60 + 40 + 60 = 310 examples (derandomized: the same on every machine, see
tests/conftest.py); ``MMLOSS_HYPOTHESIS_EXAMPLES=<n>`` runs n per test. A failure shrinks to a
minimal case and prints it (and a ``@reproduce_failure`` blob); rerun it alone with
``mmloss.check.run_primitive_case(case, "torch")``.
"""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mmloss.check import PrimitiveCase, run_primitive_case
from oracle import hypothesis_examples

BACKEND = "torch"


@st.composite
def primitive_cases(draw, primitive: str, *, dtypes=("fp32", "fp64"), max_rows: int = 12, max_d: int = 70,
                    max_log_logit: float = 5.0) -> PrimitiveCase:
    """A random ``PrimitiveCase`` of ``primitive`` ("lse", "sigmoid", "kl"; "sigmoid" also draws
    the summed form)."""
    n = draw(st.integers(1, max_rows))
    m = draw(st.integers(1, max_rows))
    d = draw(st.integers(1, max_d))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    radius = 10.0 ** draw(st.floats(-0.5, 1.0))
    if draw(st.integers(0, 19)) == 0:
        scale = 0.0
    else:
        logit = 10.0 ** draw(st.floats(-1.0, max_log_logit))
        scale = logit / radius**2 * draw(st.sampled_from([1.0, -1.0]))
    scale_kinds = ["float", "tensor", "frozen"] + ([] if primitive == "kl" else ["per_row"])
    fields = dict(n=n, m=m, d=d, dtype=dtype, seed=seed, radius=radius, scale=scale,
                  scale_kind=draw(st.sampled_from(scale_kinds)), noncontiguous=draw(st.booleans()),
                  chunk_size=draw(st.one_of(st.none(), st.integers(1, 5))))
    if primitive == "kl":
        fields.update(
            rows=draw(st.booleans()), teacher_d=draw(st.one_of(st.none(), st.integers(1, max_d))),
            teacher_scale=10.0 ** draw(st.floats(-1.0, max_log_logit)) / radius**2,
            cross_entropy=draw(st.booleans()))
        fields["cols"] = draw(st.booleans()) if fields["rows"] else True
        return PrimitiveCase("kl", **fields)
    mode = draw(st.sampled_from(["none", "diagonal", "same_label"]))
    fields.update(mode=mode, offset=draw(st.integers(-3, 3)) if mode == "diagonal" else 0,
                  classes=draw(st.integers(1, 4)),
                  bias=draw(st.one_of(st.none(), st.floats(-10.0, 10.0))),
                  bias_kind=draw(st.sampled_from(["float", "tensor"])))
    if primitive == "lse":
        fields["rows"] = draw(st.booleans())
        fields["cols"] = draw(st.booleans()) if fields["rows"] else True
        return PrimitiveCase("lse", **fields)
    return PrimitiveCase(draw(st.sampled_from(["sigmoid", "sigmoid_sum"])), **fields)


def assert_agrees(case: PrimitiveCase, backend: str = BACKEND) -> None:
    comparisons = run_primitive_case(case, backend)
    failed = [c for c in comparisons if not c.ok]
    assert not failed, f"{backend} disagrees with the reference on {case}:\n" + "\n".join(map(str, failed))


@settings(max_examples=hypothesis_examples(150))
@given(primitive_cases("lse"))
def test_similarity_lse_agrees(case):
    assert_agrees(case)


@settings(max_examples=hypothesis_examples(60))
@given(primitive_cases("sigmoid"))
def test_pairwise_sigmoid_agrees(case):
    assert_agrees(case)


@settings(max_examples=hypothesis_examples(40))
@given(primitive_cases("kl"))
def test_similarity_kl_agrees(case):
    assert_agrees(case)


@settings(max_examples=hypothesis_examples(60))
@given(primitive_cases("lse", dtypes=("fp32",), max_rows=6, max_d=40, max_log_logit=6.0))
def test_similarity_lse_agrees_at_large_logits(case):
    """fp32 up to L = 1e6, where the gradient rule is 4× dense fp32's error on the same inputs."""
    assert_agrees(case)
