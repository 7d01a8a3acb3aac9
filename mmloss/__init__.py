"""mmloss: memory-efficient fused contrastive losses for PyTorch.

Losses are ``torch.nn`` modules (``mmloss.ClipLoss``, ...) and functions
(``mmloss.clip_loss``, ...) built on fused primitives (``mmloss.ops``) that never store the
N×M similarity matrix; ``mmloss.reference`` holds dense oracles with the same names.
"""
from ._version import __version__
from . import functional, grad_cache, losses, ops, reference
from .functional import *  # noqa: F401,F403
from .losses import *  # noqa: F401,F403
from .grad_cache import grad_cache_step
from .ops import available_backends, pairwise_sigmoid, similarity_kl, similarity_lse, similarity_topk
from .ops._budget import logit_budget

__all__ = (
    ["__version__", "available_backends", "grad_cache_step", "logit_budget", "pairwise_sigmoid", "similarity_kl",
     "similarity_lse", "similarity_topk"]
    + functional.__all__
    + losses.__all__
)
