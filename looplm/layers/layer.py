"""The pre-norm residual layer: ``h + mixer(norm(h))``, then ``h + ffn(norm(h))`` (no FFN when
``ffn="none"``).

The FFN runs only on the rows ``mask`` keeps (a gathered ``[N, d]`` matrix), so absent tokens
cost nothing there. ``shared_kv`` (MoR recursive KV sharing, Bae et al. 2025) makes an attention
mixer read the keys/values another recursion cached instead of its own: queries come from this
layer's input, nothing is cached here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, cast

import torch
from torch import nn

from looplm.layers.ffns import ffn_spec, matmul_params
from looplm.layers.layer_step import decide, layer_step
from looplm.layers.mixer_states import KVState
from looplm.layers.mixers import Attention, build_mixer, mixer_spec, read_cache
from looplm.layers.moe import MoE
from looplm.layers.norms import RMSNorm
from looplm.ops.attention import rope


def attend_shared(attn: Attention, x: torch.Tensor, kv: KVState, positions: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of ``x [B,T,d]`` (queries only) over an existing cache ``kv``; -> ``[B,T,d]``.

    Written here because the mixer's forward always uses its own keys; this reuses its
    projections and RoPE so the result is what the mixer would give with those keys.
    """
    B, T, _ = x.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.qkv(x).view(B, T, H + 2 * Hkv, D)[:, :, :H]
    q = rope(q, positions, attn.rope_base, attn.rope_scaling)
    o = read_cache(q, kv, positions)
    if mask is not None:
        o = o * mask[:, :, None, None]
    return attn.o_proj(o.reshape(B, T, H * D))


class Mixer(Protocol):
    """What a layer needs of its mixer beyond ``nn.Module``: an empty decoding state."""

    def init_state(self, batch_size: int) -> Any: ...


class Layer(nn.Module):
    """One layer of LoopLM; ``mixer`` names its token mixer, ``config`` is a LoopConfig."""

    def __init__(self, config: Any, mixer: str) -> None:
        super().__init__()
        c = config
        d = c.d_model
        self.mixer_name = mixer
        self.spec = mixer_spec(mixer)
        self.mixer_norm = RMSNorm(d, eps=c.norm_eps)
        self.mixer = build_mixer(mixer, d, c.n_heads, **self.spec.options(c))
        spec = ffn_spec(c.ffn)
        ffn = spec.build(c)
        self.ffn_norm: RMSNorm | None = None if ffn is None else RMSNorm(d, eps=c.norm_eps)
        self.ffn: nn.Module | None = ffn  # registered after its norm (the order of state_dict and init)
        self.drop = nn.Dropout(c.dropout)
        self.mixer_matmul = matmul_params(self.mixer)
        self.ffn_cost = spec.cost(self.ffn)  # what a token costs in the FFN (looplm/flops.py)

    def train(self, mode: bool = True) -> Layer:
        """Train or eval mode; the decoding kernel is decided here (:mod:`looplm.layers.layer_step`)."""
        super().train(mode)
        decide(self)
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> Layer:
        """A device or dtype change (``.to``, ``.float()``...); the decoding kernel is decided again."""
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # torch's Module._apply is untyped
        decide(self)
        return self

    def init_state(self, batch_size: int) -> Any:
        """An empty decoding state of the mixer for ``batch_size`` rows (its own state type)."""
        return cast(Mixer, self.mixer).init_state(batch_size)  # every registered mixer has one

    @property
    def is_attention(self) -> bool:
        """Whether the mixer keeps an attention cache (its state grows with the tokens seen)."""
        return self.spec.kv_cache

    def forward(
        self, x: torch.Tensor, state: Any = None, *, positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None, shared_kv: KVState | None = None, route: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any, dict[str, Any]]:
        """x ``[B,T,d]``, mask ``[B,T]`` bool (False rows come out unchanged) -> (y, state, aux).

        ``aux`` is the FFN's aux dict plus ``tokens`` (rows run: an int, a 0-dim tensor with a mask).
        ``route [B,T,g]``: the recurrent MoE router's hidden state coming in; with such a router
        ``aux["route"]`` is the one going out (rows the mask drops keep theirs).
        """
        gru = self.ffn.gru if isinstance(self.ffn, MoE) else None  # a recurrent MoE router's
        fused = layer_step(self, x, state, mask, shared_kv, positions)  # never with a recurrent router
        if fused is not None:  # the layer's decoding step in C++
            h, state, aux = fused
            return h, state, {**aux, "tokens": h.shape[0]}
        u = self.mixer_norm(x)
        if shared_kv is not None:
            if not isinstance(self.mixer, Attention) or positions is None:
                raise ValueError("shared_kv needs an attention mixer and the tokens' positions")
            y = attend_shared(self.mixer, u, shared_kv, positions, mask)
        else:
            y, state = self.mixer(u, state, positions=positions, mask=mask)
        h = x + self._drop(y)
        tokens: int | torch.Tensor = h.shape[0] * h.shape[1] if mask is None else mask.sum()
        if self.ffn is None or self.ffn_norm is None:
            return h, state, {"tokens": tokens}
        u = self.ffn_norm(h)
        if gru is not None:
            if route is None:
                route = h.new_zeros(*h.shape[:2], gru.hidden_size)
            rows = route.reshape(-1, route.shape[-1]) if mask is None else route[mask]
            extra = {"route": rows}
        else:
            extra = {}
        if mask is None:
            f, aux = self.ffn(u.reshape(-1, u.shape[-1]), **extra)
            h = h + self._drop(f).view_as(h)
        else:
            f, aux = self.ffn(u[mask], **extra)
            h = h + torch.zeros_like(h).index_put((mask,), self._drop(f))
        if gru is not None and route is not None:
            aux = dict(aux)
            new = aux["route"]
            aux["route"] = new.view_as(route) if mask is None else route.index_put((mask,), new)
        return h, state, {**aux, "tokens": tokens}

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x) if self.drop.p and self.training else x


def as_layers(modules: Iterable[nn.Module]) -> list[Layer]:
    """The layers of a prelude, core or coda ``nn.ModuleList`` as Layers (TypeError on another
    module: the list's items are typed as plain modules)."""
    layers = []
    for m in modules:
        if not isinstance(m, Layer):
            raise TypeError(f"expected a Layer, got {type(m).__name__}")
        layers.append(m)
    return layers
