"""Hypothesis strategies and the assertion shared by the randomized agreement suites
(tests/test_agreement.py on the torch backend, tests/triton_interpret/test_agreement.py on the
Triton interpreter).

``primitive_cases(primitive, ...)`` draws one fully specified primitive call
(``mmloss.check.PrimitiveCase``); ``assert_backend_agrees(case, backend)`` holds it to
docs/design.md's rules as ``mmloss.check`` states them.

The order of the draws decides which examples a derandomized run generates (tests/conftest.py):
``dtype_first`` and ``chunk_sizes`` keep each suite drawing in the order it always did, so both
keep running the same examples.
"""
from __future__ import annotations

from hypothesis import strategies as st

from mmloss.check import PrimitiveCase, run_primitive_case


def _precision(draw, dtypes) -> dict:
    """dtype and the seed of the inputs."""
    return dict(dtype=draw(st.sampled_from(dtypes)), seed=draw(st.integers(0, 2**31 - 1)))


def _radius_and_scale(draw, max_log_logit: float) -> tuple[float, float]:
    """Feature norm 10^[-0.5, 1] and a scale of either sign giving logits 10^[-1, max_log_logit]
    (scale 0 one time in 20)."""
    radius = 10.0 ** draw(st.floats(-0.5, 1.0))
    if draw(st.integers(0, 19)) == 0:
        return radius, 0.0
    return radius, 10.0 ** draw(st.floats(-1.0, max_log_logit)) / radius**2 * draw(st.sampled_from([1.0, -1.0]))


def _kl_case(draw, fields: dict, radius: float, max_d: int, max_log_logit: float) -> PrimitiveCase:
    """A KL case: rows / cols (at least one), a teacher of its own D and logit range,
    cross-entropy or not."""
    rows = draw(st.booleans())
    fields.update(rows=rows, teacher_d=draw(st.one_of(st.none(), st.integers(1, max_d))),
                  teacher_scale=10.0 ** draw(st.floats(-1.0, max_log_logit)) / radius**2,
                  cross_entropy=draw(st.booleans()))
    fields["cols"] = draw(st.booleans()) if rows else True
    return PrimitiveCase("kl", **fields)


def _pair_case(draw, primitive: str, fields: dict) -> PrimitiveCase:
    """An "lse" or sigmoid case: mode with offset / labels, no / float / tensor bias; "sigmoid"
    also draws the summed form."""
    mode = draw(st.sampled_from(["none", "diagonal", "same_label"]))
    fields.update(mode=mode, offset=draw(st.integers(-3, 3)) if mode == "diagonal" else 0,
                  classes=draw(st.integers(1, 4)), bias=draw(st.one_of(st.none(), st.floats(-10.0, 10.0))),
                  bias_kind=draw(st.sampled_from(["float", "tensor"])))
    if primitive == "lse":
        fields["rows"] = draw(st.booleans())
        fields["cols"] = draw(st.booleans()) if fields["rows"] else True  # at least one output
        return PrimitiveCase("lse", **fields)
    return PrimitiveCase(draw(st.sampled_from(["sigmoid", "sigmoid_sum"])), **fields)


@st.composite
def primitive_cases(draw, primitive: str, *, dtypes=("fp32", "fp64"), max_rows: int = 12, max_d: int = 70,
                    max_log_logit: float = 5.0, chunk_sizes: bool = True,
                    dtype_first: bool = True) -> PrimitiveCase:
    """A random ``PrimitiveCase`` of ``primitive`` ("lse", "sigmoid", "kl"; "sigmoid" also draws
    the summed form).

    N, M in 1..max_rows; D in 1..max_d (also the teacher's); logit bounds 10^[-1, max_log_logit];
    scalar, 0-d tensor, frozen or (not KL) per-row scales; non-contiguous features or not;
    chunk sizes None or 1..5 when ``chunk_sizes``. dtype_first: draw dtype and seed before the
    feature norm and scale (the torch suite's order) rather than after them (the interpreter's).
    """
    n = draw(st.integers(1, max_rows))
    m = draw(st.integers(1, max_rows))
    d = draw(st.integers(1, max_d))
    if dtype_first:
        precision = _precision(draw, dtypes)
    radius, scale = _radius_and_scale(draw, max_log_logit)
    if not dtype_first:
        precision = _precision(draw, dtypes)
    scale_kinds = ["float", "tensor", "frozen"] + ([] if primitive == "kl" else ["per_row"])
    fields = dict(n=n, m=m, d=d, **precision, radius=radius, scale=scale,
                  scale_kind=draw(st.sampled_from(scale_kinds)), noncontiguous=draw(st.booleans()))
    if chunk_sizes:
        fields["chunk_size"] = draw(st.one_of(st.none(), st.integers(1, 5)))
    if primitive == "kl":
        return _kl_case(draw, fields, radius, max_d, max_log_logit)
    return _pair_case(draw, primitive, fields)


def assert_backend_agrees(case: PrimitiveCase, backend: str) -> None:
    """Every value and gradient of ``case`` on ``backend`` within the rules of ``mmloss.check``;
    the failure names the case and each failing comparison."""
    comparisons = run_primitive_case(case, backend)
    failed = [c for c in comparisons if not c.ok]
    assert not failed, f"{backend} disagrees with the reference on {case}:\n" + "\n".join(map(str, failed))
