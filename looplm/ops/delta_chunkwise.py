"""The chunkwise delta rule's kernel: forward and a hand-written backward.

Hand-written because no installed library runs the delta rule's chunk form on the CPU (FLA's
kernels are Triton) and autograd of it spends most of its time on small per-chunk ops.

Per chunk (``C`` tokens, row vectors, ``b`` the in-chunk cumulative log-decay, ``D_ts =
e^{b_t - b_s}`` for ``s <= t``), WY/UT form of Yang et al. 2024 ("Parallelizing Linear
Transformers with the Delta Rule over Sequence Length"), gated as in Yang, Kautz, Hatamizadeh 2025::

    A = I + tril(Diag(beta) (K K^T ⊙ D), -1)             unit lower triangular [C, C]
    [U | W] = A^{-1} [Diag(beta) V | Diag(beta e^b) K]     (explicit inverse: see unit_lower_inverse)
    K' = K ⊙ e^{b_C - b},   gamma = e^{b_C}
    delta = U - W S_i,   S_{i+1} = gamma S_i + K'^T delta      the loop over chunks
    O = (Q ⊙ e^b) S_i + (Q K^T ⊙ D) delta

Only the state is carried by the loop (two small ``baddbmm`` per chunk each way); everything else
is independent per chunk and runs batched over tiles of chunk-groups (:func:`row_tiles`: on one
thread, tiles whose temporaries stay in cache, measured ~10-15% faster at T=2048; one tile
with several threads). (Folding a chunk into a ``[dk, dk]`` transition ``gamma I - K'^T W``
halves the loop's ops but costs ``d^3`` matmuls per chunk: measured slower at ``C = 32, d = 64``.)

This PyTorch form is the reference and runs on every device. On the CPU the same computation runs
in a C++ kernel (:mod:`looplm.ops.delta_kernel`), each thread on its own groups.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from looplm.ops.delta_kernel import kernel_backward, kernel_forward, use_kernel
from looplm.ops.nodes import row_tiles, rows_per_tile

__all__ = ["unit_lower_inverse", "DeltaChunkFn"]

TILE_ELEMENTS = 32 * 32 * 64  # per-chunk parts run in tiles of about this many [C, d] elements


def unit_lower_inverse(m: torch.Tensor) -> torch.Tensor:
    """``(I + tril(m, -1))^{-1}`` for ``m [.., C, C]``; only the strict lower triangle of ``m`` is read.

    Recursive inversion by tiles (``[[A11, 0], [A21, A22]]^{-1}`` has off-diagonal tile
    ``-A22^{-1} A21 A11^{-1}``) over tile sizes 1, 2, 4, ..., each level batched over all tiles:
    about ``2 log2 C`` batched matmuls. For the 256 systems of 32 x 32 at T=2048 (one thread) it
    takes 1.1 ms against 1.3 ms for ``torch.linalg.solve_triangular`` against the identity; the
    explicit inverse is what lets the forward form ``[U | W]`` and the backward form
    ``A^{-T} dDelta`` as plain batched matmuls. ``C`` is padded with identity rows to a power of
    two. While ``torch.compile`` traces (the strided views need storage offsets it cannot trace):
    ``torch.linalg.solve_triangular``.
    """
    c = m.shape[-1]
    if torch.compiler.is_compiling():
        eye = torch.eye(c, dtype=m.dtype, device=m.device).expand_as(m)
        return torch.linalg.solve_triangular(torch.tril(m, -1), eye, upper=False, unitriangular=True)
    c2 = 1 << (c - 1).bit_length()
    lead = m.shape[:-2]
    mm = m.reshape(-1, c, c)
    if c2 != c:
        mm = F.pad(mm, (0, c2 - c, 0, c2 - c))
    mm = mm.contiguous()
    nb = mm.shape[0]
    inv = torch.eye(c2, dtype=m.dtype, device=m.device).expand(nb, c2, c2).contiguous()
    s = 1
    while s < c2:
        w = 2 * s
        shape, stride = (nb, c2 // w, w, w), (c2 * c2, w * c2 + w, c2, 1)
        mb = mm.as_strided(shape, stride, mm.storage_offset())  # the diagonal tiles of width w
        ib = inv.as_strided(shape, stride, inv.storage_offset())
        if s == 1:
            ib[..., 1:, :1] = -mb[..., 1:, :1]
        else:
            ib[..., s:, :s] = -(ib[..., s:, s:] @ mb[..., s:, :s] @ ib[..., :s, :s])
        s = w
    return inv[:, :c, :c].reshape(*lead, c, c)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1)``."""
    return torch.linalg.vecdot(a, b)


