"""Dense, literal implementations of docs/losses.md: the oracle every fast path is tested against.

Every function materialises the full N×M logit matrix with plain torch and lets autograd do
the rest: small inputs only, never on a fast path. Names and arguments match
``mmloss.functional`` (minus ``backend``) and the primitives of ``mmloss.ops``.
One module per loss family; this package re-exports them all.
"""
from . import core, distill, multimodal, ssl
from .core import *  # noqa: F401,F403
from .distill import *  # noqa: F401,F403
from .multimodal import *  # noqa: F401,F403
from .ssl import *  # noqa: F401,F403

__all__ = core.__all__ + ssl.__all__ + multimodal.__all__ + distill.__all__
