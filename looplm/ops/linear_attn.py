"""Decay-family fixed-state token mixers: linear attention, retention, scalar-gated, GLA.

One recurrence covers them all (docs/mechanisms.md §1.1). Per head, with ``S ∈ [dk, dv]``::

    S_t = Diag(exp(g_t)) S_{t-1} + k_tᵀ v_t        o_t = (scale · q_t) S_t

The log-decay ``g ≤ 0`` selects the mixer:

- ``g=None``: linear attention (Katharopoulos et al. 2020);
- ``g [B,T,H]``, one decay per head and step: retention with a constant ``γ_h`` (RetNet, Sun et al.
  2023; Lightning Attention-2, Qin et al. 2024) or data-dependent scalar gates (Mamba-2, Dao & Gu 2024);
- ``g [B,T,H,dk]``, a gate over the key dim: GLA (Yang et al. 2024).

Forms (``docs/architecture.md``, "Ops"): :func:`decay_step` (one token, decoding),
:func:`decay_recurrent` (loop of steps, the reference), :func:`decay_parallel` (O(T²) masked form,
a second reference) and :func:`decay_chunk` (chunkwise-parallel, training and prefill). All take
``initial_state`` and return ``(o [B,T,H,dv], final_state [B,H,dk,dv])``.

``g`` must be finite, ≤ 0 and of ``q``'s dtype; cumulative sums of it are taken in at least float32.
Decay exponents are only ever taken of non-positive numbers, so strong decays underflow to 0
instead of overflowing (see :func:`decay_chunk`). A token with ``k = 0`` and ``g = 0`` leaves the
state unchanged (bit-exact in the step form, up to rounding in the others): padding and tokens a
recursion router skipped need no mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from looplm.ops.checks import check_chunk_size, check_like, check_qkv

# decay_chunk works through long inputs in segments of about this many tokens (cache-sized working
# set; chosen by measurement on the CPU).
SEGMENT = 1024


def retention_log_decay(n_heads: int) -> torch.Tensor:
    """RetNet's fixed per-head log-decay ``log γ_h``, ``γ_h = 1 − 2^(−5−h)``: ``[n_heads]`` float32.

    Broadcast it to ``g [B,T,H]`` to run retention (Sun et al. 2023) with the ``decay_*`` forms.
    """
    if not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"n_heads must be a positive int, got {n_heads!r}")
    h = torch.arange(n_heads, dtype=torch.float64)
    return torch.log1p(-(2.0 ** (-5.0 - h))).float()


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
           state: torch.Tensor | None, *, step: bool) -> None:
    check_qkv(q, k, v, step=step)
    if g is not None:
        lead = q.shape[:-1]  # [B,H] or [B,T,H]
        if not isinstance(g, torch.Tensor) or tuple(g.shape) not in (tuple(lead), tuple(q.shape)):
            got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(
                f"g must be None, {tuple(lead)} (one log-decay per head) or {tuple(q.shape)} "
                f"(per key dim), got {got}"
            )
        check_like("g", g, tuple(g.shape), q)
    B, H, dk, dv = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    check_like("state" if step else "initial_state", state, (B, H, dk, dv), q)


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def decay_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    state: torch.Tensor | None,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: ``q, k [B,H,dk]``, ``v [B,H,dv]``, ``g None | [B,H] | [B,H,dk]``, ``state [B,H,dk,dv]``.

    Returns ``(o [B,H,dv], state [B,H,dk,dv])``; ``state=None`` means zeros.
    """
    _check(q, k, v, g, state, step=True)
    if state is None:
        state = q.new_zeros(*q.shape, v.shape[-1])
    if g is not None:
        a = g.exp()
        state = state * (a[..., None, None] if a.dim() == 2 else a[..., None])
    state = state + k[..., :, None] * v[..., None, :]
    o = ((q * _scale(q, scale))[..., None, :] @ state).squeeze(-2)
    return o, state


