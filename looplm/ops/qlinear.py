"""``qlinear(x, parts)``: ``x Wᵀ`` with int8 or int4 weights, for a decoding step and a prefill.

Why hand-written: decoding one token reads every weight once, so its speed is bytes read per token;
int8 / int4 weights read 4x / ~6x fewer bytes than float32, but torch's CPU ops for them either
dequantise the whole matrix (a float copy per call) or take bfloat16 activations through kernels
tuned for larger batches (slower than a float32 mat-vec on SmolLM2-sized matrices here). The kernel
(``csrc/qmatvec.h``, ``csrc/qlinear.cpp``) streams the weight bytes once: each row of ``x`` is
quantised to int8 in groups of 32 inputs (``x ≈ d_b·xq``, ``d_b = max|x_b|/127``), and each weight
row is an integer dot product per group (AVX-512 VNNI ``vpdpbusd``: 32 int4 or int8 products per
instruction) scaled in float; weight rows are split over threads, in tiles of 64 that meet every
row of ``x`` while in cache. From :func:`bf16_rows` rows on (a batch of decoding rows, a prefill;
CPUs with AMX bf16) each thread instead dequantises a strip of 32 weight rows to bfloat16 and
multiplies it by all rows on AMX tiles (``csrc/amx_gemm.h``, float32 sums): the unpacking is paid
once for all rows.
The int8 path computes the same sums as llama.cpp's Q8_0×Q8_0 and Q4_1×Q8_1 products (Gerganov
et al., ggml); their error is that of an int8 activation, ~0.3% of a group's largest value per
input, random in sign.

Weight parts (as :mod:`looplm.quant.formats` stores them, no repacking): ``[q int8 [N,K], scale
[N] or [N,K/g]]`` (``W = scale·q``, one scale per row or per group of ``g`` inputs) or
``[packed uint8 [N,K/2], scale, offset [N,K/g]]`` (``W = offset + scale·q``, element 2j in byte
j's low nibble); ``[w float32 [N,K]]`` also works (plain dot products).
``K`` must be a multiple of 32 and ``g`` of 32. :func:`qlinear_reference` is the same arithmetic
in PyTorch (float64 sums), the tests' reference.
"""

from __future__ import annotations

import torch

from looplm.ops import cpp_ext
from looplm.ops.nodes import tracked

__all__ = ["MAX_ROWS", "GROUP", "parts_ok", "kernel_applies", "qlinear", "swiglu_applies", "qlinear_swiglu",
           "qembedding", "quantize_rows", "bf16_rows", "dequantized", "qlinear_reference"]

MAX_ROWS = 8  # rows of x up to which float32 weights run here (a decoding step of a small batch)
GROUP = 32  # inputs per activation quantisation group


def parts_ok(parts: list[torch.Tensor], k: int) -> bool:
    """Whether ``parts`` are weight parts of ``[N, k]`` in a layout the kernel takes."""
    if len(parts) == 1:
        return parts[0].dtype == torch.float32 and parts[0].shape[1] == k
    if len(parts) == 2:
        return parts[0].dtype == torch.int8 and parts[0].shape[1] == k and k % GROUP == 0 and (
            parts[1].dim() == 1 or _groups_ok(parts[1], k))
    if len(parts) == 3:
        return parts[0].dtype == torch.uint8 and parts[0].shape[1] * 2 == k and _groups_ok(parts[1], k)
    return False


