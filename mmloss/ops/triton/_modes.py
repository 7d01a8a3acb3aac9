"""Named modes of the triton kernels: one definition per mode, for the host and for the kernels.

The host picks a mode with the ``enum.IntEnum`` members below and passes its integer value as a
kernel's ``tl.constexpr`` argument (``_launch.Pair.args``); ``@triton.jit`` code compares that
argument with the module-level ``tl.constexpr`` names below (``SCALE_MODE == SCALE_PER_A_ROW``).
Kernels can only read globals that are ``tl.constexpr`` instances (Triton raises "Cannot access
global variable ... from within @jit'ed function" for a plain int), so each kernel constant is
built from its enum member here and the two can never disagree; the comparisons fold at compile
time (under ``TRITON_INTERPRET=1`` they are plain Python comparisons), so the generated code is
the one an integer literal gave. In ``@triton.jit`` code a constant stands in comparisons, as a
call argument, or on the right of an arithmetic operator (``field * KL_PART_TEACHER_MAX``): a
``tl.constexpr`` on the left of a tensor would wrap the tensor under the interpreter.

Enums (host) and their kernel constants:

- ``ScaleMode`` (constexpr ``SCALE_MODE``, ``T_SCALE_MODE``): how a kernel reads the logit
  scale — ``FLOAT`` a Python float (the fp32 argument ``scale_value``), ``TENSOR`` a 0-d tensor
  (``scale_ptr[0]``), ``PER_A_ROW`` one value per row of A (the owned operand),
  ``PER_B_ROW`` one value per row of B (the streamed one: x's per-row scale when A is y);
  kernels: ``SCALAR_FLOAT``, ``SCALAR_TENSOR``, ``SCALE_PER_A_ROW``, ``SCALE_PER_B_ROW``.
- ``BiasMode`` (constexpr ``BIAS_MODE``): ``FLOAT`` or ``TENSOR``, the same two values as the
  scalar scale modes (``_common.load_scalar`` reads either); kernels: ``SCALAR_FLOAT``,
  ``SCALAR_TENSOR``.
- ``MarkMode`` (constexpr ``MARKS``): the pairs a loss marks (positives, excluded from the
  softmax family's statistics, ``z = +1`` for the sigmoid) — ``NONE``; ``DIAGONAL``
  ``b == a + offset``; ``SAME_LABEL`` ``a_labels[a] == b_labels[b]``; kernels:
  ``MARKS_NONE``, ``MARKS_DIAGONAL``, ``MARKS_SAME_LABEL``.
- ``OwnerKind`` (constexpr ``KIND`` of ``owner._owner_kernel``): the gradient tile's family —
  ``LSE`` the softmax family from saved statistics, ``SIGMOID`` the pairwise sigmoid; kernels:
  ``KIND_LSE``, ``KIND_SIGMOID``.
- ``LseStat``: rows of the (2, n) fp32 statistics of ``similarity_lse`` (log2 units):
  ``MAX`` the max m2 of t2, ``LOG_SUM`` lg2 = log2 Σ 2^(t2 − m2). The owner kernels read the
  ``_launch.weighted_shifts`` of these rows, (m2', w) in the same two slots.
- ``KLStat``: rows of the (4, n) fp32 statistics of ``similarity_kl``: the student's (max,
  log-sum) then the teacher's; kernels: ``KL_STUDENT_MAX``, ``KL_TEACHER_MAX`` (the first row
  of each side's pair) and ``KL_TEACHER_LOG_SUM``. The student's rows 0 and 1 are addressed as
  ``stat_ptr`` and ``stat_ptr + stride`` (no multiply by 0 or 1 in the kernels).
- ``KLPartial``: fields of the ``similarity_kl`` statistics kernel's partials workspace
  (fields × parts × n): student max and sum, teacher max, sum, teacher-weighted difference and
  (cross-entropy only) entropy sum; kernels: ``KL_PART_TEACHER_MAX`` … ``KL_PART_ENTROPY_SUM``
  (the student's fields 0 and 1 are addressed as ``part_ptr`` and ``part_ptr + field``).

Tile axes (kernel only): ``PER_ROW`` (1) and ``PER_COLUMN`` (0) name the ``axis`` of a
reduction or broadcast over a (rows, columns) logit tile: ``tl.max(t, axis=PER_ROW)`` is one
value per tile row, ``weighted_probabilities(t2, m2, w, PER_COLUMN)`` takes per-column (m2, w).
"""
from __future__ import annotations