def decay_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: :func:`decay_step` over time. ``q, k [B,T,H,dk]``, ``v [B,T,H,dv]``, ``g`` as above.

    Returns ``(o [B,T,H,dv], final_state [B,H,dk,dv])``.
    """
    _check(q, k, v, g, initial_state, step=False)
    state, outs = initial_state, []
    for t in range(q.shape[1]):
        o, state = decay_step(q[:, t], k[:, t], v[:, t], None if g is None else g[:, t], state, scale=scale)
        outs.append(o)
    if state is None:  # T = 0
        state = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[-1])
    return torch.stack(outs, 1) if outs else v.new_zeros(v.shape), state


def _gate_cumsum(g: torch.Tensor, dim: int) -> torch.Tensor:
    """Cumulative log-decay along ``dim``, accumulated in at least float32."""
    return g.to(torch.promote_types(g.dtype, torch.float32)).cumsum(dim)


def _causal_log_decay(b: torch.Tensor, dim: int) -> torch.Tensor:
    """``D[..., i, j] = b_i - b_j`` for ``j ≤ i`` and ``-inf`` above the diagonal.

    ``b`` has its time axis at ``dim`` (-1 for scalar gates, -2 for per-dim gates, where ``D`` gets
    shape ``[..., i, j, dk]``). ``exp(D)`` is then the causal decay between positions, never > 1.
    """
    n = b.shape[dim]
    mask = torch.ones(n, n, dtype=torch.bool, device=b.device).tril()
    if dim == -1:
        d = b[..., :, None] - b[..., None, :]
    else:
        d, mask = b[..., :, None, :] - b[..., None, :, :], mask[..., None]
    return d.masked_fill(~mask, -math.inf)


def decay_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """O(T²) masked form ``O = (Q Kᵀ ⊙ D) V + (Q ⊙ e^b) S_0``; decays in log space.

    Memory is O(T²) (O(T² dk) for a per-dim ``g``): a second reference and a form for short T.
    Shapes as :func:`decay_recurrent`.
    """
    _check(q, k, v, g, initial_state, step=False)
    if q.shape[1] == 0:
        return decay_recurrent(q, k, v, g, scale=scale, initial_state=initial_state)
    qh, kh, vh = (x.transpose(1, 2) for x in (q * _scale(q, scale), k, v))  # [B,H,T,*]
    if g is None:
        a = (qh @ kh.transpose(-1, -2)).tril()
        q_in, k_out, a_all = qh, kh, None
    elif g.dim() == 3:
        b = _gate_cumsum(g.transpose(1, 2), -1)  # [B,H,T]
        a = (qh @ kh.transpose(-1, -2)) * _causal_log_decay(b, -1).exp().to(q.dtype)
        q_in = qh * b.exp().to(q.dtype)[..., None]
        k_out = kh * (b[..., -1:] - b).exp().to(q.dtype)[..., None]
        a_all = b[..., -1].exp().to(q.dtype)[..., None, None]
    else:
        b = _gate_cumsum(g.transpose(1, 2), -2)  # [B,H,T,dk]
        e = _causal_log_decay(b, -2).exp().to(q.dtype)  # [B,H,T,T,dk]
        a = torch.einsum("bhid,bhjd,bhijd->bhij", qh, kh, e)
        q_in = qh * b.exp().to(q.dtype)
        k_out = kh * (b[..., -1:, :] - b).exp().to(q.dtype)
        a_all = b[..., -1, :].exp().to(q.dtype)[..., None]
    o = a @ vh
    final = k_out.transpose(-1, -2) @ vh
    if initial_state is not None:
        o = o + q_in @ initial_state
        final = final + (initial_state if a_all is None else a_all * initial_state)
    return o.transpose(1, 2), final


def _to_chunks(x: torch.Tensor, C: int, N: int) -> torch.Tensor:
    """``[B,T,H,*] -> [B,H,N,C,*]``, zero-padding time to ``N*C`` (zero k and g: identity updates)."""
    pad = N * C - x.shape[1]
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    x = x.transpose(1, 2)
    return x.reshape(x.shape[0], x.shape[1], N, C, *x.shape[3:])


def _state_scan(
    a: torch.Tensor | None, u: torch.Tensor, s0: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inter-chunk recurrence ``S_n = a_n ⊙ S_{n-1} + u_n``; ``u [B,H,N,dk,dv]``, ``a [B,H,N,1|dk,1]``.

    Returns the state before each chunk ``[B,H,N,dk,dv]`` and the final state ``[B,H,dk,dv]``.
    A short loop over chunks (N = T / chunk_size), not over time.
    """
    if s0 is None:
        s0 = u.new_zeros(u.shape[:2] + u.shape[3:])
    if a is None:  # no decay: an exclusive prefix sum
        c = u.cumsum(2)
        return s0[:, :, None] + F.pad(c[:, :, :-1], (0, 0, 0, 0, 1, 0)), s0 + c[:, :, -1]
    states, s = [], s0
    for a_n, u_n in zip(a.unbind(2), u.unbind(2)):  # unbind: its backward is one stack, not N copies
        states.append(s)
        s = a_n * s + u_n
    return torch.stack(states, 2), s


