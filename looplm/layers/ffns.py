"""The FFN registry: ``config.ffn`` -> how a layer builds its FFN, what a token costs in it, and
the options it checks.

Entries: ``dense`` (:class:`~looplm.layers.ffn.SwiGLU`, Shazeer 2020), ``moe``
(:class:`~looplm.layers.moe.MoE`: top-k experts, optional shared expert and MoE++'s
zero-computation experts, Jin et al. 2024; RMoE's recurrent router, Qiu et al. 2024), ``none``
(a mixer-only layer). FLOPs follow
docs/mechanisms.md: a matmul with P weights costs 2·P per token forward; an MoE token costs its
router and shared expert plus the real experts it was sent to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from looplm.errors import ConfigError
from looplm.layers.ffn import SwiGLU
from looplm.layers.moe import MoE

Number = int | float | torch.Tensor


def matmul_params(module: nn.Module) -> int:
    """Weights of ``module`` used as matmul / conv weights (parameters with ≥ 2 dims): a token
    running the module costs 2 FLOPs per such weight."""
    return sum(p.numel() for p in module.parameters() if p.dim() >= 2)


@dataclass(frozen=True)
class FFNCost:
    """What one token costs in an FFN, fixed when it is built (quantisation keeps it): ``dense``
    weights every token runs; an MoE's ``expert`` weights per expert, ``top_k`` experts per token
    of ``n_experts`` real ones."""

    dense: int = 0
    expert: int = 0
    top_k: int = 0
    n_experts: int = 0

    @property
    def token_params(self) -> int:
        """Weights one token runs as configured (``top_k`` real experts: an upper bound with MoE++)."""
        return self.dense + self.top_k * self.expert

    def flops(self, tokens: Number, aux: dict[str, torch.Tensor]) -> Number:
        """Forward FLOPs over ``tokens`` rows (an int or a 0-dim tensor); with an MoE's ``aux``
        ``load`` (share of assignments per expert) only the real experts that ran count."""
        if "load" not in aux:
            return 2 * tokens * self.dense
        real = aux["load"][: self.n_experts].sum()
        return 2 * tokens * (self.dense + self.top_k * self.expert * real)


def _dense_cost(ffn: nn.Module | None) -> FFNCost:
    return FFNCost(dense=0 if ffn is None else matmul_params(ffn))


def _moe_cost(ffn: nn.Module | None) -> FFNCost:
    if not isinstance(ffn, MoE):
        raise TypeError(f"the moe FFN's cost needs an MoE layer, got {type(ffn).__name__}")
    shared = 0 if ffn.shared is None else matmul_params(ffn.shared)
    expert = ffn.w_in[0].numel() + ffn.w_out[0].numel()
    gru = (ffn.route_in, ffn.gru, ffn.route_out)  # a recurrent router's GRU and projections, if any
    routing = ffn.router.weight.numel() + sum(matmul_params(m) for m in gru if m is not None)
    return FFNCost(dense=routing + shared, expert=expert, top_k=ffn.top_k, n_experts=ffn.n_experts)


def _build_moe(c: Any) -> nn.Module:
    z = c.zero_experts  # MoE++ kinds in turn: zero, copy, constant
    return MoE(c.d_model, c.ffn_dim, c.n_experts, c.top_k, shared_hidden=c.ffn_dim if c.shared_expert else 0,
               zero_experts=(z + 2) // 3, copy_experts=(z + 1) // 3, constant_experts=z // 3,
               router_dim=c.moe_router_dim if c.moe_router == "recurrent" else 0)


def _check_moe(c: Any) -> None:
    if c.top_k > c.n_experts + c.zero_experts:
        raise ConfigError(f"top_k={c.top_k} exceeds the {c.n_experts + c.zero_experts} experts")


def _no_check(c: Any) -> None:
    return None


@dataclass(frozen=True)
class FFNSpec:
    """One FFN kind: ``build(config)`` (None: no FFN), ``cost(ffn)``, ``validate(config)``."""

    name: str
    build: Callable[[Any], nn.Module | None]
    cost: Callable[[nn.Module | None], FFNCost]
    validate: Callable[[Any], None] = _no_check


FFNS: dict[str, FFNSpec] = {s.name: s for s in (
    FFNSpec("dense", lambda c: SwiGLU(c.d_model, c.ffn_dim), _dense_cost),
    FFNSpec("moe", _build_moe, _moe_cost, _check_moe),
    FFNSpec("none", lambda c: None, lambda f: FFNCost()),
)}


def ffn_spec(name: str) -> FFNSpec:
    """The registered FFN ``name``; ConfigError listing the known ones otherwise."""
    if name not in FFNS:
        raise ConfigError(f"unknown ffn {name!r}; choose one of {', '.join(FFNS)}")
    return FFNS[name]
