"""The fused primitives every loss reduces to (docs/design.md, "The primitives").

``similarity_lse``, ``pairwise_sigmoid`` and ``similarity_kl`` are ``torch.library`` custom ops
(``torch.ops.mmloss.*``) dispatched per call to a backend (see ``available_backends()``);
``similarity_topk`` is a chunked no-grad utility.
"""
from ._backends import BACKEND_CHOICES, BACKENDS, available_backends, resolve_backend
from ._kl import similarity_kl
from ._primitives import pairwise_sigmoid, similarity_lse
from .topk import similarity_topk

__all__ = [
    "BACKEND_CHOICES",
    "BACKENDS",
    "available_backends",
    "pairwise_sigmoid",
    "resolve_backend",
    "similarity_kl",
    "similarity_lse",
    "similarity_topk",
]
