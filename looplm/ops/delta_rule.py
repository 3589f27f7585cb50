"""The delta rule: DeltaNet and gated DeltaNet, in step, recurrent, parallel and chunk forms.

Update per head (row vectors, state ``S [dk, dv]``, docs/mechanisms.md §1.1)::

    S_t = a_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,    o_t = scale * q_t S_t

with ``a_t = exp(g_t)``; ``g = None`` gives DeltaNet (Schlag et al. 2021; Yang et al. 2024,
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length"), a log-decay
``g [B, T, H] <= 0`` gives gated DeltaNet (Yang, Kautz, Hatamizadeh 2025). Keys are expected
L2-normalised by the caller. ``beta = k = g = 0`` is an exact identity update (padding,
skipped tokens).

The chunk form (WY/UT representation, Yang et al. 2024; gate decays kept in log space inside a
chunk) lives in :mod:`looplm.ops.delta_chunkwise`, with its hand-written backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from looplm.ops import kernel_tracing
from looplm.ops.checks import check_chunk_size, check_like, check_qkv
from looplm.ops.delta_chunkwise import DeltaChunkFn, delta_chunk_traced, tile_rows
from looplm.ops.delta_kernel import use_kernel
from looplm.ops.nodes import tracked

__all__ = ["delta_step", "delta_recurrent", "delta_parallel", "delta_chunk"]


def _check_scale(scale: float | None, dk: int) -> float:
    if scale is None:
        return dk**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def _check_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor | None,
                state: torch.Tensor | None, state_name: str, step: bool) -> None:
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


def _chunk_layout(x: torch.Tensor, n: int, c: int) -> torch.Tensor:
    """``[B, N*C, H, *]`` -> group-major ``[B*H*N, C, *]``, contiguous."""
    x = x.reshape(x.shape[0], n, c, *x.shape[2:]).movedim(3, 1)  # [B, H, N, C, *]
    return x.reshape(-1, c, *x.shape[4:]).contiguous()


def delta_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel delta rule (training, prefill): O(T C d) work, a loop over T/C chunks.

    ``q, k [B, T, H, dk]``, ``v [B, T, H, dv]``, ``beta, g [B, T, H]``, ``initial_state [B, H, dk,
    dv]`` -> ``(o [B, T, H, dv], final_state [B, H, dk, dv])``. The kernel
    (:class:`~looplm.ops.delta_chunkwise.DeltaChunkFn`) batches all intra-chunk work and loops
    over chunks with two small ``baddbmm`` each way. The tail is padded with identity tokens
    (``k = v = beta = g = 0``). Computes in float32 at least. ``chunk_size=32`` is the fastest
    here (32 / 64 / 128 measured at B=1 T=2048 and B=8 T=512).
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
    q, k, v, beta = (x.to(cdt) for x in (q, k, v, beta))
    g = None if g is None else g.to(cdt)
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        beta = F.pad(beta, (0, 0, 0, pad))
        g = None if g is None else F.pad(g, (0, 0, 0, pad))
    groups = bsz * h
    qc, kc, vc, bc = (_chunk_layout(x, n, c) for x in (q, k, v, beta))
    gc = None if g is None else _chunk_layout(g, n, c)
    s0 = state.reshape(groups, dk, dv)
    if torch.compiler.is_exporting() and use_kernel(qc) and not tracked(qc, kc, vc, bc, gc, s0):
        rows = tile_rows(qc, vc)  # the C++ kernel as one op in the exported graph
        o, state = kernel_tracing.delta_chunk(qc, kc, vc, bc, gc, s0.contiguous(), n, scale, rows)
    elif torch.compiler.is_compiling():  # out-of-place ops the compiler differentiates (the Function
        o, state = delta_chunk_traced(qc, kc, vc, bc, gc, s0, n, scale)  # writes in place)
    else:
        # torch's autograd Function.apply is untyped
        o, state = DeltaChunkFn.apply(qc, kc, vc, bc, gc, s0, n, scale)  # type: ignore[no-untyped-call]
    o = o.view(bsz, h, n, c, dv).permute(0, 2, 3, 1, 4).reshape(bsz, n * c, h, dv)[:, :t]
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
