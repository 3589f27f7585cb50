"""The delta rule's chunk-form kernel in C++ (CPU), and the PyTorch loop over chunks it replaces.

The chunk form (:mod:`looplm.ops.delta_chunkwise`) has one sequential part: per chunk ``i`` and
group ``g`` (``C`` tokens, state ``S [dk, dv]``)::

    forward:   delta_i = U_i - W_i S_i,           S_{i+1} = gamma_i S_i + K'_i^T delta_i
    backward:  dDelta_i += K'_i dS_{i+1},         dS_i += gamma_i dS_{i+1} - W_i^T dDelta_i

Why C++ (``csrc/delta_kernel.cpp``): the loop's two ``[C, d] x [d, d]`` matmuls per chunk are too
small for one matmul to use several threads, and every op of the chunk form is one fork/join of
the thread pool: on this 2-core machine two threads ran the PyTorch form only ~1.3x faster than
one. The kernel is the same computation written with the same ATen ops, but each thread runs all
of it (per-chunk terms, loop, outputs, gradients) for its own range of groups (``at::parallel_for``
over ``B*H``), in cache-sized blocks of rows; the loop over chunks calls BLAS ``gemm`` directly
(an ATen matmul's overhead is about the cost of one ``[32, 64] x [64, 64]`` product). It is built
with the other C++ kernels (:mod:`looplm.ops.cpp_ext`). Without them, on other devices, or inside
:func:`pytorch_form`, the PyTorch form runs; tests check that both agree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from looplm.ops import cpp_ext

__all__ = ["kernel_available", "use_kernel", "pytorch_form", "kernel_forward", "kernel_backward",
           "scan_forward", "scan_backward"]

_forced_off: list[bool] = []  # non-empty inside pytorch_form()


def kernel_available() -> bool:
    """Whether the C++ kernels are built and loaded (:func:`looplm.ops.cpp_ext.available`)."""
    return cpp_ext.available()


def use_kernel(x: torch.Tensor) -> bool:
    """Whether the chunk form of ``x``'s device runs in the C++ kernel (CPU tensors, kernel built)."""
    return not _forced_off and x.device.type == "cpu" and kernel_available()


@contextlib.contextmanager
def pytorch_form() -> Iterator[None]:
    """Run the chunk form in PyTorch inside this block (e.g. so that torch's FLOP counter sees it)."""
    _forced_off.append(True)
    try:
        yield
    finally:
        _forced_off.pop()


def kernel_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                   g: torch.Tensor | None, s0: torch.Tensor, n: int, scale: float,
                   block_rows: int) -> list[torch.Tensor]:
    """``[o, final_state, *saved]`` of :class:`~looplm.ops.delta_chunkwise.DeltaChunkFn` (same layout)."""
    return torch.ops.looplm.delta_chunk_forward(q, k, v, beta, g, s0, n, scale, block_rows)


def kernel_backward(d_o: torch.Tensor, d_final: torch.Tensor, saved: tuple[torch.Tensor, ...], n: int,
                    scale: float, gated: bool, block_rows: int) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(q, k, v, beta, g or None, s0)`` from the tensors :func:`kernel_forward` saved."""
    op = torch.ops.looplm.delta_chunk_backward
    d_q, d_k, d_v, d_beta, d_g, d_s0 = op(d_o, d_final, list(saved), n, scale, gated, block_rows)
    return d_q, d_k, d_v, d_beta, d_g if gated else None, d_s0


def scan_forward(delta: torch.Tensor, w: torch.Tensor, kdec: torch.Tensor, gamma: torch.Tensor | None,
                 s0: torch.Tensor, states: torch.Tensor, final: torch.Tensor) -> None:
    """The forward loop in PyTorch, in place. ``delta [G, N, C, dv]`` holds ``U`` and becomes ``U - W S``;
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


def scan_backward(d_delta: torch.Tensor, w: torch.Tensor, kdec: torch.Tensor, gamma: torch.Tensor | None,
                  g_next: torch.Tensor, d_s0: torch.Tensor) -> None:
    """The backward loop in PyTorch, in place. ``d_delta [G, N, C, dv]`` and ``g_next [G, N, dk, dv]``
    (``dS_{i+1}`` of chunk ``i``), ``d_s0 [G, dk, dv]`` hold the outputs' parts and receive what flows
    back through the state."""
    for i in reversed(range(d_delta.shape[1])):
        gn, tgt = g_next[:, i], g_next[:, i - 1] if i > 0 else d_s0
        d_delta[:, i].baddbmm_(kdec[:, i], gn)
        if gamma is None:
            tgt += gn
        else:
            tgt.addcmul_(gn, gamma[:, i, None, None])
        tgt.baddbmm_(w[:, i].mT, d_delta[:, i], alpha=-1)
