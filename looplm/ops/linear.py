"""``linear(x, weight, bias)``: ``F.linear``, with a C++ kernel for the few rows of a decoding step.

Decoding one token multiplies a handful of rows by every weight matrix: memory-bound work that
torch's CPU ``F.linear`` (MKL) does at ~9 GB/s here, while the machine reads memory at 35+ GB/s
per core. ``csrc/linear_small.cpp`` is a plain dot product per output row (16 lanes, compiled for
this CPU), rows split over threads: 24 matrices of ``[1152, 384]`` times one row took 4.4 ms with
``F.linear`` and 1.6 ms (1 thread) / 1.0 ms (2 threads) with it (ad-hoc timing). From 4 rows on
(a batch of decoding rows, e.g. the output head of a serving batch) it is ``csrc/rows_gemm.h``'s
blocked product, which reads each weight row once for all rows. It runs only when nothing is
recorded for autograd, on CPU float32 with at most :data:`MAX_ROWS` rows (:data:`MAX_STEP_ROWS`
for ``x [B, 1, K]``, a batch's decoding step); else ``F.linear``.
Its sums are in another order than MKL's (differences ~1e-7 relative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from looplm.ops import cpp_ext
from looplm.ops.nodes import tracked

__all__ = ["linear", "MAX_ROWS", "MAX_STEP_ROWS"]

MAX_ROWS = 8  # rows of x up to which the small kernel runs (a decoding step of a small batch)
MAX_STEP_ROWS = 64  # the same for x [B, 1, K] (one token of B rows: a batch's decoding step)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ weight[N, K]^T (+ bias [N])`` -> ``[..., N]``, as ``F.linear``."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or x.numel() > (MAX_STEP_ROWS if x.dim() == 3 and x.shape[1] == 1 else MAX_ROWS) * x.shape[-1]
            or x.numel() == 0 or not weight.is_contiguous()
            or tracked(x, weight, bias) or not cpp_ext.available()):
        return F.linear(x, weight, bias)
    y = torch.ops.looplm.linear_small(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])
