"""``torch.nn.Module`` wrappers of the loss functions (options, parameters, state; no math).

One module per loss family; this package re-exports them all.
"""
from . import distill, isogclr, memory_queue, symile, tcl
from . import dcl, dhel, hcl, multiview, ntxent, supcon  # the self-supervised family
from .clip import ClipLoss
from .coca import CoCaLoss
from .distill import *  # noqa: F401,F403
from .infonce import InfoNCELoss
from .isogclr import *  # noqa: F401,F403
from .memory_queue import *  # noqa: F401,F403
from .siglip import SigLipLoss
from .dcl import *  # noqa: F401,F403
from .dhel import *  # noqa: F401,F403
from .hcl import *  # noqa: F401,F403
from .multiview import *  # noqa: F401,F403
from .ntxent import *  # noqa: F401,F403
from .supcon import *  # noqa: F401,F403
from .symile import *  # noqa: F401,F403
from .tcl import *  # noqa: F401,F403

__all__ = ["ClipLoss", "CoCaLoss", "InfoNCELoss", "SigLipLoss"] + dcl.__all__ + dhel.__all__ + hcl.__all__ + multiview.__all__ + ntxent.__all__ + supcon.__all__ + isogclr.__all__ + memory_queue.__all__ + symile.__all__ + tcl.__all__ + distill.__all__
