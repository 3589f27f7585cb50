"""The decoding states of the token mixers: an attention cache, a fixed-size recurrent state, and
the linearised attention's recurrent state with its sliding window of keys.

Dataclasses of tensors with ``nbytes()``; a mixer returns a new one per call and never modifies
the one it was given (layers/mixers.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["KVState", "LinearizedState", "QuantKVState", "RecurrentState", "check_inputs"]


@dataclass
class _NBytes:
    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        tensors = (getattr(self, f.name) for f in fields(self))
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class KVState(_NBytes):
    """Attention cache: ``k, v [B, S, Hkv, D]``, ``key_mask [B, S]`` (False = slot unused in that
    row), ``pos [B, S]`` key positions, ``seen [B]`` tokens seen so far (for default positions).
    Grows only by tokens that are active in at least one row; appended to by
    :func:`looplm.layers.kv_cache.append` (views of a buffer with room to grow)."""

    k: torch.Tensor
    v: torch.Tensor
    key_mask: torch.Tensor
    pos: torch.Tensor
    seen: torch.Tensor

    @classmethod
    def empty(cls, batch_size: int, n_kv_heads: int, head_dim: int, like: torch.Tensor) -> KVState:
        """An empty cache for ``batch_size`` rows, in ``like``'s dtype and device."""
        kv = like.new_zeros(batch_size, 0, n_kv_heads, head_dim)
        idx = torch.zeros(batch_size, 0, dtype=torch.long, device=like.device)
        return cls(kv, kv, idx.bool(), idx, torch.zeros(batch_size, dtype=torch.long, device=like.device))


@dataclass
class QuantKVState(KVState):
    """Attention cache held quantised (:mod:`looplm.ops.kv_quant`): ``k, v [B, S, Hkv, D]`` are
    int8 or FP8 codes of one row per token and head, ``k_scale, v_scale [B, S, Hkv, 1]`` float32
    their scales. The attention mixer appends quantised rows and reads the codes chunk by
    chunk, so the cache is never expanded to float."""

    k_scale: torch.Tensor
    v_scale: torch.Tensor


@dataclass
class RecurrentState(_NBytes):
    """Fixed-size state: ``conv [B, K-1, C]`` last conv inputs, ``ssm [B, H, dk, dv]``."""

    conv: torch.Tensor
    ssm: torch.Tensor


@dataclass
class LinearizedState:
    """A linearised attention layer's state (layers/liger.py): ``ssm [B, H, D, D]`` and, with a
    sliding window, the cache of the keys still inside it (``window``, None without one)."""

    ssm: torch.Tensor
    window: KVState | None

    def nbytes(self) -> int:
        """Bytes held by the recurrent state and the window's keys and values."""
        extra = 0 if self.window is None else self.window.nbytes()
        return self.ssm.numel() * self.ssm.element_size() + extra


def check_inputs(x: torch.Tensor, d_model: int, mask: torch.Tensor | None,
                 positions: torch.Tensor | None, state: object, state_type: type) -> None:
    """ValueError/TypeError naming the argument of a mixer's forward that does not fit ``x [B, T, d]``."""
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"x must have shape [B, T, {d_model}], got {tuple(x.shape)}")
    if state is not None:
        if not isinstance(state, state_type):
            raise TypeError(f"state must be a {state_type.__name__} (from this mixer's init_state), "
                            f"got {type(state).__name__}")
        if isinstance(state, KVState):
            rows = state.seen.shape[0]
        elif isinstance(state, (RecurrentState, LinearizedState)):
            rows = state.ssm.shape[0]
        else:
            rows = x.shape[0]  # a state type of its own: its mixer checks it
        if rows != x.shape[0]:
            raise ValueError(f"state holds {rows} rows but x has batch size {x.shape[0]}")
    for name, t in (("mask", mask), ("positions", positions)):
        if t is not None and tuple(t.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{name} must have shape [B, T] = {tuple(x.shape[:2])}, got {tuple(t.shape)}")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
