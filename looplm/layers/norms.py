"""RMS normalisation (Zhang & Sennrich 2019) over the last dim, and L2 normalisation.

Both have hand-written backwards: autograd of the composite forms (``F.rms_norm`` has no fused
CPU kernel in torch 2.13; ``F.normalize``) runs about twice as many passes over the tensor.
Measured fwd+bwd, 1 thread: RMSNorm on ``[8, 512, 256]`` 8.9 -> 5.3 ms, L2 normalisation of
``[8, 512, 8, 64]`` 21.9 -> 10.7 ms. ``rms_norm(..., gate=z)`` fuses the output gate of GLA /
gated DeltaNet, ``rmsnorm(x) * silu(z)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _RMSNorm(torch.autograd.Function):
    """``y = x * r * w (* silu(z))``, ``r = rsqrt(mean(x^2) + eps)`` over the last dim."""

    @staticmethod
    def forward(ctx, x, weight, gate, eps: float):
        ctx.dtypes = x.dtype, None if gate is None else gate.dtype
        out = torch.promote_types(x.dtype, weight.dtype)
        out = out if gate is None else torch.promote_types(out, gate.dtype)
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in float32 at least
        r = torch.rsqrt(torch.linalg.vecdot(x, x).unsqueeze(-1).div_(x.shape[-1]).add_(eps))
        n = x * r
        y = n * weight
        act = None
        if gate is not None:
            act = F.silu(gate)
            y = y * act
        ctx.save_for_backward(n, r, weight, gate, act)
        return y.to(out)

    @staticmethod
    def backward(ctx, gy):
        n, r, weight, gate, act = ctx.saved_tensors
        g_gate = None
        if gate is not None:
            if ctx.needs_input_grad[2]:
                g_gate = torch.ops.aten.silu_backward(gy * (n * weight), gate).to(ctx.dtypes[1])
            gy = gy * act
        g_w = (gy * n).flatten(0, -2).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        gn = gy * weight
        # d/dx of x * r: r * (gn - n * mean(gn * n))
        m = torch.linalg.vecdot(gn, n).unsqueeze(-1).div_(-n.shape[-1])
        g_x = gn.addcmul_(n, m).mul_(r).to(ctx.dtypes[0])
        return g_x, g_w, g_gate, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             gate: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of ``x [..., D]`` with ``weight [D]``, times ``silu(gate)`` (``gate`` shaped as x)."""
    return _RMSNorm.apply(x, weight, gate, eps)


class _L2Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps: float):
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(eps).reciprocal_()
        y = x * r
        ctx.save_for_backward(y, r)
        return y

    @staticmethod
    def backward(ctx, gy):
        y, r = ctx.saved_tensors
        # d/dx of x / |x|: (gy - y <gy, y>) / |x|  (|x| above eps)
        m = torch.linalg.vecdot(gy, y).unsqueeze(-1).neg_()
        return torch.addcmul(gy, y, m).mul_(r), None


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``x / max(|x|, eps)`` over the last dim (as ``F.normalize(x, dim=-1)``)."""
    return _L2Normalize.apply(x, eps)


class RMSNorm(nn.RMSNorm):
    """``x [..., d] -> x / rms(x) * weight``; a learned scale per feature, eps 1e-6.
    ``forward(x, gate=z)`` also multiplies by ``silu(z)``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, gate)


class HeadRMSNorm(RMSNorm):
    """Per-head RMSNorm of ``x [B, T, H, D]``: each head's D-vector normalised on its own,
    one scale ``[D]`` shared by the heads (as on the output of GLA / gated DeltaNet)."""
