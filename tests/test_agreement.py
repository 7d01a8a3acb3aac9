"""Randomized agreement of the torch backend's primitives with the float64 reference (hypothesis).

Every example is one fully specified primitive call (``mmloss.check.PrimitiveCase``): random N, M
(1..12), D (1..70, ragged), fp32 or fp64, logit bounds L from 0.1 to 1e5 (and scale 0), scalar,
0-d-tensor, frozen or per-row scales, no / float / tensor bias, every exclude / positives mode
with offsets and labels, rows-only / cols-only outputs, non-contiguous features, chunk sizes, the
summed sigmoid, KL with a teacher of another D and cross-entropy. Values and gradients are held
to docs/design.md's rules as ``mmloss.check`` states them (``compare_values`` / ``compare_grads``:
logit-aware fp32 values, 1e-4·max|g| gradients, 4× dense fp32 at large L). The strategies are
shared with the Triton-interpreter suite (tests/agreement_strategies.py).

CI runs 150 + 60 + 40 + 60 = 310 examples (derandomized: the same on every machine, see
tests/conftest.py); ``MMLOSS_HYPOTHESIS_EXAMPLES=<n>`` runs n per test. A failure shrinks to a
minimal case and prints it (and a ``@reproduce_failure`` blob); rerun it alone with
``mmloss.check.run_primitive_case(case, "torch")``.
"""
from __future__ import annotations

import functools

from hypothesis import given, settings

from agreement_strategies import assert_backend_agrees, primitive_cases
from oracle import hypothesis_examples

BACKEND = "torch"

# The test bodies below are part of each test's derandomization seed: keep their text as is.
assert_agrees = functools.partial(assert_backend_agrees, backend=BACKEND)


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
