"""Loss functions: validate inputs, then compose the fused primitives with O(N·D) torch ops.

The math of each function is in docs/losses.md (section given in each docstring); every function
takes ``backend="auto"``. ``mmloss.reference`` has the same names as a dense oracle.
One module per loss family; this package re-exports them all.
"""
from . import coca, distill, isogclr, symile, tcl
from . import dcl, dhel, hcl, multiview, ntxent, supcon  # the self-supervised family
from .clip import clip_loss
from .coca import caption_loss, coca_loss
from .distill import *  # noqa: F401,F403
from .infonce import infonce_loss
from .isogclr import *  # noqa: F401,F403
from .siglip import siglip_loss
from .dcl import *  # noqa: F401,F403
from .dhel import *  # noqa: F401,F403
from .hcl import *  # noqa: F401,F403
from .multiview import *  # noqa: F401,F403
from .ntxent import *  # noqa: F401,F403
from .supcon import *  # noqa: F401,F403
from .symile import *  # noqa: F401,F403
from .tcl import *  # noqa: F401,F403

__all__ = ["caption_loss", "clip_loss", "coca_loss", "infonce_loss", "siglip_loss"] + dcl.__all__ + dhel.__all__ + hcl.__all__ + multiview.__all__ + ntxent.__all__ + supcon.__all__ + isogclr.__all__ + symile.__all__ + tcl.__all__ + distill.__all__
