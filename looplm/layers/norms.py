"""RMS normalisation (Zhang & Sennrich 2019) over the last dim, via ``torch.nn.RMSNorm``."""

from __future__ import annotations

from torch import nn


class RMSNorm(nn.RMSNorm):
    """``x [..., d] -> x / rms(x) * weight``; a learned scale per feature, eps 1e-6."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps)


class HeadRMSNorm(RMSNorm):
    """Per-head RMSNorm of ``x [B, T, H, D]``: each head's D-vector normalised on its own,
    one scale ``[D]`` shared by the heads (as on the output of GLA / gated DeltaNet)."""
