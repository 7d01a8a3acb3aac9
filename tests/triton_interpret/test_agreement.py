"""Randomized agreement of the triton backend's primitives with the float64 reference, run by the
Triton interpreter on CPU tensors (TRITON_INTERPRET=1; hypothesis).

Each example is one fully specified primitive call (``mmloss.check.PrimitiveCase``) on
backend="triton": random N, M (1..24), D (1..40), fp32 or fp16 (the interpreter has no bf16),
logit bounds L from 0.1 to 1e4 (and scale 0), scalar / 0-d tensor / frozen / per-row scales,
no / float / tensor bias, every exclude / positives mode with offsets and labels, rows-only /
cols-only outputs, non-contiguous features, the summed sigmoid, KL with a teacher of another D
and cross-entropy. Values and gradients are held to docs/design.md's rules as ``mmloss.check`` states
them. The strategies are shared with the torch suite (tests/agreement_strategies.py).
CI runs 45 + 30 + 25 = 100 derandomized examples (about a minute on 2 cores);
``MMLOSS_HYPOTHESIS_EXAMPLES=<n>`` runs n per test.
"""
from __future__ import annotations

import functools

from hypothesis import given, settings

from agreement_strategies import assert_backend_agrees, primitive_cases
from oracle import hypothesis_examples

BACKEND = "triton"
MAX_ROWS, MAX_D, MAX_LOG_LOGIT = 24, 40, 4.0

# The test bodies below are part of each test's derandomization seed: keep their text as is.
assert_agrees = functools.partial(assert_backend_agrees, backend=BACKEND)


def interpreter_cases(primitive: str):
    """Random ``PrimitiveCase``s of ``primitive`` ("lse", "sigmoid" — also its summed form —
    or "kl") small enough for the interpreter: fp32 / fp16, default chunking."""
    return primitive_cases(primitive, dtypes=("fp32", "fp16"), max_rows=MAX_ROWS, max_d=MAX_D,
                           max_log_logit=MAX_LOG_LOGIT, chunk_sizes=False, dtype_first=False)


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
