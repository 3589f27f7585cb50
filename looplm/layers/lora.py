"""LoRA adapters on a layer's projections (Hu et al. 2021), with one adapter per recursion for the
shared core (the "relaxation" of Relaxed Recursive Transformers, Bae et al. 2024).

``LoRALinear``: ``y = x W^T + b + (x A_i^T) B_i^T`` for the active adapter ``i``; ``A [n, r, in]``,
``B [n, out, r]``; ``B = 0`` at creation, so a new adapter changes nothing. It is a subclass of
looplm's ``Linear`` with the same ``weight``/``bias`` (state-dict keys unchanged, ``lora_a``,
``lora_b`` added), so checkpoints of a model with adapters load with ``LoopConfig.lora_rank``.
A small explicit module rather than ``peft``: peft wraps a model and renames every parameter
(``base_model.model...``), which checkpoint.py's strict LoopLM loading and the layering forbid,
and it has no adapter chosen per recursion of a shared layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from looplm.layers.linear import Linear
from looplm.ops.linear import linear

__all__ = ["LoRALinear", "add_lora", "lora_parameters"]


class LoRALinear(Linear):
    """``Linear`` plus ``n`` rank-``rank`` adapters; ``self.index`` picks the one applied."""

    def __init__(self, in_features: int, out_features: int, rank: int, n: int = 1,
                 bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if rank < 1 or n < 1:
            raise ValueError(f"LoRA needs rank >= 1 and n >= 1 adapters, got rank={rank}, n={n}")
        self.rank, self.index = rank, 0
        self.lora_a = nn.Parameter(torch.empty(n, rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(n, out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a.view(n * rank, in_features), a=math.sqrt(5))

    @classmethod
    def wrap(cls, base: nn.Linear, rank: int, n: int = 1) -> LoRALinear:
        """A LoRALinear sharing ``base``'s weight and bias parameters (new adapters, B = 0)."""
        new = cls(base.in_features, base.out_features, rank, n, bias=base.bias is not None)
        new.to(base.weight.device, base.weight.dtype)
        new.weight, new.bias = base.weight, base.bias
        return new

    def delta(self, index: int) -> torch.Tensor:
        """Adapter ``index`` as a weight update ``B A [out, in]``."""
        return self.lora_b[index] @ self.lora_a[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_a[self.index], self.lora_b[self.index]
        return linear(x, self.weight, self.bias) + linear(linear(x, a), b)


def add_lora(module: nn.Module, rank: int, n: int = 1) -> list[LoRALinear]:
    """Replace every plain ``nn.Linear`` under ``module`` by a LoRALinear with ``n`` adapters
    (in place; weights shared); returns the LoRALinear modules (existing ones included)."""
    out = []
    for name, child in list(module.named_children()):
        if isinstance(child, LoRALinear):
            out.append(child)
        elif isinstance(child, nn.Linear):
            new = LoRALinear.wrap(child, rank, n)
            setattr(module, name, new)
            out.append(new)
        else:
            out.extend(add_lora(child, rank, n))
    return out


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (``lora_a``, ``lora_b``) under ``module``."""
    return [p for m in module.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)]
