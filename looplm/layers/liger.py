"""Linearised attention: a pretrained attention layer's own weights driving a gated recurrence
(Liger, Lan et al. 2025, "Liger: Linearizing Large Language Models to Gated Recurrent Structures").

The layer keeps the attention's parameters unchanged (``qkv``: q, k, v rows of H, Hkv, Hkv heads
of size D; ``o_proj``) and adds none. Per head, with the key/value heads of a group repeated for
its H / Hkv query heads at run time (the weights stay shared, GQA):

- ``gla``: feature map softmax over the head dim on q and k, gate from the key projection
  ``g = logsigmoid(k) / tau`` per key channel (log decay, ``tau = 16``), scale 1:
  ``S_t = diag(exp g_t) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``. With ``normalize`` (not in
  Liger; the denominator of linear attention, Katharopoulos et al. 2020, kept by Hedgehog and
  LoLCATs) ``o_t = q_t S_t / q_t z_t`` with ``z_t = diag(exp g_t) z_{t-1} + k_t``: a weighted mean
  of the values, whose scale does not grow with the context (the unnormalised sum does, along key
  channels whose gate stays near 1, so a model fine-tuned on short windows breaks on longer ones).
  ``z`` is carried as one more value column (``v`` extended by a 1): the state is ``[B, H, D, D+1]``.
- ``gated_deltanet``: q, k L2-normalised, scalar gate and write strength from the key's mean over
  the head dim ``m``: ``g = logsigmoid(m) / tau``, ``beta = sigmoid(m)``; the gated delta rule.

``window = W > 0`` is Liger Attention, the intra-layer hybrid: ``o = (o_recurrent + o_swa) / 2``
with ``o_swa`` softmax attention (RoPE, the original q, k, v) over the last W positions; the state
keeps only the keys inside the window, so it stays bounded. ``exact_softmax = True`` (a test hook)
puts exact causal softmax attention in place of the recurrence: with ``window = 0`` the layer
then computes the original attention layer exactly.

Shapes: ``x [B, T, d]`` -> ``y [B, T, d]``; state :class:`LinearizedState` (``ssm [B, H, D, D]``,
``[B, H, D, D+1]`` normalised).
Masked tokens write nothing (k = 0, g = 0, beta = 0) and output zeros, as in layers/mixers.py.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from looplm.errors import ConfigError
from looplm.layers import kv_cache
from looplm.layers.linear import Linear, activation_like
from looplm.layers.mixer_states import KVState, LinearizedState, check_inputs
from looplm.layers.norms import l2_normalize
from looplm.ops.attention import attention, rope
from looplm.ops.delta_rule import delta_chunk, delta_step
from looplm.ops.linear_attn import decay_chunk, decay_step

RECURRENCES = ("gla", "gated_deltanet")
NORM_EPS = 1e-6  # the normalised read-out's least denominator (csrc/liger.h has the same)


class LinearizedAttention(nn.Module):
    """An attention layer's weights (``qkv``, ``o_proj``) run as a gated recurrence; see the module
    docstring. Subclasses fix ``recurrence``."""

    recurrence = "gla"

    def __init__(self, d_model: int, n_heads: int, *, n_kv_heads: int | None = None,
                 head_dim: int | None = None, rope_base: float = 10000.0,
                 rope_scaling: dict[str, Any] | None = None, bias: bool = False, window: int = 0,
                 gate_tau: float = 16.0, chunk_size: int | None = None, normalize: bool = False) -> None:
        super().__init__()
        if window < 0:
            raise ConfigError(f"window must be >= 0 (0: no sliding-window attention), got {window}")
        if normalize and self.recurrence != "gla":
            raise ConfigError(f"normalize applies to the gla recurrence, not {self.recurrence}")
        self.d_model, self.n_heads = d_model, n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        if n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if head_dim is None and d_model % n_heads:
            raise ConfigError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}); "
                              "or set head_dim")
        self.head_dim = head_dim or d_model // n_heads
        self.rope_base, self.rope_scaling = rope_base, rope_scaling
        self.window, self.gate_tau, self.normalize = window, gate_tau, normalize
        self.chunk_kw = {} if chunk_size is None else {"chunk_size": chunk_size}
        self.exact_softmax = False
        D, Hkv = self.head_dim, self.n_kv_heads
        self.qkv = Linear(d_model, (n_heads + 2 * Hkv) * D, bias=bias)
        self.o_proj = Linear(n_heads * D, d_model, bias=False)

    def init_state(self, batch_size: int) -> LinearizedState:
        """A zero recurrent state (and an empty window) for ``batch_size`` rows."""
        p = activation_like(self.o_proj)
        ssm = p.new_zeros(batch_size, self.n_heads, self.head_dim, self.head_dim + self.normalize)
        window = KVState.empty(batch_size, self.n_kv_heads, self.head_dim, p) if self.window else None
        return LinearizedState(ssm, window)

    def forward(self, x: torch.Tensor, state: LinearizedState | None = None, *,
                positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LinearizedState | None]:
        check_inputs(x, self.d_model, mask, positions, state, LinearizedState)
        if self.exact_softmax and state is not None:
            raise ValueError("exact_softmax is a training-path test hook: call without a state")
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if positions is None:
            start = state.window.seen[:, None] if state is not None and state.window is not None else 0
            positions = start + torch.arange(T, device=x.device)
        positions = positions.expand(B, T)
        q, k, v = self.qkv(x).view(B, T, H + 2 * Hkv, D).split((H, Hkv, Hkv), dim=2)
        window = None
        if self.exact_softmax:
            o = attention(rope(q, positions, self.rope_base, self.rope_scaling),
                          rope(k, positions, self.rope_base, self.rope_scaling), v,
                          q_pos=positions, k_pos=positions, key_mask=mask)
            ssm = None
        else:
            o, ssm = self._recur(q, k, v, mask, None if state is None else state.ssm, state is not None)
        if self.window:
            y, window = self._window(q, k, v, positions, mask, None if state is None else state.window)
            o = 0.5 * (o.to(y.dtype) + y)
        if mask is not None:
            o = o * mask[:, :, None, None]
        out = self.o_proj(o.to(x.dtype).reshape(B, T, H * D))
        return out, (None if state is None or ssm is None else LinearizedState(ssm, window))

    def _recur(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               ssm: torch.Tensor | None, stateful: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The recurrence over ``q [B,T,H,D]``, ``k, v [B,T,Hkv,D]`` from ``ssm`` -> ``(o, new ssm)``,
        in the parameters' dtype (the state accumulates in float32 under bf16 autocast)."""
        dtype = self.o_proj.weight.dtype
        group = self.n_heads // self.n_kv_heads
        q = q.to(dtype)
        k, v = k.repeat_interleave(group, 2).to(dtype), v.repeat_interleave(group, 2).to(dtype)
        m = None if mask is None else mask.to(dtype)[..., None]  # [B, T, 1]
        step = stateful and q.shape[1] == 1
        if self.recurrence == "gla":
            g = F.logsigmoid(k) / self.gate_tau
            qf, kf = q.softmax(-1), k.softmax(-1)
            if m is not None:
                kf, g = kf * m[..., None], g * m[..., None]
            if self.normalize:  # z as one more value column
                v = torch.cat([v, torch.ones_like(v[..., :1])], -1)
            if step:
                o, s = decay_step(qf[:, 0], kf[:, 0], v[:, 0], g[:, 0], state=ssm, scale=1.0)
                o = o[:, None]
            else:
                o, s = decay_chunk(qf, kf, v, g, scale=1.0, initial_state=ssm, **self.chunk_kw)
            if self.normalize:
                o = o[..., :-1] / o[..., -1:].clamp_min(NORM_EPS)
            return o, s
        pooled = k.mean(-1)  # [B, T, H]
        g, beta = F.logsigmoid(pooled) / self.gate_tau, torch.sigmoid(pooled)
        qf, kf = l2_normalize(q), l2_normalize(k)
        if m is not None:
            g, beta, kf = g * m, beta * m, kf * m[..., None]
        if step:
            o, s = delta_step(qf[:, 0], kf[:, 0], v[:, 0], beta[:, 0], g[:, 0], state=ssm)
            return o[:, None], s
        return delta_chunk(qf, kf, v, beta, g, initial_state=ssm, **self.chunk_kw)

    def _window(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor | None, cache: KVState | None) -> tuple[torch.Tensor, KVState | None]:
        """Sliding-window softmax attention (RoPE) over the cache and these tokens -> ``(o, cache)``."""
        B, T = positions.shape
        q = rope(q, positions, self.rope_base, self.rope_scaling)
        k = rope(k, positions, self.rope_base, self.rope_scaling)
        key_mask = mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=q.device)
        kpos = positions
        if cache is not None:
            cache = kv_cache.append(cache, k, v, key_mask, positions, cache.seen + T)
            k, v, key_mask, kpos = cache.k, cache.v, cache.key_mask, cache.pos
        o = attention(q, k, v, q_pos=positions, k_pos=kpos, key_mask=key_mask, window=self.window)
        return o, None if cache is None else trim_window(cache, self.window)


