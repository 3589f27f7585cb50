"""FLOPs accounting: what a LoopLM forward actually spends, and the configured per-token count.

Convention (Kaplan et al. 2020; Languini; MoR): a matmul with P weights costs 2·P FLOPs per
token forward; training costs 3× forward (backward ≈ 2× forward). Counted per token that a
layer actually runs (gathered tokens only: routing changes it):

- every weight matrix of the mixer and FFN (params with ≥ 2 dims, so the short conv too);
  an MoE counts its router, the shared expert and only the experts each token was sent to
  (zero-computation experts cost nothing);
- attention adds ``4 · d_attn`` per (query, key) pair actually attended (QKᵀ and AV), causal:
  a sequence of n tokens attends ``n(n+1)/2`` pairs; recursion-wise caching attends only the
  tokens active at that recursion;
- routers (``2·d`` per token per recursion for expert-choice, which scores every token;
  ``2·d·N_r`` once for token-choice) and the output head ``2·d·V``; embeddings and norms are free.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch

from looplm.layers.layer import Layer
from looplm.routers import LAYER_ROUTERS, ROUTERS, RouterSpec

Number = int | float | torch.Tensor


def attention_pairs(n_new: torch.Tensor, n_cached: torch.Tensor | None = None) -> torch.Tensor:
    """(query, key) pairs of causal attention: ``n_new [B]`` queries per row after ``n_cached [B]``
    keys; a 0-dim tensor (no device sync)."""
    pairs = n_new * (n_new + 1) // 2
    if n_cached is not None:
        pairs = pairs + n_new * n_cached
    return pairs.sum()


class Tally:
    """Accumulates one forward's FLOPs, weighted auxiliary losses and routing statistics.

    Counts are python numbers when shapes give them and 0-dim tensors otherwise; ``stats``
    reads all the tensors with one ``.tolist()`` (a single device sync per forward).
    """

    def __init__(self, config: Any) -> None:
        self.config = config
        self.flops = 0.0
        self.flop_terms: list[torch.Tensor] = []
        self.losses: dict[str, torch.Tensor] = {}
        self.weighted: list[torch.Tensor] = []
        self.reach: list[Number] = []
        self.loads: list[torch.Tensor] = []

    def add(self, flops: Number) -> None:
        """Add forward FLOPs (a number or a 0-dim tensor)."""
        if isinstance(flops, torch.Tensor):
            self.flop_terms.append(flops)
        else:
            self.flops += flops

    def router(self, spec: RouterSpec, tokens: Number) -> None:
        """Count one call of a (recursion or layer) router that scored ``tokens`` tokens."""
        self.add(spec.call_flops(self.config) * tokens)

    def head(self, rows: Number) -> None:
        """Count the output head on ``rows`` hidden states (``2·d·V`` each)."""
        c = self.config
        self.add(2.0 * c.d_model * c.vocab_size * rows)

    def add_loss(self, name: str, value: torch.Tensor, weight: float) -> None:
        self.losses[name] = self.losses.get(name, 0) + value.detach()
        self.weighted.append(weight * value)

    def layer(self, layer: Layer, h: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
              state: Any, shared_kv: Any) -> None:
        """Count a layer's mixer before it runs (the state is the one it reads)."""
        B, T = h.shape[:2]
        if mask is None and not layer.is_attention:
            self.flops += 2.0 * B * T * layer.mixer_matmul
            return
        if mask is None and shared_kv is None:  # from shapes, one op at most (a decoding step's case)
            self.flops += 2.0 * B * T * layer.mixer_matmul
            pairs: Number = B * T * (T + 1) // 2 + (0 if state is None else T * state.key_mask.sum())
            self.add(float(layer.spec.pair_flops(layer.mixer)) * pairs)
            return
        n = mask.sum(1) if mask is not None else torch.full((B,), T, device=h.device)
        self.add(2.0 * n.sum() * layer.mixer_matmul)
        if not layer.is_attention:
            return
        if shared_kv is not None:
            seen = shared_kv.pos[:, None, :] <= positions[:, :, None]
            seen = seen & shared_kv.key_mask[:, None, :]
            if mask is not None:
                seen = seen & mask[:, :, None]
            pairs = seen.sum()
        else:
            pairs = attention_pairs(n, None if state is None else state.key_mask.sum(1))
        self.add(float(layer.spec.pair_flops(layer.mixer)) * pairs)

    def decoding_step(self, layer: Layer, rows: int, cached: int, seen: Number | None = None) -> None:
        """Count an attention layer with a dense FFN (or none) decoding one token in each of ``rows``
        rows after ``cached`` keys, all visible: what :meth:`layer` and :meth:`ffn` count then.
        ``seen``: the (query, key) pairs of the step when the rows saw different numbers of keys
        (caches of different lengths in one batch: the keys each row holds, its new one included)."""
        pairs = rows * (1 + cached) if seen is None else seen
        self.flops += 2.0 * rows * (layer.mixer_matmul + layer.ffn_cost.token_params)
        self.add(float(layer.spec.pair_flops(layer.mixer)) * pairs)

    def ffn(self, layer: Layer, aux: dict[str, Any]) -> None:
        """Count a layer's FFN after it ran and collect an MoE's losses and load."""
        self.add(layer.ffn_cost.flops(aux["tokens"], aux))
        if "load" in aux:
            c = self.config
            self.add_loss("balance_loss", aux["balance_loss"], c.balance_loss_weight)
            self.add_loss("z_loss", aux["z_loss"], c.z_loss_weight)
            self.loads.append(aux["load"].detach())

    def aux_loss(self, like: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the auxiliary losses (a zero scalar on ``like``'s device if none)."""
        return sum(self.weighted, like.new_zeros(()))

    def stats(self, n_valid: Number) -> dict[str, Any]:
        """Floats for logging: flops, flops_per_token, reach, expert_load and the losses (none while
        ``torch.compile`` / ``torch.export`` trace: reading them would end the graph)."""
        if torch.compiler.is_compiling():
            return {}
        names = list(self.losses)
        values = [n_valid, *self.reach, *self.losses.values()]
        tensors = [(i, v) for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
        load = torch.stack(self.loads).float().mean(0) if self.loads else None
        loads: list[float] | None = None
        flops = self.flops
        if tensors or self.flop_terms or load is not None:  # the one sync of this forward
            parts = [v.detach().double().reshape(1) for _, v in tensors]
            if self.flop_terms:
                parts.append(torch.stack([t.double() for t in self.flop_terms]).sum().reshape(1))
            if load is not None:
                parts.append(load.double())
            read = torch.cat([p.to(parts[0].device) for p in parts]).tolist()
            for j, (i, _) in enumerate(tensors):
                values[i] = read[j]
            if self.flop_terms:
                flops += read[len(tensors)]
            loads = read[len(tensors) + bool(self.flop_terms):] if load is not None else None
        n = max(float(values[0]), 1.0)
        out: dict[str, Any] = {
            "flops": float(flops),
            "flops_per_token": 3.0 * flops / n,
            "reach": [float(r) / n for r in values[1:1 + len(self.reach)]],
        }
        if loads is not None:
            out["expert_load"] = loads
        out.update({k: float(v) for k, v in zip(names, values[1 + len(self.reach):])})
        return out


def flops_per_token(config: Any, prelude: list[Layer], core: list[Layer], coda: list[Layer],
                    routed: Collection[str], seq_len: int | None = None, *, training: bool = True,
                    reach: list[float] | None = None) -> float:
    """FLOPs per token of a LoopLM (``config`` and its layers; ``routed``: the names of its
    Mixture-of-Depths layers, ``prelude_i`` / ``core_j`` / ``coda_i``) on sequences of ``seq_len``
    (default max_seq_len).

    ``reach[r]``: fraction of tokens running recursion r; default the router's plan (all for
    ``none``, the keep fractions for expert_choice, a uniform depth for token_choice). MoE layers
    count ``top_k`` real experts per token (an upper bound with zero-computation experts).
    Attention pairs use the mean causal context ``(reach·T + 1)/2`` (the first recursion's
    context with ``kv_sharing``). Mixture-of-Depths layers run ``mod_capacity`` of the tokens
    (their attention among those). Halting counts every recursion and its router after each but
    the last (an upper bound). Training = 3 × forward.
    """
    c = config
    T = seq_len or c.max_seq_len
    router = ROUTERS[c.router]
    if reach is None:
        reach = router.reach(c)

    def layer_flops(layer: Layer, frac: float, ctx_frac: float) -> float:
        f = 2.0 * layer.mixer_matmul + 2.0 * layer.ffn_cost.token_params
        if layer.is_attention:
            f += float(layer.spec.pair_flops(layer.mixer)) * (ctx_frac * T + 1) / 2
        return frac * f

    layer_router = LAYER_ROUTERS[c.layer_router]
    kept = layer_router.reach(c)[0]
    cap = {name: kept if name in routed else 1.0
           for name in [f"prelude_{i}" for i in range(c.n_prelude)] + [f"core_{j}" for j in range(c.n_core)]
           + [f"coda_{i}" for i in range(c.n_coda)]}
    total = sum(layer_flops(b, cap[f"prelude_{i}"], cap[f"prelude_{i}"]) for i, b in enumerate(prelude))
    total += sum(layer_flops(b, cap[f"coda_{i}"], cap[f"coda_{i}"]) for i, b in enumerate(coda))
    scored = layer_router.flops_per_token(c)  # one routed layer's router, per token it scores
    for frac in reach:
        ctx = reach[0] if c.kv_sharing else frac
        caps = [cap[f"core_{j}"] for j in range(c.n_core)]
        total += sum(layer_flops(b, frac * k, ctx * k) for b, k in zip(core, caps))
        total += scored * frac * sum(f"core_{j}" in routed for j in range(c.n_core))
    total += scored * sum(not n.startswith("core") for n in routed)
    total += router.flops_per_token(c)
    total += 2.0 * c.d_model * c.vocab_size
    return 3.0 * total if training else total

