"""Loss functions: validate inputs, then compose the fused primitives with O(N·D) torch ops.

The math of each function is in docs/losses.md (section given in each docstring); every function
takes ``backend="auto"``. ``mmloss.reference`` has the same names as a dense oracle.
One module per loss family; this package re-exports them all.
"""
from . import coca, distill, multimodal, ssl
from .clip import clip_loss
from .coca import caption_loss, coca_loss
from .distill import *  # noqa: F401,F403
from .infonce import infonce_loss
from .multimodal import *  # noqa: F401,F403
from .siglip import siglip_loss
from .ssl import *  # noqa: F401,F403

__all__ = ["caption_loss", "clip_loss", "coca_loss", "infonce_loss", "siglip_loss"] + ssl.__all__ + multimodal.__all__ + distill.__all__
