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
    """Intra-chunk WY/UT terms, vectorised over all chunks.

    Inputs ``q, k [B, H, N, C, dk]`` (q already scaled), ``v [B, H, N, C, dv]``, ``beta, g
    [B, H, N, C]`` (g may be None). With ``b`` the in-chunk cumulative log-decay, ``D_ts =
    exp(b_t - b_s)`` for ``s <= t`` (built in log space, so strong decays only underflow) and
    ``A = I + tril(Diag(beta) (K K^T ⊙ D), -1)``, the values written to the state are
    ``delta = U - W S_0`` with ``[U | W] = A^{-1} [Diag(beta) V | Diag(beta e^b) K]``. Returns

    - ``R [.., C, dk]`` and ``PU [.., C, dv]``: chunk output ``O = R S_0 + PU`` where
      ``P = Q K^T ⊙ D`` and ``R = Q ⊙ e^b - P W``;
    - ``M [.., dk, dk]`` and ``KU [.., dk, dv]``: chunk end state ``S_C = M S_0 + KU`` where
      ``K' = K ⊙ e^{b_C - b}``, ``M = e^{b_C} I - K'^T W`` and ``KU = K'^T U``.
    """
    c, dk, dv = q.shape[-2], q.shape[-1], v.shape[-1]
    p, kk = (torch.cat((q, k), dim=-2) @ k.transpose(-1, -2)).split(c, dim=-2)  # Q K^T, K K^T
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    eye = torch.eye(dk, dtype=q.dtype, device=q.device)
    if g is None:
        p = p.masked_fill(~causal, 0.0)
        rhs_k = k * beta[..., None]
        k_end, q_dec, m_diag = k, q, eye
    else:
        b = g.cumsum(-1)  # [.., C]
        d = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp()
        p, kk = p * d, kk * d
        eb = b.exp()[..., None]
        rhs_k = k * (beta[..., None] * eb)
        k_end = k * (b[..., -1:] - b).exp()[..., None]
        q_dec = q * eb
        m_diag = eb[..., -1:, :] * eye  # [.., dk, dk]: e^{b_C} I
    a = kk * beta[..., None]  # only the strict lower triangle is read: unitriangular solve
    rhs = torch.cat((v * beta[..., None], rhs_k), dim=-1)  # [.., C, dv + dk]
    uw = torch.linalg.solve_triangular(a, rhs, upper=False, unitriangular=True)
    puw = p @ uw
    pu, pw = puw.split((dv, dk), dim=-1)
    kuw = k_end.transpose(-1, -2) @ uw  # [.., dk, dv + dk]
    ku, kw = kuw.split((dv, dk), dim=-1)
    return q_dec - pw, pu, m_diag - kw, ku


def _chunk_layout(x: torch.Tensor, n: int, c: int) -> torch.Tensor:
    """``[B, N*C, H, *]`` -> ``[B, H, N, C, *]``."""
    x = x.transpose(1, 2)
    return x.reshape(x.shape[0], x.shape[1], n, c, *x.shape[3:])


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
    dv]`` -> ``(o [B, T, H, dv], final_state [B, H, dk, dv])``. All intra-chunk work (see
    :func:`_chunk_terms`) is batched over chunks; the loop only carries the state,
    ``S_{i+1} = M_i S_i + KU_i`` (one ``baddbmm`` per chunk), and the outputs ``O_i = R_i S_i +
    PU_i`` are formed for all chunks at once afterwards. The tail is padded with identity
    tokens (``k = v = beta = g = 0``). Computes in float32 at least.
    """
    _check_args(q, k, v, beta, g, initial_state, "initial_state", step=False)
    check_chunk_size(chunk_size)
    scale = _check_scale(scale, q.shape[-1])
    bsz, t, h, dk = q.shape
    dv = v.shape[-1]
    out_dtype = q.dtype
    cdt = torch.promote_types(q.dtype, torch.float32)
    c = max(1, min(chunk_size, t))
    n = -(-t // c) if t else 0
    pad = n * c - t
    q, k, v, beta = (x.to(cdt) for x in (q * scale, k, v, beta))
    g = None if g is None else g.to(cdt)
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        beta = F.pad(beta, (0, 0, 0, pad))
        g = None if g is None else F.pad(g, (0, 0, 0, pad))
    state = initial_state
    state = q.new_zeros(bsz, h, dk, dv) if state is None else state.to(cdt)
    if n == 0:
        return v.to(out_dtype), state.to(out_dtype)
    r, pu, m, ku = _chunk_terms(
        *(_chunk_layout(x, n, c) for x in (q, k, v)),
        _chunk_layout(beta, n, c),
        None if g is None else _chunk_layout(g, n, c),
    )
    if n == 1:
        states = state[:, :, None]
        state = (m[:, :, 0] @ state + ku[:, :, 0])
    else:
        # chunk-major, heads flattened: each step is one contiguous batched matmul
        m = m.permute(2, 0, 1, 3, 4).reshape(n, bsz * h, dk, dk)
        ku = ku.permute(2, 0, 1, 3, 4).reshape(n, bsz * h, dk, dv)
        s = state.reshape(bsz * h, dk, dv)
        seen = []
        for m_i, ku_i in zip(m.unbind(0), ku.unbind(0)):  # unbind: its backward is one stack
            seen.append(s)
            s = torch.baddbmm(ku_i, m_i, s)
        states = torch.stack(seen, dim=1).view(bsz, h, n, dk, dv)
        state = s.view(bsz, h, dk, dv)
    o = r @ states + pu  # [B, H, N, C, dv]
    o = o.reshape(bsz, h, n * c, dv)[:, :, :t].transpose(1, 2)
    return o.to(out_dtype), state.to(out_dtype)


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
