"""Sparse mixture-of-experts FFN with token-choice top-k routing (docs/mechanisms.md §3).

Switch Transformer (Fedus et al. 2021) balance loss, ST-MoE (Zoph et al. 2022) router z-loss,
a shared expert (DeepSeek-MoE, Dai et al. 2024) and zero-computation experts
(MoE++, Jin et al. 2024: zero -> 0, copy -> x, constant -> a1 x + a2 v).

Dispatch is dropless: the (token, expert) slots are sorted by expert, gathered once and cut
into per-expert slices with ``torch.split`` (one ``.tolist()`` sync; while torch.compile traces,
every expert runs on every token instead, unchosen ones with gate 0: no data-dependent shapes);
each SwiGLU expert runs one fused gate|up matmul and one down matmul on its slice, the gate
weight scales the hidden activations, and a gather by the inverse permutation sums each token's
k slots back. Dispatch and combine are hand-written as one small autograd Function so their
backward is also a gather (autograd's index_select backward is a scatter-add). ``split``
matters: slicing ``xs[a:b]`` per expert made autograd build E full-size zero gradients.
fwd+bwd, N=4096, d=256, hidden=192, E=8, k=2 on a loaded 2-core machine: 1.14x a dense SwiGLU
of the same active width on 1 thread
(was 1.34-1.46x); on 2 threads 1.7x (was 2.3-2.9x), the elementwise ops suffering most there.
torch 2.13's ``torch._grouped_mm`` runs on the CPU but was slower than this loop over experts
(0.90 s vs 0.65 s forward, 8192 slots, d=256, hidden=512, E=8) and has no CPU backward.

Low precision: ``w_in`` / ``w_out`` may be replaced by modules called as ``m(e, x [n, in]) ->
[n, out]`` (``looplm.quant``'s quantised experts), and ``expert_weight_fn`` (QAT's fake
quantisation) maps the stacked float weights before each forward: ``fn("w_in", W) -> W'``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from looplm.errors import ConfigError
from looplm.layers.ffn import SwiGLU, swiglu
from looplm.layers.linear import Linear

# an expert's projection: ``proj(e, x [n, in]) -> x W_e [n, out]``
Projection = Callable[[int, torch.Tensor], torch.Tensor]


def _gather_sum(x: torch.Tensor, idx: torch.Tensor, group: int) -> torch.Tensor:
    """Rows ``x[idx]`` summed in consecutive groups of ``group``: ``[len(idx) / group, d]``."""
    y = x.index_select(0, idx)
    return y if group == 1 else y.view(-1, group, x.shape[-1]).sum(1)


class _Regroup(torch.autograd.Function):
    """``_gather_sum(x, fwd, a)`` whose backward is ``_gather_sum(g, bwd, b)``: a gather, not
    the scatter-add autograd gives ``index_select``.

    With ``token`` (slot -> token, slots sorted by expert) and ``inv`` (token-major slot ->
    sorted position), the dispatch ``x[token]`` and the combine ``ys[inv]`` summed over each
    token's k slots are each other's transpose, so both directions are gathers (the scatter-add
    was the slowest op of the layer on 2 threads).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fwd: torch.Tensor, a: int, bwd: torch.Tensor,
                b: int) -> torch.Tensor:
        ctx.save_for_backward(bwd)
        ctx.group = b
        return _gather_sum(x, fwd, a)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        (bwd,) = ctx.saved_tensors
        return _gather_sum(g.contiguous(), bwd, ctx.group), None, None, None, None


