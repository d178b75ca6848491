"""mass_ext: MASS (MoErging through Adaptive Subspace Selection) as one fused op.

Public API: routed_linear, route, Routing, reference, backend (the op);
RoutedLinear, MASS, pick_head, route_features, stack_router_bases (the model level).
"""
import logging

import torch  # noqa: F401  (loads libtorch before the extension)

try:
    from . import _C  # noqa: F401  (registers torch.ops.mass_ext.*)
except ImportError as _error:  # not built: every op runs the pure-PyTorch reference
    logging.getLogger(__name__).warning(
        "mass_ext: compiled extension not available (%s); using the pure-PyTorch reference.",
        _error,
    )

from . import reference
from .model import MASS, pick_head, route_features, stack_router_bases
from .nn import RoutedLinear
from .ops import backend, route, routed_linear
from .routing import Routing

__all__ = ["routed_linear", "route", "Routing", "reference", "backend", "RoutedLinear", "MASS",
           "pick_head", "route_features", "stack_router_bases"]
__version__ = "0.1.0"