import enum

import triton.language as tl


class ScaleMode(enum.IntEnum):
    """How a kernel reads the logit scale (``SCALE_MODE``; ``T_SCALE_MODE`` for the teacher)."""

    FLOAT = 0
    TENSOR = 1
    PER_A_ROW = 2
    PER_B_ROW = 3


class BiasMode(enum.IntEnum):
    """How a kernel reads the logit bias (``BIAS_MODE``): values shared with ``ScaleMode``'s
    scalar modes."""

    FLOAT = ScaleMode.FLOAT.value
    TENSOR = ScaleMode.TENSOR.value


class MarkMode(enum.IntEnum):
    """Which pairs are marked (``MARKS``)."""

    NONE = 0
    DIAGONAL = 1
    SAME_LABEL = 2


class OwnerKind(enum.IntEnum):
    """The gradient-tile family of an owner pass (``KIND``)."""

    LSE = 0
    SIGMOID = 1


class LseStat(enum.IntEnum):
    """Rows of the (2, n) ``similarity_lse`` statistics."""

    MAX = 0
    LOG_SUM = 1


class KLStat(enum.IntEnum):
    """Rows of the (4, n) ``similarity_kl`` statistics."""

    STUDENT_MAX = 0
    STUDENT_LOG_SUM = 1
    TEACHER_MAX = 2
    TEACHER_LOG_SUM = 3


class KLPartial(enum.IntEnum):
    """Fields of the ``similarity_kl`` partials workspace; ``ENTROPY_SUM`` with the cross-entropy
    only."""

    STUDENT_MAX = 0
    STUDENT_SUM = 1
    TEACHER_MAX = 2
    TEACHER_SUM = 3
    WEIGHTED_DIFF = 4
    ENTROPY_SUM = 5


# ----------------------------------------------------------------------------- kernel constants

SCALAR_FLOAT = tl.constexpr(ScaleMode.FLOAT.value)
SCALAR_TENSOR = tl.constexpr(ScaleMode.TENSOR.value)
SCALE_PER_A_ROW = tl.constexpr(ScaleMode.PER_A_ROW.value)
SCALE_PER_B_ROW = tl.constexpr(ScaleMode.PER_B_ROW.value)

MARKS_NONE = tl.constexpr(MarkMode.NONE.value)
MARKS_DIAGONAL = tl.constexpr(MarkMode.DIAGONAL.value)
MARKS_SAME_LABEL = tl.constexpr(MarkMode.SAME_LABEL.value)

KIND_LSE = tl.constexpr(OwnerKind.LSE.value)
KIND_SIGMOID = tl.constexpr(OwnerKind.SIGMOID.value)

KL_STUDENT_MAX = tl.constexpr(KLStat.STUDENT_MAX.value)
KL_TEACHER_MAX = tl.constexpr(KLStat.TEACHER_MAX.value)
KL_TEACHER_LOG_SUM = tl.constexpr(KLStat.TEACHER_LOG_SUM.value)

KL_PART_TEACHER_MAX = tl.constexpr(KLPartial.TEACHER_MAX.value)
KL_PART_TEACHER_SUM = tl.constexpr(KLPartial.TEACHER_SUM.value)
KL_PART_WEIGHTED_DIFF = tl.constexpr(KLPartial.WEIGHTED_DIFF.value)
KL_PART_ENTROPY_SUM = tl.constexpr(KLPartial.ENTROPY_SUM.value)

PER_ROW = tl.constexpr(1)
PER_COLUMN = tl.constexpr(0)

# log2(e) and ln 2: every exponential is an exp2 with log2(e) folded into the scale.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
