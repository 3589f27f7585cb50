"""RMS normalisation (Zhang & Sennrich 2019) over the last dim, and L2 normalisation.

Both have hand-written backwards: autograd of the composite forms (``F.rms_norm`` has no fused
CPU kernel in torch 2.13; ``F.normalize``) runs about twice as many passes over the tensor
(fwd+bwd, 1 thread: RMSNorm on ``[8, 512, 256]`` 8.9 -> 5.3 ms, L2 normalisation of
``[8, 512, 8, 64]`` 21.9 -> 10.7 ms). They run tile by tile over rows so that a tile's passes
stay in cache, recomputing ``x * r`` and ``silu(z)`` instead of saving them (then, same run:
gated head RMSNorm ``[8, 512, 4, 64]`` 12.8 -> 6.6 ms, L2 8.5 -> 4.7 ms, RMSNorm 5.2 -> 3.9 ms).
``rms_norm(..., gate=z)`` fuses the output gate of GLA / gated DeltaNet, ``rmsnorm(x) * silu(z)``.
Float32 RMSNorm on the CPU (gated or not) runs ``csrc/norm_rope.cpp`` instead
(:class:`_RMSNormKernel`), where the C++ kernels are built (:mod:`looplm.ops.cpp_ext`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from looplm.ops import cpp_ext
from looplm.ops.nodes import row_tiles, tracked

_TILE = 1 << 17  # elements per tile of rows: each tile's passes stay in cache


def _tiles(x: torch.Tensor) -> list[slice]:
    """Row slices of a 2-D ``x [rows, D]``, about ``_TILE`` elements each."""
    return row_tiles(x.shape[0], x.shape[1], _TILE)


class _RMSNorm(torch.autograd.Function):
    """``y = x * r * w (* silu(z))``, ``r = rsqrt(mean(x^2) + eps)`` over the last dim; saves
    ``x``, ``r`` (and ``z``) and recomputes ``x * r`` and ``silu(z)`` tile by tile."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None,
                eps: float) -> torch.Tensor:
        out = torch.promote_types(x.dtype, weight.dtype)
        out = out if gate is None else torch.promote_types(out, gate.dtype)
        cdt = torch.promote_types(out, torch.float32)  # statistics in float32 at least
        x2 = x.reshape(-1, x.shape[-1])
        z2 = None if gate is None else gate.reshape(x2.shape)
        y = torch.empty(x2.shape, dtype=cdt, device=x.device)
        r = torch.empty(x2.shape[0], 1, dtype=cdt, device=x.device)
        for b in _tiles(x2):
            xb = x2[b].to(cdt)
            torch.rsqrt(torch.linalg.vecdot(xb, xb).unsqueeze(-1).div_(x2.shape[1]).add_(eps), out=r[b])
            yb = torch.mul(xb, r[b], out=y[b]).mul_(weight)
            if z2 is not None:
                yb.mul_(F.silu(z2[b]))
        ctx.save_for_backward(x2, r, weight, z2)
        ctx.shape, ctx.dtypes = x.shape, (x.dtype, None if gate is None else gate.dtype)
        return y.view(x.shape).to(out)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, r, weight, z2 = ctx.saved_tensors
        gy2 = gy.reshape(x2.shape)
        need_w, need_z = ctx.needs_input_grad[1], z2 is not None and ctx.needs_input_grad[2]
        g_x = torch.empty(x2.shape, dtype=r.dtype, device=r.device)
        g_w = torch.zeros(x2.shape[1], dtype=r.dtype, device=r.device) if need_w else None
        g_z = torch.empty_like(z2) if need_z else None
        for b in _tiles(x2):
            n, g = x2[b] * r[b], gy2[b]
            if z2 is not None:
                if g_z is not None:
                    torch.ops.aten.silu_backward.grad_input(g * (n * weight), z2[b], grad_input=g_z[b])
                g = g * F.silu(z2[b])
            if g_w is not None:
                g_w += (g * n).sum(0)
            gn = g * weight
            # d/dx of x * r: r * (gn - n * mean(gn * n))
            m = torch.linalg.vecdot(gn, n).unsqueeze(-1).div_(-n.shape[1])
            torch.mul(gn.addcmul_(n, m), r[b], out=g_x[b])
        return (g_x.view(ctx.shape).to(ctx.dtypes[0]), None if g_w is None else g_w.to(weight.dtype),
                None if g_z is None else g_z.view(ctx.shape), None)


