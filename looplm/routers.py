"""Recursion routers of Mixture-of-Recursions (Bae et al. 2025) and the gather that saves compute.

``ExpertChoiceRouter``: before recursion r each still-active token gets ``g = σ(h·w_r + b_r)``;
with ``selection="topk"`` the top ``⌈β_r·n⌉`` of the tokens active at r−1 continue (n = valid
tokens in the row, hierarchical filtering), with ``"threshold"`` those with ``g > threshold``
(causal: decoding uses it; a recursion with ``β_r = 1`` keeps every active token under
either rule). A binary cross-entropy loss teaches the scores to predict the top-k
choice, whatever rule routes. ``TokenChoiceRouter``: once, before the first recursion, a
softmax over N_r depths picks each token's depth (top-1); its probability is the gate; a Switch
balancing loss ``N_r · Σ_j f_j P_j`` spreads the depths.

``ROUTERS``, the registry (``config.router``): each entry builds its router and owns its formulas,
the configured reach (fraction of tokens running each recursion) and its FLOPs (a score is a
``d``-wide dot product, ``2·d`` per token: expert-choice scores every token before each
recursion, token-choice scores all ``N_r`` depths once, halting scores the tokens still running
after each recursion but the last; its reach counts every recursion, an upper bound).
``LAYER_ROUTERS``: the same for routers in front of single layers (Mixture-of-Depths).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from looplm.errors import ConfigError
from looplm.layers.linear import Linear


def gather_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-align the kept tokens of each row, keeping their order.

    keep ``[B, T]`` bool -> (index ``[B, T']`` long into T, valid ``[B, T']`` bool) with
    ``T' = max`` kept per row; slots past a row's count point at dropped tokens and are invalid.
    """
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    width = int(keep.sum(1).max()) if keep.numel() else 0
    index = order[:, :width]
    return index, keep.gather(1, index)


