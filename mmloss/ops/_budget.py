"""The logit budget: how many bytes ``similarity_lse`` may spend on keeping its N×M logits.

By default (budget 0) the torch backend never stores the N×M matrix: the backward recomputes it
chunk by chunk from O(N + M) statistics (4 GEMM-equivalents per forward + backward). With a
budget, a call whose compute-dtype logits fit (``N·M·4`` bytes for fp16/bf16/fp32 inputs,
``N·M·8`` for fp64) keeps them from the forward until its backward, which then forms the logit
gradient from them: 3 GEMM-equivalents, for N·M·4 more bytes held between forward and backward
(docs/design.md, "Memory"; ``mmloss.ops._spec.keeps_logits``).

The budget is read once per ``similarity_lse`` call, by the public wrapper: a thread's
``logit_budget(nbytes)`` context wins, else the environment variable ``MMLOSS_LOGIT_BUDGET``
(bytes, e.g. "80MiB"), else 0. Under ``torch.compile`` the value is read while tracing and
becomes a constant of the compiled graph: set it before the first call of a compiled function
(changing it later does not retrace). Calls that need no gradient never keep their logits.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Union

ENV = "MMLOSS_LOGIT_BUDGET"

_local = threading.local()


def parse_budget(value: Union[int, str], what: str = "logit budget") -> int:
    """A byte count from an int or a string such as "80MiB" / "1.5GiB" / "65536"; ≥ 0."""
    from .torch_chunked import _parse_bytes

    if isinstance(value, bool):
        raise TypeError(f"{what} must be a byte count (int or e.g. '80MiB'), got {value!r}")
    if isinstance(value, int):
        nbytes = value
    elif isinstance(value, str):
        try:
            nbytes = _parse_bytes(value)
        except ValueError:
            raise ValueError(f"{what} must be a byte count such as 80MiB, got {value!r}") from None
    else:
        raise TypeError(f"{what} must be a byte count (int or e.g. '80MiB'), got {type(value).__name__}")
    if nbytes < 0:
        raise ValueError(f"{what} must be ≥ 0 bytes, got {value!r}")
    return nbytes


def current_logit_budget() -> int:
    """The budget in effect in this thread: the innermost ``logit_budget`` context, else
    ``MMLOSS_LOGIT_BUDGET``, else 0."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get(ENV)
    if env is None or not env.strip():
        return 0
    return parse_budget(env, ENV)


@contextlib.contextmanager
def logit_budget(nbytes: Union[int, str]) -> Iterator[int]:
    """Within the block (this thread only), ``similarity_lse`` — and every loss built on it — may
    keep the logits of a call when they take at most ``nbytes`` bytes (int, or a string such as
    "80MiB"; 0 restores the bounded default inside the block). Nests; yields the byte count.

    Example::

        with mmloss.logit_budget("80MiB"):
            loss = mmloss.clip_loss(x, y, scale)   # B = 4096: 64 MiB of fp32 logits, kept
        loss.backward()                            # 2 GEMMs instead of 3

    The budget is read when a call's forward runs; its backward uses whatever that forward
    kept, wherever it runs.
    """
    value = parse_budget(nbytes)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(value)
    try:
        yield value
    finally:
        stack.pop()