class _RMSNormKernel(torch.autograd.Function):
    """``x * r * w (* silu(z))`` by ``csrc/norm_rope.cpp``: one pass per row each way, rows over
    threads (fwd+bwd of ``[4096, 384]``, 2 threads: 4.9 ms :class:`_RMSNorm`, 1.4 ms this)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None,
                eps: float) -> torch.Tensor:
        y, x2, r, z2 = _kernel_forward(x, weight, gate, eps)
        ctx.save_for_backward(x2, r, weight, z2)
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, r, weight, z2 = ctx.saved_tensors
        need_w = ctx.needs_input_grad[1]
        g_x, g_w, g_z = torch.ops.looplm.rms_norm_backward(gy.reshape(x2.shape).contiguous(), x2, r, weight,
                                                           z2, need_w)
        return (g_x.view(gy.shape), g_w if need_w else None,
                g_z.view(gy.shape) if z2 is not None and ctx.needs_input_grad[2] else None, None)


def _kernel_forward(x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The kernel's forward: ``(y shaped as x, x [N, D], r [N, 1], gate [N, D] | None)``."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    z2 = None if gate is None else gate.reshape(x2.shape).contiguous()
    y, r = torch.ops.looplm.rms_norm_forward(x2, weight, z2, eps)
    return y.view(x.shape), x2, r, z2


def _kernel_applies(x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.is_contiguous() and x.numel() > 0
            and (gate is None or (gate.dtype == torch.float32 and gate.shape == x.shape))
            and cpp_ext.available())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             gate: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of ``x [..., D]`` with ``weight [D]``, times ``silu(gate)`` (``gate`` shaped as x)."""
    if _kernel_applies(x, weight, gate):
        if not tracked(x, weight, gate):  # e.g. decoding: the forward alone, no autograd node
            return _kernel_forward(x, weight, gate, eps)[0]
        # torch's autograd Function.apply is untyped
        return _RMSNormKernel.apply(x, weight, gate, eps)  # type: ignore[no-untyped-call]
    if torch.compiler.is_compiling() or not tracked(x, weight, gate):  # compiled: autograd's backward
        y = F.rms_norm(x, (x.shape[-1],), weight, eps)
        return y if gate is None else y * F.silu(gate)
    # torch's autograd Function.apply is untyped
    return _RMSNorm.apply(x, weight, gate, eps)  # type: ignore[no-untyped-call]


class _L2Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y, r = torch.empty_like(x2), x2.new_empty(x2.shape[0], 1)
        for b in _tiles(x2):
            torch.linalg.vector_norm(x2[b], dim=-1, keepdim=True, out=r[b]).clamp_min_(eps).reciprocal_()
            torch.mul(x2[b], r[b], out=y[b])
        ctx.save_for_backward(y, r)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor, None]:
        y, r = ctx.saved_tensors
        gy2, g_x = gy.reshape(y.shape), torch.empty_like(y)
        for b in _tiles(y):
            # d/dx of x / |x|: (gy - y <gy, y>) / |x|  (|x| above eps)
            m = torch.linalg.vecdot(gy2[b], y[b]).unsqueeze(-1).neg_()
            torch.addcmul(gy2[b], y[b], m, out=g_x[b]).mul_(r[b])
        return g_x.view(gy.shape), None


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``x / max(|x|, eps)`` over the last dim (as ``F.normalize(x, dim=-1)``)."""
    if torch.compiler.is_compiling() or not tracked(x):
        return F.normalize(x, dim=-1, eps=eps)
    # torch's autograd Function.apply is untyped
    return _L2Normalize.apply(x, eps)  # type: ignore[no-untyped-call]


class RMSNorm(nn.RMSNorm):
    """``x [..., d] -> x / rms(x) * weight``; a learned scale per feature, eps 1e-6.
    ``forward(x, gate=z)`` also multiplies by ``silu(z)``."""

    eps: float  # always set (nn.RMSNorm allows None)

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, gate)


class HeadRMSNorm(RMSNorm):
    """Per-head RMSNorm of ``x [B, T, H, D]``: each head's D-vector normalised on its own,
    one scale ``[D]`` shared by the heads (as on the output of GLA / gated DeltaNet)."""
