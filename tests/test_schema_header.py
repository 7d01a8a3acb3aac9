"""The C++ op schemas (csrc/include/mmloss/schema.h) are generated from the Python declarations:
this fails while the committed header is stale, and checks that the compiled extension, when
built, defines exactly the ops of the Python tables."""
from __future__ import annotations

import pytest
import torch

from mmloss.ops import emit_schema


def test_committed_header_is_current():
    assert emit_schema.HEADER.exists(), "run python -m mmloss.ops.emit_schema"
    assert emit_schema.HEADER.read_text() == emit_schema.render(), (
        "csrc/include/mmloss/schema.h is stale: run python -m mmloss.ops.emit_schema"
    )


def test_every_forward_op_has_its_schema_and_backward():
    names = [name for name, _ in emit_schema.op_schemas()]
    assert names == ["similarity_lse", "similarity_lse_backward", "pairwise_sigmoid", "pairwise_sigmoid_backward",
                     "pairwise_sigmoid_sum", "similarity_kl", "similarity_kl_backward"]
    for name, text in emit_schema.op_schemas():
        python_op = getattr(torch.ops.mmloss, name).default
        # The Python op's own schema, printed by torch, against the generated text.
        assert str(python_op._schema) == f"mmloss::{text}"


def test_compiled_ops_match_the_tables():
    from mmloss import _extension

    reason = _extension.extension_error()
    if reason is not None:
        pytest.skip(f"mmloss._C not built: {reason}")
    for name, text in emit_schema.op_schemas():
        compiled = getattr(torch.ops.mmloss_C, name).default
        assert str(compiled._schema) == f"mmloss_C::{text}"
