"""Helpers of the hand-written autograd nodes (conv, RoPE, norms, SwiGLU).

``tracked``: whether autograd records an op; without it (decoding, ``inference_mode``) the
callers run plain ops instead of their nodes (a decoding step with the nodes was 14-19% slower).
``row_tiles``: tiles of rows for chains of elementwise passes over large tensors. On one
thread a tile's passes stay in the core's cache (2-3x faster than whole-tensor passes of
``[8, 512, 768]`` here). With several threads each pass is one fork/join of the thread pool, and
many small passes lost: 2 threads on the shared 2-core machine, bench-train sizes, LoopLM / Llama
0.97 with tiles vs 1.09 with one tile per pass.
"""

from __future__ import annotations

import torch


def tracked(*tensors: torch.Tensor | None) -> bool:
    """True when grad mode is on and one of ``tensors`` requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def rows_per_tile(row_size: int, budget: int) -> int:
    """Rows of ``row_size`` elements in a tile of about ``budget`` elements (at least one)."""
    return max(1, budget // max(1, row_size))


def row_tiles(n_rows: int, row_size: int, budget: int) -> list[slice]:
    """Slices of ``n_rows`` rows of ``row_size`` elements, about ``budget`` elements each on one
    torch thread; one slice of all rows when torch runs several threads or compiles (the compiler
    fuses and schedules the loops itself)."""
    if torch.compiler.is_compiling() or torch.get_num_threads() > 1:
        return [slice(0, n_rows)]
    rows = rows_per_tile(row_size, budget)
    return [slice(i, i + rows) for i in range(0, n_rows, rows)]
