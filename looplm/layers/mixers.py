"""Token mixers: softmax attention and the fixed-state family (docs/mechanisms.md §1).

Every mixer has one signature for training, prefill and decoding::

    y, state = mixer(x [B, T, d], state=None, *, positions=None, mask=None)

- ``state=None``: training path (chunkwise form), returns ``(y, None)``.
- ``state=mixer.init_state(B)`` (empty) or a state returned earlier: prefill (T > 1, chunkwise
  form from that state) or decoding (T = 1, step form); returns the new state. States are
  not modified in place.
- ``mask [B, T]`` bool, True = the token exists for this layer. A False token neither reads
  nor writes the state (as if absent) and its output row is zero. Fixed-state mixers move
  the active tokens of each row to the front (stable), so the short convolution sees only
  active tokens, and give the rest the identity update (k = 0, g = 0, beta = 0).
- ``positions [B, T]`` absolute positions for RoPE (attention only); by default they continue
  from the number of tokens the state has seen (masked ones included).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from looplm.errors import ConfigError
from looplm.layers import kv_cache
from looplm.layers.liger import LigerGatedDeltaNet, LigerGLA, LinearizedAttention, liger_options
from looplm.layers.linear import Linear, activation_like
from looplm.layers.mixer_states import KVState, QuantKVState, RecurrentState, check_inputs
from looplm.layers.mom import MixtureOfMemories
from looplm.layers.norms import HeadRMSNorm, l2_normalize
from looplm.ops.attention import apply_rope, attention, rope_cos_sin
from looplm.ops.conv import causal_conv1d, causal_conv1d_step
from looplm.ops.delta_rule import delta_chunk, delta_step
from looplm.ops.kv_quant import dequantize_rows, quantized_attention
from looplm.ops.linear_attn import decay_chunk, decay_step


class Attention(nn.Module):
    """Causal softmax attention with RoPE, grouped KV heads and a KV cache (Vaswani 2017;
    RoFormer; GQA, Ainslie 2023). ``bias``: biases on the q, k, v projections (Qwen2);
    ``rope_scaling``: see :func:`looplm.ops.attention.rope_inv_freq`."""

    def __init__(self, d_model: int, n_heads: int, *, n_kv_heads: int | None = None,
                 head_dim: int | None = None, rope_base: float = 10000.0,
                 rope_scaling: dict[str, Any] | None = None, bias: bool = False) -> None:
        super().__init__()
        self.d_model, self.n_heads = d_model, n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or _head_dim(d_model, n_heads)
        if n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        self.rope_base, self.rope_scaling = rope_base, rope_scaling
        D, Hkv = self.head_dim, self.n_kv_heads
        self.qkv = Linear(d_model, (n_heads + 2 * Hkv) * D, bias=bias)
        self.o_proj = Linear(n_heads * D, d_model, bias=False)

    def init_state(self, batch_size: int) -> KVState:
        """An empty cache for ``batch_size`` rows."""
        return KVState.empty(batch_size, self.n_kv_heads, self.head_dim, activation_like(self.o_proj))

    def forward(self, x: torch.Tensor, state: KVState | None = None, *,
                positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KVState | None]:
        check_inputs(x, self.d_model, mask, positions, state, KVState)
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        default_pos = positions is None
        if positions is None:
            steps = torch.arange(T, device=x.device)
            positions = steps if state is None else state.seen[:, None] + steps
        cos, sin = rope_cos_sin(positions, D, self.rope_base, x.dtype, self.rope_scaling)
        positions = positions.expand(B, T)
        # split, not slices: the backward of two slices zero-fills the whole qkv gradient twice
        qk, v = self.qkv(x).view(B, T, H + 2 * Hkv, D).split((H + Hkv, Hkv), dim=2)
        q, k = apply_rope(qk, cos, sin).split((H, Hkv), dim=2)
        new_state, kpos, key_mask = None, positions, mask
        if state is not None:
            key_mask = mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
            if mask is not None and not bool(mask.any(0).all()):  # cache no token masked in every row
                keep = mask.any(0)
                k, v, key_mask, kpos = k[:, keep], v[:, keep], key_mask[:, keep], positions[:, keep]
            new_state = kv_cache.append_rows(state, k, v, key_mask, kpos, state.seen + T)
            if isinstance(state, QuantKVState):  # stored and read quantised, never expanded
                o = read_cache(q, new_state, positions)
                if mask is not None:
                    o = o * mask[:, :, None, None]
                return self.o_proj(o.reshape(B, T, H * D)), new_state
            k, v, key_mask, kpos = new_state.k, new_state.v, new_state.key_mask, new_state.pos
        # causal by index == causal by position when positions increase and nothing was cached (a
        # compiled graph cannot branch on the values: it takes the general, position-masked path)
        if mask is None and (state is None or state.k.shape[1] == 0) and (
                default_pos or T == 1 or (not torch.compiler.is_compiling()
                                          and bool((positions[:, 1:] > positions[:, :-1]).all()))):
            o = attention(q, k, v)
        elif (T == 1 and mask is None and key_mask is not None and bool(key_mask.all())
              and bool((kpos <= positions).all())):  # a decoding step that sees every cached key
            o = attention(q, k, v, causal=False)
        elif mask is None and key_mask is not None and ends_cache(positions, kpos, key_mask):
            o = attention(q, k, v)  # a prefill chunk after a cache: its queries are the last T keys
        else:
            o = attention(q, k, v, q_pos=positions, k_pos=kpos, key_mask=key_mask)
        if mask is not None:
            o = o * mask[:, :, None, None]
        return self.o_proj(o.reshape(B, T, H * D)), new_state


def ends_cache(positions: torch.Tensor, k_pos: torch.Tensor, key_mask: torch.Tensor) -> bool:
    """Whether T > 1 queries at ``positions [B, T]`` are the last T of the cached slots at ``k_pos
    [B, S]`` (a prefill chunk just appended), in increasing order, after every earlier slot, with no
    slot masked: causal attention by index (no positions, no mask) is then causal by position.
    False while a graph is compiled (it cannot branch on values)."""
    T = positions.shape[1]
    return (1 < T <= k_pos.shape[1] and not torch.compiler.is_compiling() and bool(key_mask.all())
            and torch.equal(k_pos[:, -T:], positions) and bool((positions[:, 1:] > positions[:, :-1]).all())
            and bool((k_pos[:, :-T] < positions[:, :1]).all()))


def read_cache(q: torch.Tensor, cache: KVState, positions: torch.Tensor) -> torch.Tensor:
    """Attention of ``q [B, T, H, D]`` at ``positions [B, T]`` over every slot of ``cache`` (float
    or quantised) that its positions and key mask allow; -> ``[B, T, H, Dv]``."""
    B, T, H, _ = q.shape
    if isinstance(cache, QuantKVState) and 2 * T * H >= cache.k.shape[2] * cache.k.shape[3]:
        # many queries (a prefill chunk): one layer's keys and values in float are at most four
        # times the chunk's scores [B, H, T, S], and the float attention's fast kernels take them
        # (the chunked read of the codes costs ~0.5 ms more per layer in PyTorch calls)
        k, v = dequantize_rows(cache.k, cache.k_scale), dequantize_rows(cache.v, cache.v_scale)
        if ends_cache(positions, cache.pos, cache.key_mask):
            return attention(q, k, v)
        return attention(q, k, v, q_pos=positions, k_pos=cache.pos, key_mask=cache.key_mask)
    if isinstance(cache, QuantKVState):
        return quantized_attention(q, cache.k, cache.k_scale, cache.v, cache.v_scale, q_pos=positions,
                                   k_pos=cache.pos, key_mask=cache.key_mask)
    return attention(q, cache.k, cache.v, q_pos=positions, k_pos=cache.pos, key_mask=cache.key_mask)


class _FixedStateMixer(nn.Module):
    """Shared recipe (GLA / gated DeltaNet papers): fused q,k,v projection, short causal
    depthwise conv + SiLU, a per-mixer feature map and gates, the fixed-state op, per-head
    RMSNorm, output gate ``o * swish(x W_g)``, output projection.

    Subclasses set ``_gates(x, mask) -> dict`` and ``_mix(q, k, v, gates, state, step)``.
    """

    def __init__(self, d_model: int, n_heads: int, *, head_dim: int | None = None,
                 value_dim: int | None = None, conv_size: int = 4, chunk_size: int | None = None,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        if conv_size < 1:
            raise ConfigError(f"conv_size must be >= 1, got {conv_size}")
        self.d_model, self.n_heads = d_model, n_heads
        self.head_dim = head_dim or _head_dim(d_model, n_heads)
        self.value_dim = value_dim or self.head_dim
        self.chunk_kw = {} if chunk_size is None else {"chunk_size": chunk_size}  # {}: the op's default
        H, dk, dv = n_heads, self.head_dim, self.value_dim
        self.split = (H * dk, H * dk, H * dv)
        self.qkv = Linear(d_model, sum(self.split), bias=False)
        self.conv_weight = nn.Parameter(torch.empty(sum(self.split), conv_size))
        nn.init.kaiming_uniform_(self.conv_weight, a=math.sqrt(5))
        self.g_proj = Linear(d_model, H * dv, bias=False)
        self.norm = HeadRMSNorm(dv, eps=norm_eps)
        self.o_proj = Linear(H * dv, d_model, bias=False)

    def init_state(self, batch_size: int) -> RecurrentState:
        """A zero state for ``batch_size`` rows."""
        p = activation_like(self.o_proj)
        conv = p.new_zeros(batch_size, self.conv_weight.shape[1] - 1, self.conv_weight.shape[0])
        ssm = p.new_zeros(batch_size, self.n_heads, self.head_dim, self.value_dim)
        return RecurrentState(conv, ssm)

    def _features(self, qk: torch.Tensor) -> torch.Tensor:
        """Feature map of queries and keys together, ``qk [B, T, 2H, dk]`` (one call for both)."""
        return qk

    def _gates(self, x: torch.Tensor, m: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {}

    def _mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: dict[str, torch.Tensor],
             state: torch.Tensor | None, step: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``q, k [B,T,H,dk]``, ``v [B,T,H,dv]``, ``state [B,H,dk,dv] | None`` -> ``(o [B,T,H,dv],
        state)``; the step form when ``step`` (T = 1), else the chunkwise form."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, state: RecurrentState | None = None, *,
                positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, RecurrentState | None]:
        check_inputs(x, self.d_model, mask, positions, state, RecurrentState)
        B, T, _ = x.shape
        H, dk, dv = self.n_heads, self.head_dim, self.value_dim
        perm = None
        if mask is not None and bool(mask.all()):
            mask = None
        if mask is not None and T > 1:  # active tokens first in each row, order kept
            perm = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices
            x = x.gather(1, perm[..., None].expand_as(x))
            mask = mask.gather(1, perm)
        step = state is not None and T == 1
        qkv = self.qkv(x)
        conv_state = state.conv if state is not None else None
        if step:
            c, new_conv = causal_conv1d_step(qkv[:, 0], self.conv_weight, None, conv_state, silu=True)
            c = c[:, None]
        else:
            c, new_conv = causal_conv1d(qkv, self.conv_weight, None, conv_state, silu=True)
        if mask is not None and state is not None:  # the last K-1 *active* inputs
            n_keep = new_conv.shape[1]
            xp = torch.cat((state.conv, qkv), 1)
            idx = mask.sum(1, keepdim=True) + torch.arange(n_keep, device=x.device)
            new_conv = xp.gather(1, idx[..., None].expand(-1, -1, xp.shape[-1]))
        qk, v = c.split((2 * H * dk, H * dv), dim=-1)
        q, k = self._features(qk.view(B, T, 2 * H, dk)).split(H, dim=2)
        v = v.view(B, T, H, dv)
        m = None if mask is None else mask.to(x.dtype)
        if m is not None:
            k = k * m[..., None, None]
        # The recurrence runs in the parameters' dtype: under bf16 autocast the projections come
        # out bf16, but decays and the state stay float32 (accumulating a state in bf16 drifts).
        op_dtype = self.o_proj.weight.dtype
        gates = self._gates(x, m)
        if q.dtype != op_dtype or any(t.dtype != op_dtype for t in gates.values()):
            q, k, v = q.to(op_dtype), k.to(op_dtype), v.to(op_dtype)
            gates = {n: t.to(op_dtype) for n, t in gates.items()}
        o, ssm = self._mix(q, k, v, gates, None if state is None else state.ssm, step)
        o = self.norm(o, gate=self.g_proj(x).view(B, T, H, dv))
        y = self.o_proj(o.reshape(B, T, H * dv))
        if m is not None:
            y = y * m[..., None]
        if perm is not None:
            y = torch.zeros_like(y).scatter(1, perm[..., None].expand_as(y), y)
        return y, (None if state is None else RecurrentState(new_conv, ssm))


class _DecayMixer(_FixedStateMixer):
    """Mixers over the ``decay_*`` ops (linear attention, retention, GLA)."""

    def _mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: dict[str, torch.Tensor],
             state: torch.Tensor | None, step: bool) -> tuple[torch.Tensor, torch.Tensor]:
        g = gates.get("g")
        if step:
            o, s = decay_step(q[:, 0], k[:, 0], v[:, 0], None if g is None else g[:, 0], state=state)
            return o[:, None], s
        return decay_chunk(q, k, v, g, initial_state=state, **self.chunk_kw)


class LinearAttention(_DecayMixer):
    """Linear attention (Katharopoulos et al. 2020): ``S_t = S_{t-1} + k_t^T v_t``, feature map
    ``elu + 1`` on q, k (``feature_map='identity'`` to drop it); the output RMSNorm replaces
    the denominator (TransNormer, Qin et al. 2022)."""

    def __init__(self, d_model: int, n_heads: int, *, feature_map: str = "elu1", **kw: Any) -> None:
        super().__init__(d_model, n_heads, **kw)
        if feature_map not in ("elu1", "identity"):
            raise ConfigError(f"feature_map must be 'elu1' or 'identity', got {feature_map!r}")
        self.feature_map = feature_map

    def _features(self, qk: torch.Tensor) -> torch.Tensor:
        return F.elu(qk) + 1 if self.feature_map == "elu1" else qk


class Retention(_DecayMixer):
    """Retention (RetNet, Sun et al. 2023): fixed decay per head ``gamma_h = 1 - 2^(-5-h)``."""

    log_gamma: torch.Tensor  # [H] buffer

    def __init__(self, d_model: int, n_heads: int, **kw: Any) -> None:
        super().__init__(d_model, n_heads, **kw)
        gamma = 1 - 2.0 ** (-5 - torch.arange(n_heads, dtype=torch.float64))
        self.register_buffer("log_gamma", gamma.log().float(), persistent=False)

    def _gates(self, x: torch.Tensor, m: torch.Tensor | None) -> dict[str, torch.Tensor]:
        g = self.log_gamma.to(x.dtype).expand(*x.shape[:2], self.n_heads)
        return {"g": g if m is None else g * m[..., None]}


class GLA(_DecayMixer):
    """Gated linear attention (Yang et al. 2024): gate over the key dim,
    ``alpha = sigmoid(x W1 W2 + b)^(1/tau)``, low rank, in log space ``g = logsigmoid(.) / tau``."""

    def __init__(self, d_model: int, n_heads: int, *, gate_rank: int = 16, gate_tau: float = 16.0,
                 **kw: Any) -> None:
        super().__init__(d_model, n_heads, **kw)
        self.gate_tau = gate_tau
        self.gk = nn.Sequential(Linear(d_model, gate_rank, bias=False),
                                Linear(gate_rank, n_heads * self.head_dim, bias=True))

    def _gates(self, x: torch.Tensor, m: torch.Tensor | None) -> dict[str, torch.Tensor]:
        g = F.logsigmoid(self.gk(x)).view(*x.shape[:2], self.n_heads, self.head_dim) / self.gate_tau
        return {"g": g if m is None else g * m[..., None, None]}


class SimpleGLA(_DecayMixer):
    """Scalar-gated linear attention (Mamba-2 / simple GLA, Dao & Gu 2024): one decay per head
    and token, ``g = logsigmoid(x w_g + b) / tau``."""

    def __init__(self, d_model: int, n_heads: int, *, gate_tau: float = 16.0, **kw: Any) -> None:
        super().__init__(d_model, n_heads, **kw)
        self.gate_tau = gate_tau
        self.gk = Linear(d_model, n_heads, bias=True)

    def _gates(self, x: torch.Tensor, m: torch.Tensor | None) -> dict[str, torch.Tensor]:
        g = F.logsigmoid(self.gk(x)) / self.gate_tau
        return {"g": g if m is None else g * m[..., None]}


class DeltaNet(_FixedStateMixer):
    """DeltaNet (Schlag et al. 2021; Yang et al. 2024): ``S_t = (I - b k^T k) S_{t-1} + b k^T v``,
    q, k L2-normalised, ``beta = sigmoid(x w_beta)``."""

    def __init__(self, d_model: int, n_heads: int, **kw: Any) -> None:
        super().__init__(d_model, n_heads, **kw)
        self.beta_proj = Linear(d_model, n_heads, bias=True)

    def _features(self, qk: torch.Tensor) -> torch.Tensor:
        return l2_normalize(qk)

    def _gates(self, x: torch.Tensor, m: torch.Tensor | None) -> dict[str, torch.Tensor]:
        beta = torch.sigmoid(self.beta_proj(x))
        return {"beta": beta if m is None else beta * m[..., None]}

    def _mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: dict[str, torch.Tensor],
             state: torch.Tensor | None, step: bool) -> tuple[torch.Tensor, torch.Tensor]:
        beta, g = gates["beta"], gates.get("g")
        if step:
            o, s = delta_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], None if g is None else g[:, 0],
                              state=state)
            return o[:, None], s
        return delta_chunk(q, k, v, beta, g, initial_state=state, **self.chunk_kw)


class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet (Yang, Kautz, Hatamizadeh 2025): ``S_t = a_t (I - b k^T k) S_{t-1} + b k^T v``,
    ``a_t = exp(g_t)``, ``g = -exp(A_log) * softplus(x W_a + dt_bias)`` per head (Mamba-2)."""

    def __init__(self, d_model: int, n_heads: int, **kw: Any) -> None:
        super().__init__(d_model, n_heads, **kw)
        self.a_proj = Linear(d_model, n_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(n_heads).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(n_heads).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt

    def _gates(self, x: torch.Tensor, m: torch.Tensor | None) -> dict[str, torch.Tensor]:
        gates = super()._gates(x, m)
        g = -self.A_log.exp() * F.softplus(self.a_proj(x) + self.dt_bias)
        gates["g"] = g if m is None else g * m[..., None]
        return gates


def _attention_options(config: Any) -> dict[str, Any]:
    return {"n_kv_heads": config.n_kv_heads, "rope_base": config.rope_base,
            "rope_scaling": config.rope_scaling, "head_dim": config.head_dim, "bias": config.qkv_bias}


def _fixed_state_options(config: Any) -> dict[str, Any]:
    return {"conv_size": config.conv_size, "chunk_size": config.chunk_size}


def _memory_options(config: Any) -> dict[str, Any]:
    spec = mixer_spec(config.memory_mixer)  # LoopConfig checks it is one of MEMORY_MIXERS
    return {"memory": spec.cls, "memories": config.memories, "top_k": config.memory_top_k,
            "shared": config.memory_shared, **_fixed_state_options(config)}


@dataclass(frozen=True)
class MixerSpec:
    """Everything the rest of the package needs to know about one mixer.

    ``op``: the op family in ``looplm/ops`` it runs (``attention``, ``decay``: linear_attn.py,
    ``delta``: delta_rule.py), whose forms the ops tests check against each other. ``gate``: the
    decay its op takes (None; ``const``: a constant per head; ``head``: one per head and token;
    ``dim``: one per key dimension), which ``looplm bench ops`` feeds it. ``kv_cache``: its state
    grows with the tokens it has seen (an attention cache) rather than being fixed-size.
    ``options(config)``: constructor options from a LoopConfig (and their validation).
    """

    name: str
    cls: type[nn.Module]
    op: str
    gate: str | None = None
    kv_cache: bool = False
    options: Callable[[Any], dict[str, Any]] = _fixed_state_options

    def pair_flops(self, mixer: nn.Module) -> int:
        """Forward FLOPs per attended (query, key) pair (QKᵀ and AV, docs/mechanisms.md §5): 0 for a
        fixed-state mixer, whose cost is its matmuls only."""
        return 4 * mixer.n_heads * mixer.head_dim if isinstance(mixer, Attention) else 0

    def state_numel(self, mixer: nn.Module, tokens: int) -> int:
        """Numbers in one row's decoding state after ``tokens`` tokens: keys and values of every
        token (``2 · Hkv · D`` each) for a cache; a linearised attention layer's ``H · D · D`` state
        (and keys and values of at most ``window`` tokens); else the conv tail
        (``(conv_size - 1) · channels``) and the ``H · dk · dv`` state, whatever the length (a
        mixture of memories: that of each memory)."""
        if isinstance(mixer, Attention):
            return 2 * mixer.n_kv_heads * mixer.head_dim * tokens
        if isinstance(mixer, MixtureOfMemories):  # one fixed state per memory
            return sum(self.state_numel(m, tokens) for m in mixer.memories)
        if isinstance(mixer, LinearizedAttention):
            window = 2 * mixer.n_kv_heads * mixer.head_dim * min(tokens, mixer.window)
            return mixer.n_heads * mixer.head_dim ** 2 + window
        if isinstance(mixer, _FixedStateMixer):
            channels, width = mixer.conv_weight.shape
            return (width - 1) * channels + mixer.n_heads * mixer.head_dim * mixer.value_dim
        raise TypeError(f"no state size known for mixer {type(mixer).__name__}")


# The registry: a new mixer is its class (and op) plus one line here.
MIXERS: dict[str, MixerSpec] = {s.name: s for s in (
    MixerSpec("attention", Attention, "attention", kv_cache=True, options=_attention_options),
    MixerSpec("linear", LinearAttention, "decay"),
    MixerSpec("retention", Retention, "decay", gate="const"),
    MixerSpec("gla", GLA, "decay", gate="dim"),
    MixerSpec("simple_gla", SimpleGLA, "decay", gate="head"),
    MixerSpec("deltanet", DeltaNet, "delta"),
    MixerSpec("gated_deltanet", GatedDeltaNet, "delta", gate="head"),
    MixerSpec("liger_gla", LigerGLA, "decay", gate="dim", options=liger_options),
    MixerSpec("liger_gated_deltanet", LigerGatedDeltaNet, "delta", gate="head", options=liger_options),
    # memories of config.memory_mixer (op and gate: the default gated DeltaNet's)
    MixerSpec("mom", MixtureOfMemories, "delta", gate="head", options=_memory_options),
)}

# the mixers a mixture of memories can hold: the fixed-state recipe (one RecurrentState each)
MEMORY_MIXERS = tuple(n for n, spec in MIXERS.items() if issubclass(spec.cls, _FixedStateMixer))


def mixer_spec(name: str) -> MixerSpec:
    """The registered mixer ``name``; ConfigError listing the known ones otherwise."""
    if name not in MIXERS:
        raise ConfigError(f"unknown mixer {name!r}; choose one of {', '.join(MIXERS)}")
    return MIXERS[name]


def _head_dim(d_model: int, n_heads: int) -> int:
    if n_heads < 1 or d_model % n_heads:
        raise ConfigError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}); "
                          "change one of them or set head_dim")
    return d_model // n_heads


def build_mixer(name: str, d_model: int, n_heads: int, **opts: Any) -> nn.Module:
    """The mixer called ``name`` (one of ``MIXERS``); ``opts`` go to its constructor."""
    spec = mixer_spec(name)
    try:
        return spec.cls(d_model, n_heads, **opts)
    except TypeError as e:
        raise ConfigError(f"bad option for mixer {name!r}: {e}") from e
