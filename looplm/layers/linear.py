"""``Linear``: ``nn.Linear`` whose forward is :func:`looplm.ops.linear.linear` (faster decoding steps).

Same parameters, state-dict keys and ``isinstance(m, nn.Linear)`` as ``nn.Linear``, so checkpoints,
quantisation (which swaps ``nn.Linear`` modules) and transformers integration see no difference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from looplm.ops.linear import linear

__all__ = ["Linear", "kernel_parts", "activation_like"]


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def kernel_parts(m: Any) -> list[torch.Tensor] | None:
    """The weight parts a quantised module's own kernels multiply (its ``kernel_parts()``, where its
    ``kernel`` setting is ``auto``), else None (a float module, or its kernels turned off)."""
    return m.kernel_parts() if hasattr(m, "kernel_parts") and getattr(m, "kernel", None) == "auto" else None


def activation_like(m: nn.Module) -> torch.Tensor:
    """``m``'s first parameter or buffer of 16 bits or more in floating point: the dtype and device of
    the activations it takes (a plain projection's weight; a quantised one's scales, never its FP8 /
    FP4 codes, where reading ``.weight`` would dequantise the whole matrix); float32 on its device
    when it holds none (codes and power-of-two exponents only)."""
    tensors = [*m.parameters(), *m.buffers()]
    for t in tensors:
        if t.is_floating_point() and t.element_size() >= 2:
            return t
    return torch.empty(0, device=tensors[0].device if tensors else None)