def _gla_intra(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intra-chunk GLA output ``o_i = Σ_{j≤i} Σ_d q_id k_jd e^{b_id - b_jd} v_j`` for chunks of length C.

    ``q, k, b [..., C, dk]`` (``b`` the in-chunk cumulative log-decay), ``v [..., C, dv]`` ->
    ``[..., C, dv]``. A per-dim decay cannot be a [C, C] mask on ``Q Kᵀ``, and the usual
    factorisation ``(q e^{b})(k e^{-b})ᵀ`` overflows for strong decays. So the chunk is halved
    recursively (a secondary chunking, as in GLA, Yang et al. 2024):

    - second half reading the first: both halves share the reference ``r``, the cumulative decay at
      the end of the first half; ``e^{b_i - r}`` and ``e^{r - b_j}`` are ≤ 1, so one plain matmul is
      exact and cannot overflow;
    - each half reading itself: the same split again, down to single tokens (``q_i·k_i v_i``), or an
      odd length, where the decay matrix ``[c, c, dk]`` is computed exactly in log space.

    Hand-written because no PyTorch op computes this. Cost per token ≈ ``3·dk·log2(C)`` elementwise
    plus matmuls; on the CPU this beat a log-space ``[c, c, dk]`` tensor at any c ≥ 2 (measured).
    """
    C = q.shape[-2]
    if C == 1:
        return (q * k).sum(-1, keepdim=True) * v
    if C % 2:  # odd length: exact log-space decay matrix
        e = _causal_log_decay(b, -2).exp().to(q.dtype)  # [..., C, C, dk]
        return (q[..., :, None, :] * e * k[..., None, :, :]).sum(-1) @ v
    h = C // 2
    halves = [x.unflatten(-2, (2, h)) for x in (q, k, v, b)]  # [..., 2, h, *]
    o = _gla_intra(*halves)  # each half reading itself
    (q1, q2), (k1, k2), (v1, _), (b1, b2) = (x.unbind(-3) for x in halves)  # unbind: no zero-filled grads
    r = b1[..., -1:, :]  # [..., 1, dk]
    q2 = q2 * (b2 - r).exp().to(q.dtype)
    k1 = k1 * (r - b1).exp().to(q.dtype)
    o1, o2 = o.unbind(-3)
    return torch.cat((o1, o2 + (q2 @ k1.transpose(-1, -2)) @ v1), -2)


def decay_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel form (training, prefill): linear in T. Shapes as :func:`decay_recurrent`.

    Time is split into chunks of ``chunk_size``; all chunks' intra-chunk terms are computed at once
    (batched over ``[B,H,N,C,*]``) and the state is carried between chunks by a short loop over the
    N chunks (docs/mechanisms.md §1.2). Cumulative log-decays ``b`` are kept per chunk, so
    only ``e^{b}``, ``e^{b_C - b}`` and the causal in-chunk decays ``e^{b_i - b_j}`` (all ≤ 1) are
    ever computed: strong decays underflow to 0, never overflow.

    Long inputs are processed in segments of about ``SEGMENT`` tokens, passing the state, so that
    each op's working set stays in cache: tokens/s then does not fall as T grows.
    """
    _check(q, k, v, g, initial_state, step=False)
    check_chunk_size(chunk_size)
    T = q.shape[1]
    if T == 0:
        return decay_recurrent(q, k, v, g, scale=scale, initial_state=initial_state)
    C = min(chunk_size, -(-T // 16) * 16)  # short inputs: one chunk, little padding
    seg = max(SEGMENT // C, 1) * C
    if T <= seg:
        return _chunk_core(q * _scale(q, scale), k, v, g, initial_state, C)
    outs: list[torch.Tensor] = []
    state = initial_state
    pieces = (x.split(seg, dim=1) for x in (q * _scale(q, scale), k, v))
    gs = [None] * -(-T // seg) if g is None else g.split(seg, dim=1)
    for qs, ks, vs, g_s in zip(*pieces, gs):
        o, s = _chunk_core(qs, ks, vs, g_s, state, C)
        outs.append(o)
        state = s
    return torch.cat(outs, 1), s


def _chunk_core(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, s0: torch.Tensor | None, C: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decay_chunk` on one segment, ``q`` already scaled, chunk length ``C``."""
    B, T, H, _ = q.shape
    dv = v.shape[-1]
    N = -(-T // C)
    qc, kc, vc = (_to_chunks(x, C, N) for x in (q, k, v))
    if g is None:
        o = (qc @ kc.transpose(-1, -2)).tril() @ vc
        q_in, k_out, a = qc, kc, None
    elif g.dim() == 3:
        b = _gate_cumsum(_to_chunks(g, C, N), -1)  # [B,H,N,C]
        o = ((qc @ kc.transpose(-1, -2)) * _causal_log_decay(b, -1).exp().to(q.dtype)) @ vc
        q_in = qc * b.exp().to(q.dtype)[..., None]
        k_out = kc * (b[..., -1:] - b).exp().to(q.dtype)[..., None]
        a = b[..., -1].exp().to(q.dtype)[..., None, None]  # [B,H,N,1,1]
    else:
        b = _gate_cumsum(_to_chunks(g, C, N), -2)  # [B,H,N,C,dk]
        o = _gla_intra(qc, kc, vc, b)
        q_in = qc * b.exp().to(q.dtype)
        k_out = kc * (b[..., -1:, :] - b).exp().to(q.dtype)
        a = b[..., -1, :].exp().to(q.dtype)[..., None]  # [B,H,N,dk,1]
    s_prev, final = _state_scan(a, k_out.transpose(-1, -2) @ vc, s0)
    o = o + q_in @ s_prev
    return o.reshape(B, H, N * C, dv)[:, :, :T].transpose(1, 2), final