def _pair_terms(scale: float, q: Tensor, k: Tensor, beta: Tensor,
                b: Any) -> tuple[Tensor, Tensor, Tensor, Any]:
    """The ``[C, C]`` terms of all chunks at once: ``p = scale Q K^T ⊙ D``, ``kk = K K^T ⊙ D``,
    ``ainv = A^{-1}`` and ``d = D`` (None when ungated; ``b`` the in-chunk cumulative log-decay)."""
    c = q.shape[1]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    p, kk = torch.bmm(q, k.mT), torch.bmm(k, k.mT)
    if b is None:
        d = None
        p.masked_fill_(~causal, 0.0).mul_(scale)
    else:
        d = (b[:, :, None] - b[:, None, :]).masked_fill_(~causal, float("-inf")).exp_()
        p.mul_(d).mul_(scale)
        kk.mul_(d)
    return p, kk, unit_lower_inverse(kk * beta.unsqueeze(-1)), d


def _chunk_terms(sl: slice, scale: float, k: Tensor, v: Tensor, beta: Tensor, ainv: Tensor, u: Tensor,
                 w: Tensor, q: Tensor, eb: Any, k_end: Any, q_dec: Tensor, k_dec: Tensor) -> None:
    """Fill rows ``sl`` of ``u = A^{-1} Diag(beta) V`` (delta before the loop subtracts ``W S``),
    ``w = A^{-1} Diag(beta e^b) K`` and, when gated, ``q_dec = scale Q ⊙ e^b``, ``k_dec = K ⊙
    e^{b_C - b}``."""
    kb, bet, ab = k[sl], beta[sl].unsqueeze(-1), ainv[sl]
    torch.bmm(ab, v[sl] * bet, out=u[sl])
    if eb is None:
        torch.bmm(ab, kb * bet, out=w[sl])
    else:
        ebb = eb[sl]
        torch.bmm(ab, kb * (bet * ebb), out=w[sl])
        torch.mul(q[sl], ebb * scale, out=q_dec[sl])
        torch.mul(kb, k_end[sl], out=k_dec[sl])


def _input_grads(scale: float, d_o: Tensor, d_delta: Tensor, g_next: Tensor, s_in: Tensor, q: Tensor,
                 k: Tensor, v: Tensor, beta: Tensor, eb: Any, k_end: Any, d: Any, p: Tensor, kkd: Tensor,
                 ainv: Tensor, q_dec: Tensor, k_dec: Tensor, delta: Tensor) -> tuple[Any, ...]:
    """Gradients of ``q, k, v, beta, g`` for a tile of chunk-groups, given the loop's results."""
    ng, c, dv = d_o.shape
    gated = d is not None
    # [U | W] = A^{-1} R with dU = dDelta, dW = -dDelta S^T, so dR = [Z | -Z S^T] with
    # Z = A^{-T} dDelta, and dA = -dR [U | W]^T = -Z delta^T. Z and dO are stacked so that their
    # products with delta^T and S^T are one matmul each.
    z = q.new_empty(ng, 2 * c, dv)
    torch.bmm(ainv.mT, d_delta, out=z[:, :c])
    z[:, c:] = d_o
    z_delta, z_s = torch.bmm(z, delta.mT), torch.bmm(z, s_in.mT)  # [NG, 2C, C], [NG, 2C, dk]
    d_r_u, neg_d_r_w, d_qdec = z[:, :c], z_s[:, :c], z_s[:, c:]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    neg_d_m = z_delta[:, :c].tril_(-1)
    d_p = z_delta[:, c:].masked_fill_(~causal, 0.0)
    d_kdec = torch.bmm(delta, g_next.mT)
    bet = beta.unsqueeze(-1)
    # the row sums first; then the stacked buffers become the gradients in place
    r_w = -_rowdot(neg_d_r_w, k)  # [NG, C]
    d_beta = _rowdot(d_r_u, v) - _rowdot(neg_d_m, kkd)
    d_kk = neg_d_m.mul_(-bet)
    d_v = d_r_u.mul_(bet)
    if gated:
        eb_s = eb * scale
        d_beta += r_w * eb[..., 0]
        zz = d_p * p
        zz.addcmul_(d_kk, kkd)  # d/d(b_t - b_s) of the two decayed products
        z_end = _rowdot(d_kdec, k_dec)
        db = zz.sum(-1) - zz.sum(-2) - z_end
        db += r_w * (beta * eb[..., 0]) + _rowdot(d_qdec, q) * eb_s[..., 0]
        d_gamma = _rowdot(g_next.flatten(1), s_in.flatten(1))
        db[:, -1] += z_end.sum(-1) + d_gamma * eb[:, -1, 0]
        d_g = db.flip(-1).cumsum(-1).flip(-1)
        d_p.mul_(d)
        d_kk.mul_(d)
        d_q = d_qdec.mul_(eb_s).baddbmm_(d_p, k, alpha=scale)
        d_k = neg_d_r_w.mul_(-bet * eb).addcmul_(d_kdec, k_end)
    else:
        d_g = None
        d_beta += r_w
        d_q = d_qdec.baddbmm_(d_p, k, beta=scale, alpha=scale)
        d_k = neg_d_r_w.mul_(-bet).add_(d_kdec)
    d_k.baddbmm_(d_p.mT, q, alpha=scale)
    d_k.baddbmm_(d_kk + d_kk.mT, k)
    return d_q, d_k, d_v, d_beta, d_g