class MoE(nn.Module):
    """Top-k MoE: ``forward(x [..., d]) -> (y [..., d], aux)``.

    Router logits ``z = x W_r`` over ``E = n_experts + zero + copy + constant`` experts,
    ``p = softmax(z)``, ``y = sum_{e in topk} p_e E_e(x)`` (``p`` renormalised over the k when
    ``renormalize``), plus the shared expert if any. ``aux``: ``balance_loss`` ``E sum_e f_e P_e``
    (f_e fraction of routed slots, P_e mean router probability; 1 at uniform load),
    ``z_loss`` ``mean(logsumexp(z)^2)``, ``load [E]`` = f (detached), in the order
    SwiGLU experts, zero, copy, constant.
    """

    def __init__(self, d_model: int, hidden: int, n_experts: int, top_k: int = 2, *,
                 renormalize: bool = False, shared_hidden: int = 0, zero_experts: int = 0,
                 copy_experts: int = 0, constant_experts: int = 0, router_dim: int = 0) -> None:
        super().__init__()
        counts = {"n_experts": n_experts, "zero_experts": zero_experts, "copy_experts": copy_experts,
                  "constant_experts": constant_experts, "shared_hidden": shared_hidden}
        for name, n in counts.items():
            if not isinstance(n, int) or n < 0:
                raise ConfigError(f"{name} must be a non-negative int, got {n!r}")
        if n_experts < 1:
            raise ConfigError(f"n_experts must be >= 1, got {n_experts}")
        self.n_experts = n_experts
        self.n_total = n_experts + zero_experts + copy_experts + constant_experts
        if not isinstance(top_k, int) or not 1 <= top_k <= self.n_total:
            raise ConfigError(f"top_k must be in 1..{self.n_total} (the number of experts incl. "
                              f"zero-computation ones), got {top_k!r}")
        self.top_k, self.renormalize = top_k, renormalize
        self.kinds = (zero_experts, copy_experts, constant_experts)
        self.router = Linear(d_model, self.n_total, bias=False)
        # RMoE (Qiu et al. 2024): z = x W_r + GRU(x P, r_prev) U, the GRU state carried across layers
        self.route_in = Linear(d_model, router_dim, bias=False) if router_dim else None
        self.gru = nn.GRUCell(router_dim, router_dim) if router_dim else None
        self.route_out = Linear(router_dim, self.n_total, bias=False) if router_dim else None
        bound_in, bound_out = 1 / math.sqrt(d_model), 1 / math.sqrt(hidden)
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, 2 * hidden).uniform_(-bound_in, bound_in))
        self.w_out = nn.Parameter(torch.empty(n_experts, hidden, d_model).uniform_(-bound_out, bound_out))
        if constant_experts:
            self.const_v = nn.Parameter(torch.randn(constant_experts, d_model) * bound_in)
            self.const_w = nn.Parameter(torch.zeros(constant_experts, d_model, 2))
        self.shared = SwiGLU(d_model, shared_hidden) if shared_hidden else None
        self.expert_weight_fn: Callable[[str, torch.Tensor], torch.Tensor] | None = None

    def _projections(self) -> tuple[Projection, Projection]:
        """``(proj_in, proj_out)``: ``proj(e, x [n, in]) -> x W_e [n, out]`` for the experts'
        fused gate|up and down matrices, float or quantised."""
        if not isinstance(self.w_in, torch.Tensor):  # quantised experts: modules m(e, x)
            return self.w_in, self.w_out
        w_in: torch.Tensor = self.w_in
        w_out: torch.Tensor = self.w_out
        if self.expert_weight_fn is not None:
            w_in, w_out = self.expert_weight_fn("w_in", w_in), self.expert_weight_fn("w_out", w_out)
        # unbind once: indexing the stacked parameter per expert would make E full-size grads
        ins, outs = w_in.unbind(0), w_out.unbind(0)
        return (lambda e, x: x @ ins[e]), (lambda e, x: x @ outs[e])

    def _expert(self, e: int, x: torch.Tensor, w: torch.Tensor, proj_in: Projection,
                proj_out: Projection) -> torch.Tensor | None:
        """Gate-weighted output ``w [n] * E_e(x)`` of expert ``e`` on its tokens ``x [n, d]``;
        None for a zero expert."""
        if e < self.n_experts:
            return proj_out(e, swiglu(proj_in(e, x), w))
        e -= self.n_experts
        zero, copy, _ = self.kinds
        if e < zero:
            return None
        if e < zero + copy:
            return x * w[:, None]
        c = e - zero - copy
        a = (x @ self.const_w[c]).softmax(-1) * w[:, None]
        return a[:, :1] * x + a[:, 1:] * self.const_v[c]

    def _idle_zero(self, sizes: list[int]) -> torch.Tensor | None:
        """``0 · Σ`` the trainable parameters no token used in this forward (all experts of a kind
        idle: no SwiGLU expert, no constant expert): every parameter then takes part in the
        backward (a zero gradient), as DistributedDataParallel requires of each step."""
        idle = []
        if not any(sizes[:self.n_experts]):
            idle += [w for w in (self.w_in, self.w_out) if isinstance(w, torch.Tensor)]
        if self.kinds[2] and not any(sizes[self.n_total - self.kinds[2]:]):
            idle += [self.const_v, self.const_w]
        idle = [p for p in idle if p.requires_grad]
        return torch.stack([p.sum() for p in idle]).sum() * 0.0 if idle else None

    def _dispatch(self, x: torch.Tensor, weight: torch.Tensor, flat: torch.Tensor, sizes: list[int],
                  proj_in: Projection, proj_out: Projection) -> torch.Tensor:
        """Each expert on its own tokens: slots sorted by expert ``flat [N*k]``, ``sizes [E]``
        slots per expert, combined back per token; -> ``[N, d]``."""
        k = self.top_k
        order = flat.argsort(stable=True)
        token = order // k  # token of each slot, slots grouped by expert
        inv = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=x.device))
        # torch's autograd Function.apply is untyped
        xs = _Regroup.apply(x, token, 1, inv, k)  # type: ignore[no-untyped-call]
        slot_w = weight.flatten()[order].to(x.dtype)
        outs = []
        for e, (x_e, w_e) in enumerate(zip(xs.split(sizes), slot_w.split(sizes))):
            if sizes[e]:
                y_e = self._expert(e, x_e, w_e, proj_in, proj_out)
                outs.append(x_e.new_zeros(x_e.shape) if y_e is None else y_e)
        if x.shape[0]:
            # torch's autograd Function.apply is untyped
            y = _Regroup.apply(torch.cat(outs), inv, k, token, 1)  # type: ignore[no-untyped-call]
        else:
            y = x.new_zeros(x.shape)
        idle = self._idle_zero(sizes) if torch.is_grad_enabled() else None
        return y if idle is None else y + idle

    def every_expert(self, x: torch.Tensor, weight: torch.Tensor, expert: torch.Tensor, proj_in: Projection,
                     proj_out: Projection) -> torch.Tensor:
        """The same sum with every expert run on every token of ``x [N, d]``, its gate weight 0
        where the token did not choose it (``weight, expert [N, k]``): shapes do not depend on the
        routing (what torch.compile traces), at E/k times the expert FLOPs; every parameter takes part."""
        gates = weight.new_zeros(x.shape[0], self.n_total).scatter_add_(1, expert, weight).to(x.dtype)
        y = x.new_zeros(x.shape)
        for e in range(self.n_total):
            y_e = self._expert(e, x, gates[:, e], proj_in, proj_out)
            if y_e is not None:
                y = y + y_e
        return y

    def forward(self, x: torch.Tensor,
                route: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``route [N, g]``: a recurrent router's incoming hidden state (zeros if None); its new
        state is ``aux["route"]``."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        N, k, E = x.shape[0], self.top_k, self.n_total
        z = self.router(x).float()
        if self.gru is not None and self.route_in is not None and self.route_out is not None:
            route = x.new_zeros(N, self.gru.hidden_size) if route is None else route.reshape(N, -1)
            route = self.gru(self.route_in(x), route)
            z = z + self.route_out(route).float()
        p = z.softmax(-1)
        weight, expert = p.topk(k, dim=-1)  # [N, k]
        if self.renormalize:
            weight = weight / weight.sum(-1, keepdim=True)
        flat = expert.flatten()
        counts = torch.zeros(E, dtype=torch.long, device=x.device).index_add_(0, flat, torch.ones_like(flat))
        proj_in, proj_out = self._projections()
        if torch.compiler.is_compiling():  # no data-dependent shapes: a graph without breaks
            y = self.every_expert(x, weight, expert, proj_in, proj_out)
        else:
            y = self._dispatch(x, weight, flat, counts.tolist(), proj_in, proj_out)
        if self.shared is not None:
            y = y + self.shared(x)[0]
        if N == 0:  # e.g. no token left at this recursion
            zero = z.sum()
            aux = {"balance_loss": zero, "z_loss": zero, "load": p.new_zeros(E)}
            return y.reshape(shape), aux if route is None else {**aux, "route": route}
        load = counts.to(p.dtype) / (N * k)
        aux = {
            "balance_loss": E * (load * p.mean(0)).sum(),
            "z_loss": torch.logsumexp(z, -1).square().mean(),
            "load": load,
        }
        if route is not None:
            aux["route"] = route
        return y.reshape(shape), aux
