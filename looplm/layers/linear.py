"""``Linear``: ``nn.Linear`` whose forward is :func:`looplm.ops.linear.linear` (faster decoding steps).

Same parameters, state-dict keys and ``isinstance(m, nn.Linear)`` as ``nn.Linear``, so checkpoints,
quantisation (which swaps ``nn.Linear`` modules) and transformers integration see no difference.
"""

from __future__ import annotations

import torch
from torch import nn

from looplm.ops.linear import linear

__all__ = ["Linear"]


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
