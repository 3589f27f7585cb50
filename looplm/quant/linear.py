"""``QuantLinear`` and ``QuantEmbedding``: modules holding a quantised weight (formats.py).

Kernels measured on this CPU (AVX-512, 1 thread; batch-1 decoding of a 101M-parameter model,
``looplm bench quant``): torch's packed weight-only ops are fast only with **bfloat16
activations** — there ``torch._weight_int8pack_mm`` decodes 1.8x and
``aten._weight_int4pack_mm_for_cpu`` (g=64) 2.7x faster than float32, while their
float32-input paths were 10-20x *slower* than a float32 mat-vec in a per-matrix test;
dequantise-then-matmul runs at 0.3x (int8) and 0.1x (int4); a torch.compile-generated
dequantise+reduction reached ~1.6x (int8) and ~1x (int4) per matrix and costs a compile per
shape. So ``kernel="auto"`` runs int8 / int4 on CPU through the packed ops with the input cast
to bf16 (int8 scales are bf16-exact by construction; int4 scale/zero are rounded to bf16, a
relative error ≤ 2^-9 of the group offset), and every other case (FP8, FP4-MX, other devices,
int4 with out_features % 16 != 0) through dequantise-then-matmul in the input's dtype.

Float32 inputs on the CPU with nothing recorded for autograd (decoding steps and prefills) of int8 /
int4 weights run :func:`looplm.ops.qlinear.qlinear` instead, on the stored parts (int8 activations,
integer dot products; faster than all of the above on SmolLM2-sized matrices, and no repacked copy);
the packed ops remain for bfloat16 inputs and autograd. A tied quantised embedding
computes the head's logits the same way (``QuantEmbedding.as_head``), never a float copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from looplm.ops import cpp_ext
from looplm.ops import qlinear as qops
from looplm.quant.formats import Format, dequantize, quantize, unpack_nibbles

KERNELS = ("auto", "packed", "dequant")


def part_shapes(fmt: Format, out_features: int, in_features: int) -> dict[str, tuple[tuple, torch.dtype]]:
    """Name → (shape, dtype) of the stored parts of a ``[out, in]`` weight in ``fmt``."""
    return fmt.part_shapes(out_features, in_features)


def supports(fmt: Format, out_features: int, in_features: int) -> bool:
    """Whether a ``[out, in]`` weight can be stored in ``fmt`` (group/pair divisibility)."""
    return fmt.supports(out_features, in_features)


class _QuantWeight(nn.Module):
    """Holds the parts of one quantised ``[rows, cols]`` matrix as buffers (uninitialised until
    ``set_weight`` or a checkpoint load fills them: untouched memory, no resident page)."""

    def __init__(self, fmt: Format, rows: int, cols: int, device=None) -> None:
        super().__init__()
        if not supports(fmt, rows, cols):
            raise ValueError(f"a [{rows}, {cols}] weight cannot use {fmt.name} "
                             f"with group_size={fmt.group_size}")
        self.fmt, self.rows, self.cols = fmt, rows, cols
        for name, (shape, dtype) in part_shapes(fmt, rows, cols).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))

    def parts(self) -> dict[str, Tensor]:
        return {name: buf for name, buf in self.named_buffers(recurse=False)}

    def part(self, name: str) -> Tensor:
        """The stored part ``name`` (one of the format's ``parts``, a buffer)."""
        t = self._buffers[name]
        if t is None:
            raise KeyError(f"{self.fmt.name} has no part {name!r}")
        return t

    def kernel_parts(self) -> list[Tensor] | None:
        """The parts in :mod:`looplm.ops.qlinear`'s order, or None for formats it does not take."""
        if self.fmt.name == "int8":
            return [self.part("q"), self.part("scale")]
        if self.fmt.name == "int4":
            return [self.part("packed"), self.part("scale"), self.part("offset")]
        return None

    def set_weight(self, w: Tensor) -> None:
        self.set_parts(quantize(w.detach(), self.fmt))

    def set_parts(self, parts: dict[str, Tensor]) -> None:
        """Store ``parts`` (every part of the format, in its shapes) as they are."""
        for name, value in parts.items():
            self.part(name).copy_(value)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight ``[rows, cols]`` in ``dtype``."""
        return dequantize(self.parts(), self.fmt, dtype)

    @property
    def weight(self) -> Tensor:
        """The dequantised float32 weight (for code that reads ``.weight``: a tied head, a
        mixer taking its state's device from it); the forward does not use it."""
        return self.dequantized(torch.float32)

    def extra_repr(self) -> str:
        g = f", group_size={self.fmt.group_size}" if self.fmt.group_size else ""
        return f"{self.rows}, {self.cols}, format={self.fmt.name}{g}"


class QuantLinear(_QuantWeight):
    """``y = x Wᵀ + b`` with ``W [out, in]`` stored in a low-precision format.

    ``x [..., in] → y [..., out]`` in ``x``'s dtype. ``kernel``: ``auto`` (packed ops for
    int8/int4 on CPU, see the module docstring), ``packed`` (same, error if unavailable) or
    ``dequant`` (dequantise the weight to ``x.dtype`` then ``F.linear``).
    """

    def __init__(self, in_features: int, out_features: int, fmt: Format, bias: bool = False,
                 kernel: str = "auto", device=None) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r} is not one of {', '.join(KERNELS)}")
        super().__init__(fmt, out_features, in_features, device)
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self._int4_cache: tuple[Tensor, Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: Format, kernel: str = "auto") -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, fmt, linear.bias is not None, kernel,
                device=linear.weight.device)
        q.set_weight(linear.weight)
        if linear.bias is not None and q.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def set_parts(self, parts: dict[str, Tensor]) -> None:
        super().set_parts(parts)
        self._int4_cache = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # new parts: drop the kernel layout
        self._int4_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def packed_available(self, device: torch.device) -> bool:
        """Whether torch's packed CPU op exists for this format and shape."""
        return device.type == "cpu" and self.fmt.packed_op(self.out_features)

    def _int4_layout(self) -> tuple[Tensor, Tensor]:
        """torch's int4 CPU layout: packed ``[out, in/2]`` and scale/zero ``bf16 [in/g, out, 2]``
        with ``W = (q - 8)·scale + zero``, so ``zero = offset + 8·scale``."""
        if self._int4_cache is None:
            scale = self.part("scale")
            codes = unpack_nibbles(self.part("packed")).to(torch.int32)
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            zero = self.part("offset") + 8 * scale
            sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
            self._int4_cache = (weight, sz)
        return self._int4_cache

    def forward(self, x: Tensor) -> Tensor:
        parts = self.kernel_parts() if self.kernel == "auto" else None
        if parts is not None and qops.kernel_applies(x, parts):
            y = qops.qlinear(x, parts)
            return y if self.bias is None else y + self.bias
        use_packed = self.kernel != "dequant" and self.packed_available(x.device)
        if self.kernel == "packed" and not use_packed:
            raise ValueError(f"no packed kernel for {self.fmt.name} [{self.out_features}, "
                             f"{self.in_features}] on {x.device.type}; use kernel='auto'")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not use_packed:
            return F.linear(x, self.dequantized(x.dtype), bias)
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.fmt.name == "int8":
            y = torch._weight_int8pack_mm(x2, self.part("q"), self.part("scale").to(torch.bfloat16))
        else:
            weight, sz = self._int4_layout()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight, self.fmt.group_size, sz)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias


