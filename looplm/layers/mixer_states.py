"""The decoding states of the token mixers: an attention cache and a fixed-size recurrent state.

Dataclasses of tensors with ``nbytes()``; a mixer returns a new one per call and never modifies
the one it was given (layers/mixers.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["KVState", "QuantKVState", "RecurrentState"]


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