def topk_keep(logit: torch.Tensor, active: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row keep the ``k[b]`` best active tokens: logit ``[B,T]``, k ``[B]`` -> keep ``[B,T]`` bool."""
    masked = logit.detach().masked_fill(~active, float("-inf"))
    rank = torch.argsort(torch.argsort(masked, dim=1, descending=True, stable=True), dim=1)
    return active & (rank < k[:, None])


class ExpertChoiceRouter(nn.Module):
    """One linear scorer per recursion; see the module docstring."""

    def __init__(self, d_model: int, keep: list[float], selection: str = "topk", threshold: float = 0.5):
        super().__init__()
        self.keep = list(keep)
        self.selection = selection
        self.threshold = threshold
        self.weight = nn.Parameter(torch.zeros(len(keep), d_model))
        self.bias = nn.Parameter(torch.zeros(len(keep)))

    def forward(
        self, r: int, h: torch.Tensor, active: torch.Tensor, valid: torch.Tensor,
        depth: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route recursion ``r``: h ``[B,T,d]``, active/valid ``[B,T]`` bool, depth ``[B,T]`` (replay).

        Returns (keep ``[B,T]`` bool, gate ``[B,T]``, BCE loss scalar).
        """
        logit = h @ self.weight[r] + self.bias[r]
        gate = torch.sigmoid(logit)
        k = torch.ceil(self.keep[r] * valid.sum(1).to(logit.dtype) - 1e-6).long()
        target = topk_keep(logit, active, k)
        if depth is not None:
            keep = active & (depth > r)
        elif self.selection == "topk" or self.keep[r] >= 1:
            keep = target
        else:
            keep = active & (gate > self.threshold)
        if active.any():
            loss = F.binary_cross_entropy_with_logits(logit[active], target[active].to(logit.dtype))
        else:
            loss = logit.sum() * 0
        return keep, gate, loss


class TokenChoiceRouter(nn.Module):
    """A linear router over depths 1..N_r, chosen once per token; see the module docstring."""

    def __init__(self, d_model: int, n_recursions: int):
        super().__init__()
        self.proj = Linear(d_model, n_recursions, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(
        self, h: torch.Tensor, valid: torch.Tensor, depth: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h ``[B,T,d]``, valid ``[B,T]`` -> (depth ``[B,T]`` in 1..N_r, gate ``[B,T]``, balance loss)."""
        probs = torch.softmax(self.proj(h).float(), dim=-1).to(h.dtype)
        if depth is None:
            depth = probs.argmax(-1) + 1
        depth = depth.clamp(1, probs.shape[-1])
        gate = probs.gather(-1, (depth - 1).unsqueeze(-1)).squeeze(-1)
        n = probs.shape[-1]
        p = probs[valid]
        if p.shape[0] == 0:
            return depth, gate, probs.sum() * 0
        frac = torch.bincount(depth[valid] - 1, minlength=n).to(p.dtype) / p.shape[0]
        return depth, gate, n * (frac * p.mean(0)).sum()


class HaltingRouter(nn.Module):
    """PonderNet halting over the recursions (Banino et al. 2021; ACT, Graves 2016, as option).

    After recursion r < N a token halts with ``λ_r = σ(h_r·w_r + b_r)`` (``λ_N = 1``), so it halts
    at r with ``p_r = λ_r Π_{j<r}(1 − λ_j)``, which sums to one over r. It goes on while its
    unhalted mass ``u_r = Π_{j≤r}(1 − λ_j)`` exceeds ``threshold`` (a per-token, causal rule;
    0: every recursion); where it stops, the mass left goes to that last state, so the output
    ``Σ_r q_r h_r`` is PonderNet's expected-depth output when every recursion runs. Loss:
    ``KL(q ‖ geometric(λ_p))`` truncated to N, or ACT's ponder cost ``Σ_r u_{r−1}`` (the
    expected number of recursions).
    """

    def __init__(self, d_model: int, n_recursions: int, threshold: float, prior: float, loss: str = "kl"):
        super().__init__()
        self.n, self.threshold, self.prior, self.loss_kind = n_recursions, threshold, prior, loss
        self.weight = nn.Parameter(torch.zeros(n_recursions - 1, d_model))
        self.bias = nn.Parameter(torch.zeros(n_recursions - 1))

    def halt(self, r: int, h: torch.Tensor) -> torch.Tensor:
        """λ_r ``[B,T]`` of ``h [B,T,d]`` after recursion r (ones after the last)."""
        if r >= self.n - 1:
            return h.new_ones(h.shape[:2])
        return torch.sigmoid(h @ self.weight[r] + self.bias[r])

    def step(self, r: int, h: torch.Tensor, rem: torch.Tensor, active: torch.Tensor,
             depth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """After recursion r: rem ``[B,T]`` unhalted mass before it, active ``[B,T]`` bool ->
        (weight of h_r ``[B,T]``, unhalted mass after, tokens that go on ``[B,T]`` bool);
        ``depth`` replays a routing instead of the threshold rule."""
        lam = self.halt(r, h)
        left = rem * (1 - lam)
        go = active & (depth > r + 1) if depth is not None else active & (left > self.threshold)
        weight = torch.where(go, rem * lam, torch.where(active, rem, torch.zeros_like(rem)))
        return weight, torch.where(go, left, torch.zeros_like(left)), go

    def loss(self, weights: list[torch.Tensor], reached: list[torch.Tensor],
             valid: torch.Tensor) -> torch.Tensor:
        """KL to the prior (or the ponder cost) averaged over valid tokens; weights/reached: one
        ``[B,T]`` per recursion run (halting weight q_r, mass reaching it u_{r−1})."""
        n_valid = valid.sum().clamp(min=1)
        if self.loss_kind == "act":
            return torch.stack(reached).sum(0)[valid].sum() / n_valid
        q = torch.stack(weights, -1)  # [B,T,R]
        steps = torch.arange(self.n, dtype=q.dtype, device=q.device)
        prior = self.prior * (1 - self.prior) ** steps if self.prior < 1 else (steps == 0).to(q.dtype)
        prior = (prior / prior.sum())[: q.shape[-1]]
        kl = torch.xlogy(q, q) - torch.xlogy(q, prior.clamp(min=1e-30).expand_as(q))
        return kl.sum(-1)[valid].sum() / n_valid


def sees_future(model: nn.Module) -> bool:
    """Whether an expert-choice router of ``model`` chooses top-k over the sequence."""
    return any(isinstance(m, ExpertChoiceRouter) and m.selection == "topk" for m in model.modules())


@contextmanager
def causal_routing(model: nn.Module) -> Iterator[None]:
    """For the duration every expert-choice router of ``model`` (MoR's and MoD's) uses the causal
    ``threshold`` rule, as decoding must (top-k over the sequence sees future tokens)."""
    old = {m: m.selection for m in model.modules() if isinstance(m, ExpertChoiceRouter)}
    for m in old:
        m.selection = "threshold"
    try:
        yield
    finally:
        for m, selection in old.items():
            m.selection = selection


@dataclass(frozen=True)
class RouterSpec:
    """One recursion router: ``build(config)`` (None: every token runs every recursion),
    ``reach(config)`` the configured fraction of tokens at each recursion, ``call_flops(config)``
    forward FLOPs per valid token of one call, ``calls(config)`` calls per forward."""

    name: str
    build: Callable[[Any], nn.Module | None]
    reach: Callable[[Any], list[float]]
    call_flops: Callable[[Any], float] = lambda c: 0.0
    calls: Callable[[Any], int] = lambda c: 0

    def flops_per_token(self, config: Any) -> float:
        """Forward FLOPs per token of the router as configured."""
        return self.call_flops(config) * self.calls(config)


ROUTERS: dict[str, RouterSpec] = {s.name: s for s in (
    RouterSpec("none", lambda c: None, lambda c: [1.0] * c.n_recursions),
    RouterSpec("expert_choice",
               lambda c: ExpertChoiceRouter(c.d_model, c.keep_fractions, c.selection, c.threshold),
               lambda c: c.keep_fractions, lambda c: 2.0 * c.d_model, lambda c: c.n_recursions),
    RouterSpec("token_choice", lambda c: TokenChoiceRouter(c.d_model, c.n_recursions),
               lambda c: [(c.n_recursions - r) / c.n_recursions for r in range(c.n_recursions)],
               lambda c: 2.0 * c.d_model * c.n_recursions, lambda c: 1),
    RouterSpec("halting",
               lambda c: HaltingRouter(c.d_model, c.n_recursions, c.halting_threshold, c.halting_prior,
                                       c.halting_loss),
               lambda c: [1.0] * c.n_recursions, lambda c: 2.0 * c.d_model, lambda c: c.n_recursions - 1),
)}

# Layer routers (``config.layer_router``), in the same form: ``build`` one layer's router (None:
# the layer runs every token), ``reach`` the fraction of tokens a routed layer runs, ``call_flops``
# per token scored, ``calls`` per routed layer and pass. Mixture-of-Depths (Raposo et al. 2024)
# scores every token before each routed layer and keeps the top ``mod_capacity`` fraction.
LAYER_ROUTERS: dict[str, RouterSpec] = {s.name: s for s in (
    RouterSpec("none", lambda c: None, lambda c: [1.0]),
    RouterSpec("mod",
               lambda c: ExpertChoiceRouter(c.d_model, [c.mod_capacity], c.selection, c.threshold)
               if c.mod_capacity < 1 else None,
               lambda c: [c.mod_capacity], lambda c: 2.0 * c.d_model, lambda c: 1),
)}


def router_spec(name: str) -> RouterSpec:
    """The registered router ``name``; ConfigError listing the known ones otherwise."""
    if name not in ROUTERS:
        raise ConfigError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}")
    return ROUTERS[name]
