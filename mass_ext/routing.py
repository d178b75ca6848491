"""The routing decision returned by `mass_ext.route`."""
from typing import NamedTuple, Optional

import torch


class Routing(NamedTuple):
    """Per-row routing decision.

    indices:   (..., k) int64, selected task ids, best first; -1 for a slot dropped by
               the threshold.
    weights:   (..., k) float32 (float64 for float64 inputs), 0 for dropped slots.
    residuals: (..., T) same dtype as weights, ||x - V_t^T V_t x|| per task; None in a
               routing made by hand (known task ids: Routing(indices, weights)).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    residuals: Optional[torch.Tensor] = None
