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

Inside :func:`bf16_products` (the serving engine's prompt forwards, when asked for), float32
weights times :func:`looplm.ops.qlinear.bf16_rows` rows or more run on AMX tiles instead
(``csrc/amx_gemm.h``: ``x`` and ``W`` rounded to bfloat16, float32 sums), several times
float32's arithmetic rate on CPUs that have them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from looplm.ops import cpp_ext
from looplm.ops.nodes import tracked
from looplm.ops.qlinear import bf16_rows

__all__ = ["linear", "bf16_products", "bf16_products_on", "BF16_NEEDS", "MAX_ROWS", "MAX_STEP_ROWS"]

MAX_ROWS = 8  # rows of x up to which the small kernel runs (a decoding step of a small batch)
MAX_STEP_ROWS = 64  # the same for x [B, 1, K] (one token of B rows: a batch's decoding step)


_mode = threading.local()  # .bf16: inside bf16_products, in this thread


@contextlib.contextmanager
def bf16_products(enabled: bool = True) -> Iterator[None]:
    """Within (this thread): float32 weights times :func:`~looplm.ops.qlinear.bf16_rows` rows or
    more (a prompt's forward) multiply in bfloat16 on AMX tiles, and the softmax attention of
    several queries (:func:`looplm.ops.attention.attention`) reads bfloat16 copies of q, k, v
    (float32 softmax and sums); everything else as before. No effect where the CPU or build has
    no AMX bf16 tiles (``bf16_rows() == 0``)."""
    before = getattr(_mode, "bf16", False)
    _mode.bf16 = enabled
    try:
        yield
    finally:
        _mode.bf16 = before


def bf16_products_on() -> bool:
    """Whether this thread is inside :func:`bf16_products` on a CPU (and build) with AMX bf16 tiles."""
    return getattr(_mode, "bf16", False) and cpp_ext.available() and bf16_rows() > 0


# what bf16_products needs to do anything (the refusals of the commands that ask for it)
BF16_NEEDS = "a CPU with AMX bfloat16 tiles (and looplm's kernels built)"


def _bf16_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if not bf16_products_on():  # every linear asks: the common answer (outside) first
        return False
    rows = x.numel() // max(1, x.shape[-1])
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and weight.is_contiguous() and x.shape[-1] % 32 == 0
            and not tracked(x, weight, bias) and bf16_rows() <= rows)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ weight[N, K]^T (+ bias [N])`` -> ``[..., N]``, as ``F.linear``."""
    if _bf16_applies(x, weight, bias):
        y = torch.ops.looplm.linear_bf16(x.reshape(-1, x.shape[-1]).contiguous(), weight)
        y = y.view(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or x.numel() > (MAX_STEP_ROWS if x.dim() == 3 and x.shape[1] == 1 else MAX_ROWS) * x.shape[-1]
            or x.numel() == 0 or not weight.is_contiguous()
            or tracked(x, weight, bias) or not cpp_ext.available()):
        return F.linear(x, weight, bias)
    y = torch.ops.looplm.linear_small(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])