class QuantEmbedding(_QuantWeight):
    """Embedding table ``[num, dim]`` stored row-wise quantised; ``ids [...] → [..., dim]``
    dequantises only the rows looked up; ``weight`` (the whole table) serves a tied head.
    ``kernel``: as :class:`QuantLinear`'s, for the tied head (``dequant``: always the float table).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: Format, device=None,
                 kernel: str = "auto") -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r} is not one of {', '.join(KERNELS)}")
        super().__init__(fmt, num_embeddings, embedding_dim, device)
        self.num_embeddings, self.embedding_dim, self.kernel = num_embeddings, embedding_dim, kernel

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, fmt: Format, kernel: str = "auto") -> QuantEmbedding:
        q = cls(emb.num_embeddings, emb.embedding_dim, fmt, device=emb.weight.device, kernel=kernel)
        q.set_weight(emb.weight)
        return q

    def as_head(self, h: Tensor) -> Tensor:
        """Logits of a tied head: ``h [..., dim] -> [..., num]`` (``h Wᵀ`` without a float table
        where the kernel applies: decoding steps, the last position of a prefill)."""
        parts = self.kernel_parts() if self.kernel == "auto" else None
        if parts is not None and qops.kernel_applies(h, parts):
            return qops.qlinear(h, parts)
        return F.linear(h, self.dequantized(h.dtype))

    def forward(self, ids: Tensor) -> Tensor:
        parts = self.kernel_parts()
        if parts is not None and ids.device.type == "cpu" and cpp_ext.available():
            return qops.qembedding(ids, parts)
        flat = ids.reshape(-1)
        rows = {name: part[flat] for name, part in self.parts().items()}
        return dequantize(rows, self.fmt).reshape(*ids.shape, self.embedding_dim)


class QuantExperts(nn.ModuleList):
    """The stacked expert matrices of an MoE (``W [E, in, out]``, used as ``x W_e``) stored as
    one ``QuantLinear`` (``[out, in]``, groups along ``in``) per expert; ``forward(e, x [n, in])
    -> [n, out]`` runs expert ``e``'s quantised kernel. ``weight``: the dequantised stack
    ``[E, in, out]`` float32, for code that reads it."""

    def __init__(self, n_experts: int, in_features: int, out_features: int, fmt: Format,
                 kernel: str = "auto", device=None) -> None:
        super().__init__(QuantLinear(in_features, out_features, fmt, False, kernel, device)
                         for _ in range(n_experts))
        self.fmt, self.in_features, self.out_features = fmt, in_features, out_features

    @classmethod
    def from_stacked(cls, w: Tensor, fmt: Format, kernel: str = "auto") -> QuantExperts:
        """Quantise ``w [E, in, out]`` (an MoE's ``w_in`` / ``w_out``)."""
        q = cls(w.shape[0], w.shape[1], w.shape[2], fmt, kernel, device=w.device)
        for e in range(len(q)):
            q.expert(e).set_weight(w[e].detach().t())
        return q

    def expert(self, e: int) -> QuantLinear:
        """Expert ``e``'s quantised matrix."""
        m = self[e]
        if not isinstance(m, QuantLinear):
            raise TypeError(f"expert {e} is a {type(m).__name__}, not a QuantLinear")
        return m

    # m(e, x), as an MoE calls its experts' projections (nn.ModuleList has no forward of its own)
    def forward(self, e: int, x: Tensor) -> Tensor:  # type: ignore[override]
        return self.expert(e)(x)

    @property
    def weight(self) -> Tensor:
        return torch.stack([self.expert(e).dequantized(torch.float32).t() for e in range(len(self))])

    def extra_repr(self) -> str:
        g = f", group_size={self.fmt.group_size}" if self.fmt.group_size else ""
        return f"{len(self)} experts, {self.in_features}, {self.out_features}, format={self.fmt.name}{g}"