def _groups_ok(scale: torch.Tensor, k: int) -> bool:
    """Whether ``scale [N, G]`` splits ``k`` inputs into groups of a multiple of :data:`GROUP`."""
    groups = scale.shape[1] if scale.dim() == 2 else 0
    return groups > 0 and k % groups == 0 and (k // groups) % GROUP == 0


def kernel_applies(x: torch.Tensor, parts: list[torch.Tensor]) -> bool:
    """Whether :func:`qlinear` runs the C++ kernel for ``x [..., K]`` (CPU float32, nothing recorded
    for autograd, shapes it takes, kernels built; float32 weights: at most :data:`MAX_ROWS` rows,
    int8 / int4 weights: any number, as a prefill's rows run through weight tiles kept in cache)."""
    rows_ok = 0 < x.numel() and (len(parts) > 1 or x.numel() <= MAX_ROWS * x.shape[-1])
    return rows_ok and _cpu_operands(x, parts) and cpp_ext.available()


def _cpu_operands(x: torch.Tensor, parts: list[torch.Tensor]) -> bool:
    """CPU float32 ``x [..., K]`` with nothing recorded for autograd, and contiguous CPU weight parts
    of ``[N, K]`` in a layout the kernels take."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not tracked(x)
            and parts_ok(parts, x.shape[-1])
            and all(p.device.type == "cpu" and p.is_contiguous() for p in parts))


def qlinear(x: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    """``x [..., K] @ Wᵀ`` -> ``[..., N]`` float32 by the C++ kernel (check :func:`kernel_applies`)."""
    y = torch.ops.looplm.qlinear(x.reshape(-1, x.shape[-1]).contiguous(), parts)
    return y.view(*x.shape[:-1], y.shape[-1])


def swiglu_applies(x: torch.Tensor, parts: list[torch.Tensor]) -> bool:
    """Whether :func:`qlinear_swiglu` takes ``x [..., K]`` and ``parts`` of a fused gate | up weight
    ``[2F, K]`` (any of the layouts :func:`parts_ok` takes): CPU float32 ``x`` with nothing recorded
    for autograd, ``K`` a multiple of :data:`GROUP`, and :func:`bf16_rows` rows or more (the AMX
    route; 0 there: never). Never while torch.compile or torch.export traces (the product and the
    activation then go into the graph as they are)."""
    if torch.compiler.is_compiling():
        return False
    k = x.shape[-1] if x.dim() else 0
    rows = x.numel() // k if k else 0
    return (0 < bf16_rows() <= rows and k % GROUP == 0 and _cpu_operands(x, parts)
            and parts[0].shape[0] % 2 == 0)


def qlinear_swiglu(x: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    """``silu(x W_gateᵀ) * (x W_upᵀ)`` of ``x [..., K]`` and the fused weight ``[2F, K]`` that
    ``parts`` hold (gate rows, then up rows) -> ``[..., F]`` float32, on AMX tiles (check
    :func:`swiglu_applies`). The same floats as the product's bfloat16 route followed by the
    activation kernel (``csrc/swiglu.cpp``), without writing and reading back the ``[..., 2F]``
    product: each thread keeps a strip's gate and up products in a scratch of its own."""
    y = torch.ops.looplm.qlinear_swiglu(x.reshape(-1, x.shape[-1]).contiguous(), parts)
    return y.view(*x.shape[:-1], y.shape[-1])


def qembedding(ids: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    """Rows ``ids [...]`` of a quantised table (int8 or int4 parts) -> ``[..., D]`` float32 (C++;
    needs :func:`looplm.ops.cpp_ext.available`)."""
    rows = torch.ops.looplm.qembedding(ids.reshape(-1), parts)
    return rows.view(*ids.shape, rows.shape[-1])


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> ``xq int8 [M, K]``, ``d float32 [M, K/32]``: per group of 32 inputs
    ``d = max|x|/127``, ``xq = round(x · (1/d))`` (half to even; 0 where ``d = 0``)."""
    xb = x.float().reshape(x.shape[0], -1, GROUP)
    d = xb.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    xq = torch.round(xb * inv[..., None]).to(torch.int8)
    return xq.reshape(x.shape), d


def bf16_rows() -> int:
    """Rows of ``x`` from which the kernel multiplies int8 / int4 weights in bfloat16 on AMX tiles
    (0: never here: no kernels, a CPU without AMX bf16 tiles, or a kernel that does not grant them)."""
    if not hasattr(torch.ops.looplm, "qlinear_bf16_rows") and not cpp_ext.available():
        return 0
    return int(torch.ops.looplm.qlinear_bf16_rows())  # of the build loaded (tests load others)


def _row_groups(scale: torch.Tensor) -> torch.Tensor:
    """An int8 scale as ``[N, G]`` (per row: ``[N]`` -> ``[N, 1]``)."""
    return scale[:, None] if scale.dim() == 1 else scale


def dequantized(parts: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight ``[N, K]`` in ``dtype`` that int8 / int4 ``parts`` hold (``scale·q``,
    ``offset + scale·q``, computed in ``dtype``); the int8 / int4 formats of
    :mod:`looplm.quant.formats` dequantise through it."""
    if len(parts) == 2:
        q, scale = parts
        s = _row_groups(scale).to(dtype)
        return (q.to(dtype).reshape(q.shape[0], s.shape[1], -1) * s[..., None]).reshape(q.shape)
    packed, scale, offset = parts
    n, groups = scale.shape
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(n, groups, -1).to(dtype)
    return (offset.to(dtype)[..., None] + codes * scale.to(dtype)[..., None]).reshape(n, -1)


def qlinear_reference(x: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    """What the kernel computes, in PyTorch: ``x [M, K]`` -> ``[M, N]`` float32 (sums in float64).
    From :func:`bf16_rows` rows on, int8 / int4 weights: ``x`` and the dequantised weight rounded to
    bfloat16 (a batch of rows is a matrix product there, see ``csrc/qmatvec.h``)."""
    if len(parts) == 1:
        return (x.double() @ parts[0].double().t()).float()
    m, k = x.shape
    if 0 < bf16_rows() <= m:
        w = dequantized(parts).bfloat16().double()
        return (x.bfloat16().double() @ w.t()).float()
    xq, d = quantize_rows(x)
    xqb = xq.double().reshape(m, k // GROUP, GROUP)
    if len(parts) == 2:
        q, scale = parts
        qb = q.double().reshape(q.shape[0], k // GROUP, GROUP)
        per_group = torch.einsum("mbi,nbi->mnb", xqb, qb) * d.double()[:, None]  # [M, N, K/32]
        s = _row_groups(scale).double()
        return (per_group * s.repeat_interleave(k // GROUP // s.shape[1], dim=1)).sum(-1).float()
    packed, scale, offset = parts
    n, groups = scale.shape
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(n, k // GROUP, GROUP).double()
    per_group = torch.einsum("mbi,nbi->mnb", xqb, codes) * d.double()[:, None]  # [M, N, K/32]
    per = k // groups // GROUP
    s_group = scale.double().repeat_interleave(per, dim=1)  # [N, K/32]
    bsum = (xqb.sum(-1) * d.double()).reshape(m, groups, per).sum(-1)  # [M, groups]
    return ((per_group * s_group).sum(-1) + bsum @ offset.double().t()).float()