def _scan_forward(delta: torch.Tensor, w: torch.Tensor, kdec: torch.Tensor, gamma: torch.Tensor | None,
                  s0: torch.Tensor, states: torch.Tensor, final: torch.Tensor) -> None:
    """The forward loop over chunks, in place. ``delta [G, N, C, dv]`` holds ``U`` and becomes ``U - W S``;
    ``states [G, N, dk, dv]`` receives ``S_0..S_{N-1}`` and ``final [G, dk, dv]`` ``S_N``; ``w, kdec
    [G, N, C, dk]``, ``gamma [G, N]`` or None, ``s0 [G, dk, dv]``."""
    n = delta.shape[1]
    states[:, 0] = s0
    for i in range(n):
        s, nxt = states[:, i], states[:, i + 1] if i + 1 < n else final
        delta[:, i].baddbmm_(w[:, i], s, alpha=-1)
        if gamma is None:
            nxt.copy_(s)
        else:
            torch.mul(s, gamma[:, i, None, None], out=nxt)
        nxt.baddbmm_(kdec[:, i].mT, delta[:, i])


def _scan_backward(d_delta: torch.Tensor, w: torch.Tensor, kdec: torch.Tensor, gamma: torch.Tensor | None,
                   g_next: torch.Tensor, d_s0: torch.Tensor) -> None:
    """The backward loop over chunks, in place. ``d_delta [G, N, C, dv]`` and ``g_next [G, N, dk, dv]``
    (``dS_{i+1}`` of chunk ``i``), ``d_s0 [G, dk, dv]`` hold the outputs' parts and receive what flows
    back through the state: ``dDelta_i += K'_i dS_{i+1}``, ``dS_i += gamma_i dS_{i+1} - W_i^T dDelta_i``."""
    for i in reversed(range(d_delta.shape[1])):
        gn, tgt = g_next[:, i], g_next[:, i - 1] if i > 0 else d_s0
        d_delta[:, i].baddbmm_(kdec[:, i], gn)
        if gamma is None:
            tgt += gn
        else:
            tgt.addcmul_(gn, gamma[:, i, None, None])
        tgt.baddbmm_(w[:, i].mT, d_delta[:, i], alpha=-1)


