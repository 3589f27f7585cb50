"""Dense feed-forward: SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """``y = (silu(x W_gate) * (x W_up)) W_down``; ``x [..., d] -> (y [..., d], {})``.

    Gate and up projections are one fused matmul (``w_in``: first half gate, second half up).
    Returns an empty aux dict to share the FFN signature with :class:`looplm.layers.moe.MoE`.
    """

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up), {}
