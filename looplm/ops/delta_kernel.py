"""The delta rule's chunk-form kernel in C++ (CPU): when it runs, and its calls.

The chunk form (:mod:`looplm.ops.delta_chunkwise`, whose PyTorch code is the reference) has one
sequential part, the loop over chunks (``_scan_forward`` / ``_scan_backward`` there).

Why C++ (``csrc/delta_kernel.cpp``): the loop's two ``[C, d] x [d, d]`` matmuls per chunk are too
small for one matmul to use several threads, and every op of the chunk form is one fork/join of
the thread pool: on this 2-core machine two threads ran the PyTorch form only ~1.3x faster than
one. The kernel is the same computation written with the same ATen ops, but each thread runs all
of it (per-chunk terms, loop, outputs, gradients) for its own range of groups (``at::parallel_for``
over ``B*H``), in cache-sized tiles of rows; the loop over chunks calls BLAS ``gemm`` directly
(an ATen matmul's overhead is about the cost of one ``[32, 64] x [64, 64]`` product). It is built
with the other C++ kernels (:mod:`looplm.ops.cpp_ext`). Without them, on other devices, or inside
``cpp_ext.kernels("torch")``, the PyTorch form runs; tests check that both agree.
"""

from __future__ import annotations

import torch

from looplm.ops import cpp_ext

__all__ = ["use_kernel", "kernel_forward", "kernel_backward"]


def use_kernel(x: torch.Tensor) -> bool:
    """Whether the chunk form of ``x``'s device runs in the C++ kernel (CPU tensors, kernel built)."""
    return x.device.type == "cpu" and cpp_ext.available()


def kernel_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                   g: torch.Tensor | None, s0: torch.Tensor, n: int, scale: float,
                   tile_rows: int) -> list[torch.Tensor]:
    """``[o, final_state, *saved]`` of :class:`~looplm.ops.delta_chunkwise.DeltaChunkFn` (same layout)."""
    return torch.ops.looplm.delta_chunk_forward(q, k, v, beta, g, s0, n, scale, tile_rows)


def kernel_backward(d_o: torch.Tensor, d_final: torch.Tensor, saved: tuple[torch.Tensor, ...], n: int,
                    scale: float, gated: bool, tile_rows: int) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(q, k, v, beta, g or None, s0)`` from the tensors :func:`kernel_forward` saved."""
    op = torch.ops.looplm.delta_chunk_backward
    d_q, d_k, d_v, d_beta, d_g, d_s0 = op(d_o, d_final, list(saved), n, scale, gated, tile_rows)
    return d_q, d_k, d_v, d_beta, d_g if gated else None, d_s0