def delta_chunk_traced(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                       g: torch.Tensor | None, s0: torch.Tensor, n: int,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``DeltaChunkFn``'s forward (same arguments and results) in out-of-place ops only, for
    ``torch.compile`` / ``torch.export`` to trace and differentiate: the same ``[C, C]`` terms, then
    the loop over chunks ``delta = U - W S``, ``S ← γ S + K_decᵀ delta``, ``o = P delta + Q_dec S``."""
    ng, c, dk = q.shape
    dv, gsz = v.shape[-1], ng // n
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    p, kk = q @ k.mT, k @ k.mT
    bet = beta.unsqueeze(-1)
    if g is None:
        p = p.masked_fill(~causal, 0.0) * scale
        q_dec, k_dec, w_in, gamma = q * scale, k, k * bet, None
    else:
        b = g.cumsum(-1)
        d = (b[:, :, None] - b[:, None, :]).masked_fill(~causal, float("-inf")).exp()
        p, kk = p * d * scale, kk * d
        eb, k_end = b.exp().unsqueeze(-1), (b[:, -1:] - b).exp().unsqueeze(-1)
        q_dec, k_dec, w_in = q * (eb * scale), k * k_end, k * (bet * eb)
        gamma = eb.reshape(gsz, n, c)[:, :, -1]
    ainv = unit_lower_inverse(kk * bet)
    u, w = (ainv @ (v * bet)).reshape(gsz, n, c, dv), (ainv @ w_in).reshape(gsz, n, c, dk)
    p, q_dec, k_dec = p.reshape(gsz, n, c, c), q_dec.reshape(gsz, n, c, dk), k_dec.reshape(gsz, n, c, dk)
    state, outs = s0, []
    for i in range(n):
        delta = u[:, i] - w[:, i] @ state
        outs.append(p[:, i] @ delta + q_dec[:, i] @ state)
        state = (state if gamma is None else state * gamma[:, i, None, None]) + k_dec[:, i].mT @ delta
    return torch.stack(outs, 1).reshape(ng, c, dv), state


class DeltaChunkFn(torch.autograd.Function):
    """``(q, k, v, beta, g, s0, n, scale) -> (o, final_state)`` in group-major layout.

    ``q, k [G*N, C, dk]``, ``v [G*N, C, dv]``, ``beta, g [G*N, C]`` (``g`` None: ungated), ``s0
    [G, dk, dv]``: ``G = B*H`` groups of ``N`` chunks each, ``scale`` multiplies ``q``. Returns
    ``o [G*N, C, dv]`` and ``S_N [G, dk, dv]``, with gradients for all tensor inputs. The backward
    uses that ``U`` and ``W`` reach the loss only through ``delta = U - W S``, so the gradient of
    ``A`` is ``-A^{-T} dDelta delta^T`` (no ``[U | W]`` kept, no concatenation).

    On the CPU with the C++ kernel (:mod:`looplm.ops.delta_kernel`) each thread runs this whole
    computation for its own range of groups; otherwise the PyTorch code below runs it.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Any, s0: Any, n: int,
                scale: float) -> tuple[Tensor, Tensor]:
        with torch.autocast(q.device.type, enabled=False):  # inputs arrive in float32 or float64
            if use_kernel(q):
                out = kernel_forward(q, k, v, beta, g, s0, n, scale, tile_rows(q, v))
                o, final, saved = out[0], out[1], tuple(out[2:])
            else:
                o, final, saved = DeltaChunkFn._forward(q, k, v, beta, g, s0, n, scale)
        ctx.n, ctx.scale, ctx.gated = n, scale, g is not None
        ctx.save_for_backward(*saved)
        return o, final

    @staticmethod
    def backward(ctx: Any, d_o: Tensor, d_final: Tensor) -> tuple[Any, ...]:
        d_o = d_o.contiguous()  # autograd materialises unused outputs' grads as zeros
        saved = ctx.saved_tensors
        with torch.autocast(d_o.device.type, enabled=False):
            if use_kernel(d_o):
                grads = kernel_backward(d_o, d_final.contiguous(), saved, ctx.n, ctx.scale, ctx.gated,
                                        tile_rows(saved[0], d_o))
            else:
                grads = DeltaChunkFn._backward(d_o, d_final, saved, ctx.n, ctx.scale, ctx.gated)
        return (*grads, None, None)

    @staticmethod
    def _forward(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Any, s0: Any, n: int,
                 scale: float) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        ng, c, dk = q.shape
        dv, gsz = v.shape[-1], ng // n
        gated = g is not None
        b: Any = None if g is None else g.cumsum(-1)
        p, kk, ainv, d = _pair_terms(scale, q, k, beta, b)
        w, delta = q.new_empty(ng, c, dk), q.new_empty(ng, c, dv)
        if gated:
            eb, k_end = b.exp().unsqueeze(-1), (b[:, -1:] - b).exp_().unsqueeze(-1)
            q_dec, k_dec = torch.empty_like(q), torch.empty_like(k)
        else:
            eb = k_end = None
            q_dec, k_dec = q, k
        tiles = row_tiles(ng, c * max(dk, dv), TILE_ELEMENTS)
        for sl in tiles:  # the [C, d] terms, tile by tile (in cache)
            _chunk_terms(sl, scale, k, v, beta, ainv, delta, w, q, eb, k_end, q_dec, k_dec)
        states, final = q.new_empty(gsz, n, dk, dv), q.new_empty(gsz, dk, dv)
        gamma = None if eb is None else eb.view(gsz, n, c)[:, :, -1]
        _scan_forward(delta.view(gsz, n, c, dv), w.view(gsz, n, c, dk), k_dec.view(gsz, n, c, dk), gamma, s0,
                     states, final)
        s_in = states.view(ng, dk, dv)
        o = q.new_empty(ng, c, dv)
        for sl in tiles:
            torch.baddbmm(torch.bmm(p[sl], delta[sl]), q_dec[sl], s_in[sl], alpha=1.0 if gated else scale,
                          out=o[sl])
        saved: tuple[Tensor, ...] = (q, k, v, beta, p, kk, ainv, w, q_dec, k_dec, states, delta)
        if gated:
            saved += (eb, k_end, d)
        return o, final, saved

    @staticmethod
    def _backward(d_o: Tensor, d_final: Tensor, saved: tuple[Tensor, ...], n: int, scale: float,
                  gated: bool) -> tuple[Any, ...]:
        q, k, v, beta, p, kkd, ainv, w, q_dec, k_dec, states, delta = saved[:12]
        eb, k_end, d = saved[12:] if gated else (None, None, None)
        ng, c, dk = q.shape
        dv, gsz = v.shape[-1], ng // n
        s_in = states.view(ng, dk, dv)
        # grads reaching delta_i and S_i through this chunk's outputs; the loop adds what flows back
        # through the state: S_{i+1} = gamma_i S_i + K'_i^T delta_i, delta_i = U_i - W_i S_i
        d_delta = torch.bmm(p.mT, d_o)
        from_out = torch.bmm(q_dec.mT, d_o).view(gsz, n, dk, dv)  # d o_i / d S_i
        if not gated:
            from_out.mul_(scale)
        g_next = torch.empty_like(from_out)  # dS_{i+1} for chunk i
        g_next[:, : n - 1] = from_out[:, 1:]
        g_next[:, n - 1] = d_final
        d_s0 = from_out[:, 0].clone()
        gamma = None if eb is None else eb.view(gsz, n, c)[:, :, -1]
        _scan_backward(d_delta.view(gsz, n, c, dv), w.view(gsz, n, c, dk), k_dec.view(gsz, n, c, dk), gamma,
                      g_next, d_s0)
        # the rest is independent per chunk and group: run it in tiles that stay in cache
        tensors: tuple[Any, ...] = (d_o, d_delta, g_next.view(ng, dk, dv), s_in, q, k, v, beta, eb, k_end, d,
                                    p, kkd, ainv, q_dec, k_dec, delta)
        # the starred generator reads as Tensor | None for every argument; the ungated ones (eb,
        # k_end, d) are the ones that may be None, as _input_grads takes them
        grads = [_input_grads(scale, *(None if x is None else x[sl] for x in tensors))  # type: ignore[arg-type]
                 for sl in row_tiles(ng, c * max(dk, dv), TILE_ELEMENTS)]
        d_q, d_k, d_v, d_beta, d_g = (
            None if parts[0] is None else parts[0] if len(parts) == 1 else torch.cat(parts)
            for parts in zip(*grads)
        )
        return d_q, d_k, d_v, d_beta, d_g, d_s0


def tile_rows(q: torch.Tensor, v: torch.Tensor) -> int:
    """Rows (chunk-groups) per cache-sized tile of the C++ kernel."""
    return rows_per_tile(q.shape[1] * max(q.shape[-1], v.shape[-1]), TILE_ELEMENTS)