def trim_window(cache: KVState, window: int) -> KVState:
    """``cache`` without its leading slots that no row's later queries can see (every row's key
    there unused or ``window`` or more positions behind that row's newest key)."""
    if cache.k.shape[1] == 0:
        return cache
    newest = cache.pos.masked_fill(~cache.key_mask, -1).amax(1, keepdim=True)  # [B, 1]
    needed = (cache.key_mask & (cache.pos > newest + 1 - window)).any(0)
    first = int(needed.int().argmax()) if bool(needed.any()) else cache.k.shape[1]
    if first == 0:
        return cache
    return KVState(cache.k[:, first:], cache.v[:, first:], cache.key_mask[:, first:], cache.pos[:, first:],
                   cache.seen)


class LigerGLA(LinearizedAttention):
    """Linearised attention with the GLA recurrence (Liger GLA)."""

    recurrence = "gla"


class LigerGatedDeltaNet(LinearizedAttention):
    """Linearised attention with the gated delta rule."""

    recurrence = "gated_deltanet"


def liger_options(config: Any) -> dict[str, Any]:
    """Constructor options of a linearised mixer from a LoopConfig (the attention's, plus the window)."""
    return {"n_kv_heads": config.n_kv_heads, "rope_base": config.rope_base,
            "rope_scaling": config.rope_scaling, "head_dim": config.head_dim, "bias": config.qkv_bias,
            "window": config.window, "chunk_size": config.chunk_size, "normalize": config.liger_norm}
