"""Short causal depthwise convolution (kernel ~4) with a decoding state.

Used on q, k, v before fixed-state mixers (H3 / Based / GLA / gated DeltaNet recipe,
MECHANISMS.md §1). ``y[t, d] = bias[d] + sum_j weight[d, j] * x[t - K + 1 + j, d]``; the state
holds the last ``K - 1`` inputs so a prompt can be prefilled, then decoded token by token.
``silu=True`` applies SiLU to ``y`` (the mixers' activation) inside the same autograd node.

Written as K shifted multiply-adds into one output, with a hand-written backward of the same
form (the input gradient is the anti-causal conv, the weight gradient K products summed over
batch and time). ``F.conv1d(groups=D)``'s backward (weight gradient) was 3-6x slower on the CPU
(B=8, T=512, D=768, K=4: 2.6-5.2 s vs 0.8 s forward+backward, torch 2.13), and autograd of the
shifted sum over a padded copy 3.3x slower than this (fill and copy of the padding gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None, step: bool) -> None:
    layout = "[B, D]" if step else "[B, T, D]"
    if x.dim() != (2 if step else 3):
        raise ValueError(f"x must have shape {layout}, got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape [D={x.shape[-1]}, K], got {tuple(weight.shape)}")
    want = (x.shape[0], weight.shape[1] - 1, x.shape[-1])
    if state is not None and tuple(state.shape) != want:
        raise ValueError(f"state must have shape {want} ([B, K-1, D]), got {tuple(state.shape)}")


def _shifted_sum(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None,
                 state: torch.Tensor | None) -> torch.Tensor:
    """The conv with ``wt [K, D]``: tap ``j`` reads the input ``s = K - 1 - j`` steps back."""
    K, T = wt.shape[0], x.shape[1]
    y = x * wt[K - 1] if bias is None else torch.addcmul(bias, x, wt[K - 1])
    for s in range(1, K):
        j = K - 1 - s
        if s < T:
            y[:, s:].addcmul_(x[:, :T - s], wt[j])
        if state is not None:  # the first s outputs read the state's last s inputs
            m = min(s, T)
            y[:, :m].addcmul_(state[:, j:j + m], wt[j])
    return y


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, state, silu: bool):
        wt = weight.t().contiguous()
        pre = _shifted_sum(x, wt, bias, state)
        ctx.save_for_backward(x, wt, state, pre)
        ctx.silu, ctx.has_bias = silu, bias is not None
        return F.silu(pre) if silu else pre

    @staticmethod
    def backward(ctx, gy):
        x, wt, state, pre = ctx.saved_tensors
        K, T = wt.shape[0], x.shape[1]
        g = torch.ops.aten.silu_backward(gy, pre) if ctx.silu else gy.contiguous()
        gx = gw = gb = gs = None
        if ctx.needs_input_grad[0]:  # gx[t] = sum_s g[t + s] * wt[K-1-s]
            gx = g * wt[K - 1]
            for s in range(1, min(K, T)):
                gx[:, :T - s].addcmul_(g[:, s:], wt[K - 1 - s])
            gx = gx.to(x.dtype)
        if ctx.needs_input_grad[1]:
            gwt = torch.zeros_like(wt)
            for s in range(K):
                j, m = K - 1 - s, min(s, T)
                if s < T:
                    gwt[j] = (g[:, s:] * x[:, :T - s]).sum((0, 1))
                if state is not None and m:
                    gwt[j] += (g[:, :m] * state[:, j:j + m]).sum((0, 1))
            gw = gwt.t().to(wt.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum((0, 1))
        if state is not None and ctx.needs_input_grad[3]:
            gs = torch.zeros_like(state, dtype=g.dtype)
            for s in range(1, K):
                j, m = K - 1 - s, min(s, T)
                gs[:, j:j + m].addcmul_(g[:, :m], wt[j])
            gs = gs.to(state.dtype)
        return gx, gw, gb, gs, None


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
    *,
    silu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv of ``x [B, T, D]`` with ``weight [D, K]`` (then SiLU if ``silu``).

    ``state [B, K-1, D]`` holds the inputs preceding ``x`` (zeros when None).
    Returns ``(y [B, T, D], new_state [B, K-1, D])``.
    """
    _check(x, weight, state, step=False)
    B, T, D = x.shape
    K = weight.shape[1]
    y = _CausalConv.apply(x, weight, bias, state, silu)
    dtype = x.dtype if state is None else torch.promote_types(x.dtype, state.dtype)
    if T >= K - 1:
        new_state = x[:, T - K + 1:].to(dtype, copy=True)
    else:
        prev = x.new_zeros(B, K - 1, D, dtype=dtype) if state is None else state.to(dtype)
        new_state = torch.cat((prev[:, T:], x.to(dtype)), dim=1)
    return y, new_state


def causal_conv1d_step(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
    *,
    silu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token ``x [B, D]``: returns ``(y [B, D], new_state [B, K-1, D])``."""
    _check(x, weight, state, step=True)
    K = weight.shape[1]
    if state is None:
        state = x.new_zeros(x.shape[0], K - 1, x.shape[1])
    window = torch.cat((state, x[:, None]), dim=1)  # [B, K, D]
    y = (window * weight.T).sum(1)
    if bias is not None:
        y = y + bias
    return (F.silu(y) if silu else y), window[:, 1:]
