"""The fused primitives every loss reduces to (DESIGN.md, "The primitives").

``similarity_lse`` and ``pairwise_sigmoid`` are ``torch.library`` custom ops
(``torch.ops.mmloss.*``) dispatched per call to a backend; see ``available_backends()``.
"""
from ._backends import BACKENDS, available_backends, resolve_backend
from ._primitives import pairwise_sigmoid, similarity_lse

__all__ = [
    "BACKENDS",
    "available_backends",
    "pairwise_sigmoid",
    "resolve_backend",
    "similarity_lse",
]
