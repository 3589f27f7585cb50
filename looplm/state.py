"""Decoding state of a LoopLM: one mixer state per (layer, recursion) and per-row positions.

Fixed-state mixers keep a constant-size state, so an attention-free model's state does not
grow with generated tokens; attention layers cache only the tokens active at their recursion
(none at all for recursions that share the first recursion's keys/values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ModelState:
    """``positions [B]`` long: tokens each row has seen (the next token's position);
    ``layers``: mixer state per key ``"prelude.i"``, ``"core.j.r"`` (layer j, recursion r),
    ``"coda.i"``. Created by ``LoopLM.forward(..., use_cache=True)``; pass it back unchanged."""

    positions: torch.Tensor
    layers: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def empty(cls, batch_size: int, device: torch.device | str | None = None) -> ModelState:
        return cls(torch.zeros(batch_size, dtype=torch.long, device=device))

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    def nbytes(self) -> int:
        """Bytes held by all tensors of the state."""
        total = self.positions.numel() * self.positions.element_size()
        return total + sum(s.nbytes() for s in self.layers.values())
