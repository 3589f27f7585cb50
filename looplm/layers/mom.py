"""Mixture of memories (MoM, Du et al. 2025) over a fixed-state mixer (docs/mechanisms.md).

A router ``g = softmax(x W_g)`` over M memories sends each token to its top-k, weights
renormalised over those k. Each memory is a whole fixed-state mixer (its own q/k/v projections,
short conv, gates, readout and state) that reads and writes only the tokens routed to it — the
mixers' ``mask``: an unrouted token neither reads nor updates that memory. The output is
``Σ_{m ∈ topk} g_m · y_m`` plus, with ``shared``, a memory every token uses (weight 1).

Training runs each memory's chunkwise form, decoding its step form (the C++ step wherever the
memory's own mixer has one), so the forms agree as the memories' do and the state is the M (+1)
memories' states: M times one mixer's bytes, constant in the context. Every memory runs on all T
positions (unrouted ones as identity updates), so compute is M (+1) mixers, not k.
With M = k = 1 the layer is the underlying mixer (g = 1, every token routed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import nn

from looplm.errors import ConfigError
from looplm.layers.linear import Linear
from looplm.layers.mixer_states import RecurrentState


@dataclass
class MemoryState:
    """The states of the memories (then the shared one, if any), one ``RecurrentState`` each."""

    memories: list[RecurrentState]

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.memories)


class Memory(Protocol):
    """What a mixture needs of a memory (a fixed-state mixer): its head size and a zero state."""

    head_dim: int

    def init_state(self, batch_size: int) -> RecurrentState: ...


class MixtureOfMemories(nn.Module):
    """``forward(x [B,T,d], state=None, *, positions=None, mask=None) -> (y [B,T,d], state)`` as
    every mixer; ``memory`` is the fixed-state mixer class, ``opts`` its options."""

    def __init__(self, d_model: int, n_heads: int, *, memory: type[nn.Module], memories: int = 4,
                 top_k: int = 2, shared: bool = False, **opts: Any) -> None:
        super().__init__()
        if not isinstance(memories, int) or memories < 1:
            raise ConfigError(f"memories must be a positive integer, got {memories!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= memories:
            raise ConfigError(f"memory_top_k must be in 1..{memories}, got {top_k!r}")
        self.d_model, self.n_heads, self.top_k = d_model, n_heads, top_k
        self.router = Linear(d_model, memories, bias=False)
        self.memories = nn.ModuleList(memory(d_model, n_heads, **opts) for _ in range(memories + shared))
        self.n_routed = memories
        self.head_dim: int = self._memory(0).head_dim

    def _memory(self, i: int) -> Memory:
        # the memories are built from one of MEMORY_MIXERS (layers/mixers.py), all of which are
        # Memory; ModuleList types its items as plain modules
        return cast(Memory, self.memories[i])

    def init_state(self, batch_size: int) -> MemoryState:
        return MemoryState([self._memory(i).init_state(batch_size) for i in range(len(self.memories))])

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Router weights ``[B,T,M]``: the top-k softmax probabilities renormalised, 0 elsewhere."""
        p = torch.softmax(self.router(x).float(), -1)
        w, idx = p.topk(self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        return torch.zeros_like(p).scatter(-1, idx, w).to(x.dtype)

    def forward(self, x: torch.Tensor, state: MemoryState | None = None, *,
                positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, MemoryState | None]:
        n = len(self.memories)
        if state is not None and (not isinstance(state, MemoryState) or len(state.memories) != n):
            raise TypeError(f"state must be a MemoryState of {len(self.memories)} memories (from init_state)")
        g = self.route(x)
        y = torch.zeros_like(x)
        new: list[RecurrentState] = []
        for i, mem in enumerate(self.memories):
            routed = g[..., i] > 0 if i < self.n_routed else torch.ones_like(g[..., 0], dtype=torch.bool)
            m = routed if mask is None else routed & mask
            y_i, s_i = mem(x, None if state is None else state.memories[i], positions=positions, mask=m)
            y = y + (y_i * g[..., i, None] if i < self.n_routed else y_i)
            if s_i is not None:
                new.append(s_i)
        return y, (MemoryState(new) if state is not None else None)
