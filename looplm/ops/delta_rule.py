"""The delta rule: DeltaNet and gated DeltaNet, in step, recurrent, parallel and chunk forms.

Update per head (row vectors, state ``S [dk, dv]``, MECHANISMS.md §1)::

    S_t = a_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,    o_t = scale * q_t S_t

with ``a_t = exp(g_t)``; ``g = None`` gives DeltaNet (Schlag et al. 2021; Yang et al. 2024,
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length"), a log-decay
``g [B, T, H] <= 0`` gives gated DeltaNet (Yang, Kautz, Hatamizadeh 2025). Keys are expected
L2-normalised by the caller. ``beta = k = g = 0`` is an exact identity update (padding,
skipped tokens).

The chunk form uses the WY/UT representation (Yang et al. 2024) with the gate decays kept in
log space inside a chunk. Hand-written because no installed library offers it on the CPU;
transformers' Qwen3-Next fallback is slower and not linear in T under autograd (its per-chunk
in-place writes make the backward copy the whole output every chunk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from looplm.ops.checks import check_chunk_size, check_like, check_qkv

__all__ = ["delta_step", "delta_recurrent", "delta_parallel", "delta_chunk"]


def _check_scale(scale: float | None, dk: int) -> float:
    if scale is None:
        return dk**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def _check_args(q, k, v, beta, g, state, state_name: str, step: bool) -> None:
    check_qkv(q, k, v, step=step)
    lead = tuple(q.shape[:-1])  # [B, T, H] or [B, H]
    check_like("beta", beta, lead, q)
    if beta is None:
        raise TypeError("beta must be a tensor of shape " + str(lead) + ", got None")
    check_like("g", g, lead, q)
    b, h = q.shape[0], q.shape[-2]
    check_like(state_name, state, (b, h, q.shape[-1], v.shape[-1]), q)


def delta_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: ``q, k [B, H, dk]``, ``v [B, H, dv]``, ``beta, g [B, H]``, ``state [B, H, dk, dv]``.

    Returns ``(o [B, H, dv], new_state [B, H, dk, dv])``; ``state=None`` means zeros.
    """
    _check_args(q, k, v, beta, g, state, "state", step=True)
    scale = _check_scale(scale, q.shape[-1])
    if state is None:
        state = q.new_zeros(*q.shape, v.shape[-1])
    if g is not None:
        state = state * g.exp()[..., None, None]
    # S' = aS + beta k^T (v - k aS): the delta rule's correction of what the state predicts for k
    delta = beta[..., None] * (v - torch.einsum("bhk,bhkv->bhv", k, state))
    state = state + k[..., :, None] * delta[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", q * scale, state)
    return o, state


def delta_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: :func:`delta_step` over time. ``q, k [B, T, H, dk]``, ``v [B, T, H, dv]``,
    ``beta, g [B, T, H]`` -> ``(o [B, T, H, dv], final_state [B, H, dk, dv])``."""
    _check_args(q, k, v, beta, g, initial_state, "initial_state", step=False)
    state = initial_state
    if state is None:
        state = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    outs = []
    for t in range(q.shape[1]):
        o, state = delta_step(
            q[:, t], k[:, t], v[:, t], beta[:, t], None if g is None else g[:, t], scale=scale, state=state
        )
        outs.append(o)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)
    return o, state


def _chunk_terms(q, k, v, beta, g):
    """Intra-chunk WY/UT terms, vectorised over all chunks and heads ``[N*B*H, C, *]``.

    Inputs ``q, k [.., C, dk]`` (q already scaled), ``v [.., C, dv]``, ``beta, g [.., C]`` (g may
    be None). With ``b`` the in-chunk cumulative log-decay and ``D_ts = exp(b_t - b_s)`` for
    ``s <= t`` (built in log space, so strong decays only underflow), a chunk starting from state
    ``S`` writes ``delta = U - W S`` where ``A = I + tril(Diag(beta) (K K^T ⊙ D), -1)`` and
    ``[U | W] = A^{-1} [Diag(beta) V | Diag(beta e^b) K]`` (one batched triangular solve). Returns
    ``P = Q K^T ⊙ D``, ``Q' = Q ⊙ e^b``, ``U``, ``W``, ``K' = K ⊙ e^{b_C - b}`` and ``d = e^{b_C}
    [.., 1, 1]`` (None when ungated): the chunk's output is ``Q' S + P delta`` and its end state
    ``d S + K'^T delta``.
    """
    c, dk, dv = q.shape[-2], q.shape[-1], v.shape[-1]
    kt = k.transpose(-1, -2)
    p, kk = torch.bmm(q, kt), torch.bmm(k, kt)  # 3-D bmm: ~2x faster than 5-D matmul here
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    beta = beta[..., None]
    if g is None:
        p = p.masked_fill(~causal, 0.0)
        rhs_k, k_end, q_dec, decay = k * beta, k, q, None
    else:
        b = g.cumsum(-1)  # [.., C]
        d = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp()
        p, kk = p * d, kk * d
        eb = b.exp()[..., None]
        rhs_k, q_dec = k * (beta * eb), q * eb
        k_end = k * (b[..., -1:] - b).exp()[..., None]
        decay = eb[..., -1:, :]
    # only the strict lower triangle of kk * beta is read (unitriangular solve), also by its backward
    uw = torch.linalg.solve_triangular(kk * beta, torch.cat((v * beta, rhs_k), dim=-1), upper=False,
                                       unitriangular=True)
    u, w = uw.split((dv, dk), dim=-1)
    return p, q_dec, u, w, k_end, decay


class _StateScan(torch.autograd.Function):
    """The loop over chunks: ``delta_i = U_i - W_i S_i``, ``S_{i+1} = d_i S_i + E_i delta_i``.

    Inputs ``U [N, G, C, dv]``, ``W [N, G, C, dk]``, ``E [N, G, dk, C]`` (``K'^T``), ``d [N, G, 1,
    1]`` or None, ``S_0 [G, dk, dv]``; outputs the states entering each chunk ``[N, G, dk, dv]``,
    ``delta [N, G, C, dv]`` and the final state. Hand-written backward: the reverse loop keeps
    two ``baddbmm`` per chunk and the weight gradients are batched over all chunks afterwards;
    autograd of the loop was measured ~1.5x slower (about 5 ops per chunk more).
    """

    @staticmethod
    def forward(ctx, u, w, e, decay, s0):
        n = u.shape[0]
        states = u.new_empty(n + 1, *s0.shape)
        delta = torch.empty_like(u)
        states[0] = s0
        for i in range(n):
            torch.baddbmm(u[i], w[i], states[i], alpha=-1, out=delta[i])
            prev = states[i] if decay is None else states[i] * decay[i]
            torch.baddbmm(prev, e[i], delta[i], out=states[i + 1])
        ctx.save_for_backward(w, e, decay, states, delta)
        return states[:n], delta, states[n].clone()

    @staticmethod
    def backward(ctx, g_states, g_delta, g_final):
        w, e, decay, states, delta = ctx.saved_tensors
        n = w.shape[0]
        g_states = torch.zeros_like(states[:n]) if g_states is None else g_states
        g_delta = torch.zeros_like(delta) if g_delta is None else g_delta
        g_s = torch.zeros_like(states[n]) if g_final is None else g_final
        g_next = torch.empty_like(states[1:])  # grad of the state leaving chunk i
        g_dtot = torch.empty_like(delta)  # total grad of delta_i
        for i in reversed(range(n)):
            g_next[i] = g_s
            torch.baddbmm(g_delta[i], e[i].transpose(-1, -2), g_s, out=g_dtot[i])
            carry = g_s if decay is None else g_s * decay[i]
            g_s = torch.baddbmm(carry + g_states[i], w[i].transpose(-1, -2), g_dtot[i], alpha=-1)
        s_in = states[:n]
        g_w = -(g_dtot @ s_in.transpose(-1, -2))
        g_e = g_next @ delta.transpose(-1, -2)
        g_decay = None if decay is None else (g_next * s_in).sum((-2, -1), keepdim=True)
        return g_dtot, g_w, g_e, g_decay, g_s


def _chunk_layout(x: torch.Tensor, n: int, c: int) -> torch.Tensor:
    """``[B, N*C, H, *]`` -> chunk-major ``[N*B*H, C, *]``, contiguous."""
    x = x.reshape(x.shape[0], n, c, *x.shape[2:]).movedim(1, 0)  # [N, B, C, H, *]
    return x.transpose(2, 3).reshape(-1, c, *x.shape[4:])


def delta_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel delta rule (training, prefill): O(T C d) work, a loop over T/C chunks.

    ``q, k [B, T, H, dk]``, ``v [B, T, H, dv]``, ``beta, g [B, T, H]``, ``initial_state [B, H, dk,
    dv]`` -> ``(o [B, T, H, dv], final_state [B, H, dk, dv])``. The intra-chunk terms (see
    :func:`_chunk_terms`) are batched over all chunks; the loop (:class:`_StateScan`) only carries
    the state, two ``baddbmm`` per chunk; the outputs ``O_i = Q'_i S_i + P_i delta_i`` are then
    formed for all chunks at once. The tail is padded with identity tokens (``k = v = beta = g =
    0``). Computes in float32 at least.
    """
    _check_args(q, k, v, beta, g, initial_state, "initial_state", step=False)
    check_chunk_size(chunk_size)
    scale = _check_scale(scale, q.shape[-1])
    bsz, t, h, dk = q.shape
    dv = v.shape[-1]
    out_dtype = q.dtype
    cdt = torch.promote_types(q.dtype, torch.float32)
    state = initial_state
    state = q.new_zeros(bsz, h, dk, dv, dtype=cdt) if state is None else state.to(cdt)
    if t == 0:
        return v.clone(), state.to(out_dtype)
    c = min(chunk_size, t)
    n = -(-t // c)
    pad = n * c - t
    q, k, v, beta = (x.to(cdt) for x in (q * scale, k, v, beta))
    g = None if g is None else g.to(cdt)
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        beta = F.pad(beta, (0, 0, 0, pad))
        g = None if g is None else F.pad(g, (0, 0, 0, pad))
    p, q_dec, u, w, k_end, decay = _chunk_terms(
        *(_chunk_layout(x, n, c) for x in (q, k, v, beta)), None if g is None else _chunk_layout(g, n, c)
    )
    groups = bsz * h  # the scan sees [N, B*H, ...]
    states, delta, state = _StateScan.apply(
        u.reshape(n, groups, c, dv),
        w.reshape(n, groups, c, dk),
        k_end.reshape(n, groups, c, dk).transpose(-1, -2),
        None if decay is None else decay.reshape(n, groups, 1, 1),
        state.reshape(groups, dk, dv),
    )
    o = torch.baddbmm(torch.bmm(p, delta.view(-1, c, dv)), q_dec, states.view(-1, dk, dv))
    o = o.view(n, bsz, h, c, dv).permute(1, 0, 3, 2, 4).reshape(bsz, n * c, h, dv)[:, :t]
    return o.to(out_dtype), state.view(bsz, h, dk, dv).to(out_dtype)


def delta_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """O(T^2) form: the WY/UT solve over the whole sequence as one chunk (no state loop).

    Same shapes as :func:`delta_chunk`; a second reference for short sequences.
    """
    return delta_chunk(
        q, k, v, beta, g, scale=scale, initial_state=initial_state, chunk_size=max(1, q.shape[1])
    )
