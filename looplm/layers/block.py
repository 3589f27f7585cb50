"""The pre-norm residual block: ``h + mixer(norm(h))``, then ``h + ffn(norm(h))`` (no FFN when
``ffn="none"``).

The FFN runs only on the rows ``mask`` keeps (a gathered ``[N, d]`` matrix), so absent tokens
cost nothing there. ``shared_kv`` (MoR recursive KV sharing, Bae et al. 2025) makes an attention
mixer read the keys/values another recursion cached instead of its own: queries come from this
block's input, nothing is cached here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from looplm.layers.block_step import block_step
from looplm.layers.ffn import SwiGLU
from looplm.layers.mixers import Attention, KVState, build_mixer, mixer_spec, read_cache
from looplm.layers.moe import MoE
from looplm.layers.norms import RMSNorm
from looplm.ops.attention import rope


def matmul_params(module: nn.Module) -> int:
    """Weights of ``module`` used as matmul / conv weights (parameters with ≥ 2 dims): a token
    running the module costs 2 FLOPs per such weight (looplm/flops.py)."""
    return sum(p.numel() for p in module.parameters() if p.dim() >= 2)


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


class Block(nn.Module):
    """One layer of LoopLM; ``mixer`` names its token mixer, ``config`` is a LoopConfig."""

    def __init__(self, config: Any, mixer: str) -> None:
        super().__init__()
        c = config
        d = c.d_model
        self.mixer_name = mixer
        self.spec = mixer_spec(mixer)
        self.mixer_norm = RMSNorm(d, eps=c.norm_eps)
        self.mixer = build_mixer(mixer, d, c.n_heads, **self.spec.options(c))
        self.ffn_norm: RMSNorm | None = RMSNorm(d, eps=c.norm_eps)
        self.ffn: nn.Module | None
        if c.ffn == "none":  # a mixer-only block
            self.ffn_norm = self.ffn = None
        elif c.ffn == "moe":
            z = c.zero_experts  # MoE++ kinds in turn: zero, copy, constant
            shared = c.ffn_dim if c.shared_expert else 0
            self.ffn = MoE(d, c.ffn_dim, c.n_experts, c.top_k, shared_hidden=shared,
                           zero_experts=(z + 2) // 3, copy_experts=(z + 1) // 3, constant_experts=z // 3,
                           router_dim=c.moe_router_dim if c.moe_router == "recurrent" else 0)
        else:
            self.ffn = SwiGLU(d, c.ffn_dim)
        self.drop = nn.Dropout(c.dropout)
        self.mixer_matmul = matmul_params(self.mixer)
        self.ffn_matmul = 0 if self.ffn is None else matmul_params(self.ffn)
        self.ffn_cost = None  # MoE: weights every token runs, per expert, experts per token
        if c.ffn == "moe":
            w_in, w_out = self.ffn.w_in, self.ffn.w_out
            expert = w_in[0].numel() + w_out[0].numel()
            shared = 0 if self.ffn.shared is None else matmul_params(self.ffn.shared)
            gru = (self.ffn.route_in, self.ffn.gru, self.ffn.route_out)
            routing = self.ffn.router.weight.numel() + sum(matmul_params(m) for m in gru if m is not None)
            self.ffn_cost = {"dense": routing + shared, "expert": expert,
                             "top_k": c.top_k, "n_experts": c.n_experts}

    @property
    def is_attention(self) -> bool:
        """Whether the mixer keeps an attention cache (its state grows with the tokens seen)."""
        return self.spec.kv_cache

    def forward(
        self, x: torch.Tensor, state: Any = None, *, positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None, shared_kv: KVState | None = None, route: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any, dict]:
        """x ``[B,T,d]``, mask ``[B,T]`` bool (False rows come out unchanged) -> (y, state, aux).

        ``aux`` is the FFN's aux dict plus ``tokens`` (rows run: an int, a 0-dim tensor with a mask).
        ``route [B,T,g]``: the recurrent MoE router's hidden state coming in; with such a router
        ``aux["route"]`` is the one going out (rows the mask drops keep theirs).
        """
        recurrent = isinstance(self.ffn, MoE) and self.ffn.gru is not None
        fused = None if recurrent else block_step(self, x, state, mask, shared_kv, positions)
        if fused is not None:  # the block's decoding step in C++
            h, state, aux = fused
            return h, state, {**aux, "tokens": h.shape[0]}
        u = self.mixer_norm(x)
        if shared_kv is not None:
            y = attend_shared(self.mixer, u, shared_kv, positions, mask)
        else:
            y, state = self.mixer(u, state, positions=positions, mask=mask)
        h = x + self._drop(y)
        tokens: int | torch.Tensor = h.shape[0] * h.shape[1] if mask is None else mask.sum()
        if self.ffn is None:
            return h, state, {"tokens": tokens}
        u = self.ffn_norm(h)
        if recurrent:
            if route is None:
                route = h.new_zeros(*h.shape[:2], self.ffn.gru.hidden_size)
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
        if recurrent:
            aux = dict(aux)
            new = aux["route"]
            aux["route"] = new.view_as(route) if mask is None else route.index_put((mask,), new)
        return h, state, {**aux, "tokens": tokens}

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x) if self.drop.p and self.training else x
