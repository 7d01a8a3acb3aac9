"""``torch.nn.Module`` wrappers of the loss functions (options, parameters, state; no math).

One module per loss family; this package re-exports them all.
"""
from . import distill, multimodal, ssl
from .clip import ClipLoss
from .coca import CoCaLoss
from .distill import *  # noqa: F401,F403
from .infonce import InfoNCELoss
from .multimodal import *  # noqa: F401,F403
from .siglip import SigLipLoss
from .ssl import *  # noqa: F401,F403

__all__ = ["ClipLoss", "CoCaLoss", "InfoNCELoss", "SigLipLoss"] + ssl.__all__ + multimodal.__all__ + distill.__all__
