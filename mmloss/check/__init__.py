"""``python -m mmloss.check``: a self-test of the installed backends on this machine's devices.

For every backend usable here ("torch" always; "triton" on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1``; "cpu" / "cuda" once ``mmloss._C`` is built) and every dtype it supports,
the fused primitives (``similarity_lse`` with each ``exclude`` mode, ``pairwise_sigmoid`` with
each ``positives`` mode, ``similarity_kl``) and the main losses (CLIP, InfoNCE, SigLIP, NT-Xent,
SupCon) are compared — values and gradients — with ``mmloss.reference`` evaluated in float64 on
the CPU from the same rounded inputs, at a few sizes (tiny, ragged, a few hundred rows) and at
large logits (L = 1e2 … 1e6). A table of worst errors and bounds is printed; the exit status is
0 when every check passes and 1 otherwise.

    python -m mmloss.check                      # every usable backend and dtype, every device
    python -m mmloss.check --quick              # fewer sizes
    python -m mmloss.check --backends torch --dtypes fp32,bf16 --device cpu --checks lse,clip

The comparison engine is importable (``compare_values``, ``compare_grads``, ``agree``,
``run_checks``) so test suites hold every path to the same rules. The tolerances (docs/design.md,
"Testing rules": logit-aware values, gradients relative to max|g|, never stricter than 4× dense
fp32 on the same inputs) are stated in full in ``mmloss.check.compare``.

fp32 matmuls run at "highest" precision during the checks (TF32 would not meet fp32 bounds).

Modules, by responsibility:

* ``compare``: tolerances and the value / gradient rules (``Comparison``, ``compare_values``,
  ``compare_grads``, ``worst``);
* ``agree``: running a fast path, the float64 reference and dense fp32 on the same inputs;
* ``cases``: the named checks (``CHECKS``) and their problems (``SIZES``, large logits);
* ``primitive_case``: one fully specified primitive call (``PrimitiveCase``), for the
  randomized agreement suites;
* ``runner``: what is usable here and running the selected checks (``run_checks``);
* ``report`` and ``cli``: the table and the command line (``main``); ``__main__`` runs it.
"""
from __future__ import annotations

from .agree import agree, as_dense_fp32, as_oracle, upstream_weights
from .cases import CHECKS, QUICK_SIZES, SIZES, Check, Problem, large_logit_problems, prescaled, run_check
from .cli import main
from .compare import (
    DENSE_FACTOR,
    DENSE_SLACK,
    DTYPE_NAMES,
    DTYPES,
    HALF,
    LARGE_LOGIT,
    Comparison,
    Tensor,
    compare_grads,
    compare_values,
    worst,
)
from .primitive_case import PrimitiveCase, build_primitive_case, case_logit_bound, run_primitive_case
from .report import format_row, header
from .runner import Result, exact_fp32_matmul, run_checks, supported_dtypes, usable_backends

__all__ = [
    "Tensor", "DTYPES", "DTYPE_NAMES", "HALF", "LARGE_LOGIT", "DENSE_FACTOR", "DENSE_SLACK",
    "Comparison", "compare_values", "compare_grads", "worst",
    "as_oracle", "as_dense_fp32", "upstream_weights", "agree",
    "Problem", "Result", "Check", "prescaled", "CHECKS", "SIZES", "QUICK_SIZES", "large_logit_problems",
    "run_check",
    "PrimitiveCase", "case_logit_bound", "build_primitive_case", "run_primitive_case",
    "usable_backends", "supported_dtypes", "exact_fp32_matmul", "run_checks",
    "header", "format_row", "main",
]
