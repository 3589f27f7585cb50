"""Low-precision weight formats: quantise a matrix ``W [out, in]`` to packed parts and back.

Formats (docs/mechanisms.md §4.1; error bounds are per element, for finite inputs):

- ``int8``: symmetric, one scale per output row or per group of ``g`` inputs (a multiple of 32:
  llama.cpp's Q8_0 is ``g = 32``), ``s = max|W| / 127`` over the row or group, ``q = round(W/s)``,
  ``|W - s·q| ≤ s/2``. Per row, ``s`` is rounded *up* to a bfloat16 value (so torch's packed CPU
  kernel, which takes bf16 scales, sees the exact scale) and stored ``[out]``; in groups it is
  float32 ``[out, in/g]``.
- ``int4``: per group of ``g`` inputs (32/64/128), ``q ∈ [0, 15]``, ``W ≈ offset + s·q``;
  with a zero point ``s = (max - min)/15, offset = min``; without, ``s = max|W|/7,
  offset = -8s``. ``|W - Ŵ| ≤ s/2``. Two codes per byte, low nibble first.
- ``fp8_e4m3`` / ``fp8_e5m2``: per output row ``s = max|W_row| / fmax`` (448 / 57344), the
  elements ``W/s`` rounded to nearest-even in torch's ``float8_e4m3fn`` / ``float8_e5m2``
  (saturating at ±fmax). Relative error ≤ 2^-4 (E4M3) / 2^-3 (E5M2) above the subnormal
  range, absolute ≤ half a subnormal step·s below it.
- ``fp4_mx``: OCP MX format (the spec's "block" is a group here): 32 consecutive inputs share a
  power-of-two scale ``2^(floor(log2 max|x|) - 2)`` stored as E8M0 (biased by 127); each element is E2M1
  (magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}, round to nearest even, saturating at 6). With
  ``x = W/scale``: ``|x - x̂| ≤ 0.25`` for |x| ≤ 2, ``≤ 0.5`` up to 4, ``≤ 1`` up to 6, and
  ``< 2`` above 6 (|x| < 8 by the scale rule; the spec saturates these).

FP4 and int4 are hand-written: torch has no CPU E2M1 cast and torchao's MX/int4 tensors target
CUDA kernels; the packed layouts here are plain (two nibbles per byte) so they round-trip
through safetensors and are converted to the kernels' layouts at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from looplm.errors import ConfigError
from looplm.ops import kv_quant, qlinear

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # E2M1 magnitudes by code 0..7
MX_GROUP = 32
GROUP_SIZES = (32, 64, 128)  # int4's
INT8_GROUP = 32  # int8 group sizes are multiples of this (the kernels' activation group)
PartShapes = dict[str, tuple[tuple[int, ...], torch.dtype]]  # part name -> (shape, dtype)


@dataclass(frozen=True)
class Format:
    """A quantisation format: one subclass per format, registered by name (``make_format``).

    A subclass states its ``name``, the ``parts`` it stores (tensor names, in the order the
    kernels take them), ``bits`` (storage bits per weight, scales included; per-row scales count
    as ~0), ``quantize`` / ``dequantize``, the shapes and dtypes of its parts (the checkpoint
    layout: ``<module>.<part>`` in model.safetensors) and ``packed_op`` (whether torch's packed
    CPU matmul takes it). ``group_size``: inputs per scale (None: one scale per output row).
    """

    name: ClassVar[str]
    parts: ClassVar[tuple[str, ...]]
    group_size: int | None = None
    zero_point: bool = False

    @property
    def bits(self) -> float:
        raise NotImplementedError

    @classmethod
    def make(cls, group_size: int | None, zero_point: bool) -> Format:
        """The format with these options, validated (``make_format`` calls it)."""
        if group_size is not None:
            raise ConfigError(f"{cls.name} has one scale per output row; drop group_size={group_size}")
        return cls()

    def quantize(self, w: Tensor) -> dict[str, Tensor]:
        """``w [out, in]`` float -> the named parts to store."""
        raise NotImplementedError

    def dequantize(self, parts: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
        """The parts back to a ``[out, in]`` matrix of ``dtype``."""
        raise NotImplementedError

    def part_shapes(self, out_features: int, in_features: int) -> PartShapes:
        """Name -> (shape, dtype) of the stored parts of a ``[out, in]`` weight."""
        raise NotImplementedError

    def supports(self, out_features: int, in_features: int) -> bool:
        """Whether a ``[out, in]`` weight can be stored (groups and nibble pairs must divide ``in``)."""
        return self.group_size is None or in_features % self.group_size == 0

    def packed_op(self, out_features: int) -> bool:
        """Whether torch's packed weight-only CPU matmul runs this format (quant/linear.py)."""
        return False


FORMAT_CLASSES: dict[str, type[Format]] = {}


def register(cls: type[Format]) -> type[Format]:
    """Class decorator: make ``cls`` known to ``make_format`` under ``cls.name``."""
    FORMAT_CLASSES[cls.name] = cls
    return cls


def make_format(name: str, group_size: int | None = None, zero_point: bool = True) -> Format:
    """The registered format ``name`` with its options (int4: group 32/64/128, default 64; int8:
    none, one scale per row, or a multiple of 32; ``zero_point`` applies to int4 only);
    ConfigError naming the known formats otherwise."""
    cls = FORMAT_CLASSES.get(name)
    if cls is None:
        raise ConfigError(f"format={name!r} is not one of {', '.join(FORMAT_CLASSES)}")
    return cls.make(group_size, zero_point)


# ---------------------------------------------------------------- packing


def pack_nibbles(codes: Tensor) -> Tensor:
    """``codes [..., n]`` integers in [0, 15], n even → ``uint8 [..., n/2]`` (low nibble first)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"the last dimension ({codes.shape[-1]}) must be even to pack two per byte")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of ``pack_nibbles``: ``uint8 [..., m]`` → ``uint8 [..., 2m]``."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


# ---------------------------------------------------------------- int8 / int4


def _bf16_ceil(x: Tensor) -> Tensor:
    """Smallest bfloat16-representable float32 ≥ x (x ≥ 0)."""
    b = x.to(torch.bfloat16)
    b = torch.where(b.float() < x, torch.nextafter(b, b.new_full((), float("inf"))), b)
    return b.float()


def quantize_int8(w: Tensor, group_size: int | None = None) -> dict[str, Tensor]:
    """``w [out, in]`` → ``q int8 [out, in]`` and ``scale float32``: ``[out]`` (bf16-exact) per
    row, ``[out, in/group_size]`` in groups."""
    if group_size is None:
        w = w.float()
        scale = _bf16_ceil(w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.bfloat16).tiny)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return {"q": q, "scale": scale}
    wg = _groups(w, group_size)
    scale = (wg.abs().amax(-1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(wg / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return {"q": q.flatten(1), "scale": scale}


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return qlinear.dequantized([q, scale], dtype)


def _groups(w: Tensor, g: int) -> Tensor:
    out, n = w.shape
    if n % g:
        raise ValueError(f"in_features={n} is not a multiple of group_size={g}; pick a size dividing it")
    return w.float().reshape(out, n // g, g)


def quantize_int4(w: Tensor, group_size: int = 64, zero_point: bool = True) -> dict[str, Tensor]:
    """``w [out, in]`` → ``packed uint8 [out, in/2]``, ``scale, offset float32 [out, in/g]``."""
    wg = _groups(w, group_size)
    tiny = torch.finfo(torch.float32).tiny
    if zero_point:
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=tiny)
        offset = lo
    else:
        scale = (wg.abs().amax(-1) / 7).clamp(min=tiny)
        offset = -8 * scale
    q = torch.round((wg - offset[..., None]) / scale[..., None]).clamp(0, 15)
    return {"packed": pack_nibbles(q.flatten(1)), "scale": scale, "offset": offset}


def dequantize_int4(
    packed: Tensor, scale: Tensor, offset: Tensor, dtype: torch.dtype = torch.float32
) -> Tensor:
    return qlinear.dequantized([packed, scale, offset], dtype)


# ---------------------------------------------------------------- FP8


def quantize_fp8(w: Tensor, name: str = "fp8_e4m3") -> dict[str, Tensor]:
    """``w [out, in]`` → ``q float8 [out, in]`` (saturated, RNE), ``scale float32 [out]``: the
    per-row quantiser of the decoding state (:func:`looplm.ops.kv_quant.quantize_rows`)."""
    q, scale = kv_quant.quantize_rows(w, FP8_DTYPES[name])
    return {"q": q, "scale": scale.squeeze(-1)}


def cast_fp8(x: Tensor, name: str) -> Tensor:
    """Round ``x`` to the FP8 format ``name`` with saturation to ±max (NaN stays NaN)."""
    fmax = FP8_MAX[name]
    return x.float().clamp(-fmax, fmax).to(FP8_DTYPES[name])


def dequantize_fp8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return q.to(dtype) * scale.to(dtype)[:, None]


# ---------------------------------------------------------------- FP4 (E2M1) in MX groups

_FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def fp4_encode(x: Tensor) -> Tensor:
    """Round ``x`` (already scaled) to E2M1 codes ``uint8`` in [0, 15]: sign bit 3, magnitude
    code 0..7; round to nearest, ties to the even code; saturates at ±6."""
    a = x.abs().float()
    mids = torch.tensor(_FP4_MIDPOINTS, device=x.device)
    idx = torch.bucketize(a, mids)  # a == mids[i] -> i (the lower neighbour)
    tie = (a == mids[idx.clamp(max=len(_FP4_MIDPOINTS) - 1)]) & (idx % 2 == 1)
    idx = (idx + tie.long()).clamp(max=7)
    sign = (x < 0) & (idx > 0)  # -0 encodes as +0
    return (idx + 8 * sign.long()).to(torch.uint8)


def fp4_decode(codes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    table = torch.tensor(FP4_VALUES + tuple(-v for v in FP4_VALUES), dtype=dtype, device=codes.device)
    return table[codes.long()]


def quantize_fp4_mx(w: Tensor) -> dict[str, Tensor]:
    """``w [out, in]`` → ``packed uint8 [out, in/2]``, ``exponent uint8 [out, in/32]`` (E8M0)."""
    wb = _groups(w, MX_GROUP)
    amax = wb.abs().amax(-1)
    exp = torch.floor(torch.log2(amax.clamp(min=2.0**-127))) - 2  # E2M1's emax = 2
    exp = exp.clamp(-127, 127)
    codes = fp4_encode(wb * torch.exp2(-exp)[..., None])
    return {"packed": pack_nibbles(codes.flatten(1)), "exponent": (exp + 127).to(torch.uint8)}


def dequantize_fp4_mx(packed: Tensor, exponent: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    out, groups = exponent.shape
    vals = fp4_decode(unpack_nibbles(packed), torch.float32).reshape(out, groups, MX_GROUP)
    return (vals * torch.exp2(exponent.float() - 127)[..., None]).flatten(1).to(dtype)


# ---------------------------------------------------------------- the formats


@register
@dataclass(frozen=True)
class Int8(Format):
    """Symmetric int8, one scale per output row (``group_size`` None) or per group of inputs."""

    name: ClassVar[str] = "int8"
    parts: ClassVar[tuple[str, ...]] = ("q", "scale")

    @classmethod
    def make(cls, group_size: int | None, zero_point: bool) -> Format:
        if group_size is not None and (group_size <= 0 or group_size % INT8_GROUP):
            raise ConfigError(f"group_size={group_size} for int8 must be a positive multiple of {INT8_GROUP} "
                              "(or none: one scale per output row)")
        return cls(group_size)

    @property
    def bits(self) -> float:
        return 8.0 + (32.0 / self.group_size if self.group_size else 0.0)

    def quantize(self, w: Tensor) -> dict[str, Tensor]:
        return quantize_int8(w, self.group_size)

    def dequantize(self, parts: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_int8(parts["q"], parts["scale"], dtype)

    def part_shapes(self, out_features: int, in_features: int) -> PartShapes:
        scale = (out_features,) if self.group_size is None else (out_features, in_features // self.group_size)
        return {"q": ((out_features, in_features), torch.int8), "scale": (scale, torch.float32)}

    def packed_op(self, out_features: int) -> bool:
        return self.group_size is None  # torch's int8 CPU op takes one scale per row


@register
@dataclass(frozen=True)
class Int4(Format):
    """Group-wise int4 with an offset (``zero_point``) or symmetric, two codes per byte."""

    name: ClassVar[str] = "int4"
    parts: ClassVar[tuple[str, ...]] = ("packed", "scale", "offset")
    group_size: int = 64  # always a size: make() gives None its default
    zero_point: bool = True

    @classmethod
    def make(cls, group_size: int | None, zero_point: bool) -> Format:
        group_size = 64 if group_size is None else group_size
        if group_size not in GROUP_SIZES:
            raise ConfigError(f"group_size={group_size} for int4 must be one of {GROUP_SIZES}")
        return cls(group_size, zero_point)

    @property
    def bits(self) -> float:
        return 4.0 + 32.0 * (2 if self.zero_point else 1) / self.group_size

    def quantize(self, w: Tensor) -> dict[str, Tensor]:
        return quantize_int4(w, self.group_size, self.zero_point)

    def dequantize(self, parts: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_int4(parts["packed"], parts["scale"], parts["offset"], dtype)

    def part_shapes(self, out_features: int, in_features: int) -> PartShapes:
        g = (out_features, in_features // self.group_size)
        return {"packed": ((out_features, in_features // 2), torch.uint8), "scale": (g, torch.float32),
                "offset": (g, torch.float32)}

    def packed_op(self, out_features: int) -> bool:
        return out_features % 16 == 0  # torch's int4 CPU layout packs 16 output rows


@dataclass(frozen=True)
class _FP8(Format):
    """FP8 codes with one float32 scale per output row."""

    parts: ClassVar[tuple[str, ...]] = ("q", "scale")

    @property
    def bits(self) -> float:
        return 8.0

    def quantize(self, w: Tensor) -> dict[str, Tensor]:
        return quantize_fp8(w, self.name)

    def dequantize(self, parts: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_fp8(parts["q"], parts["scale"], dtype)

    def part_shapes(self, out_features: int, in_features: int) -> PartShapes:
        return {"q": ((out_features, in_features), FP8_DTYPES[self.name]),
                "scale": ((out_features,), torch.float32)}


@register
@dataclass(frozen=True)
class FP8E4M3(_FP8):
    name: ClassVar[str] = "fp8_e4m3"


@register
@dataclass(frozen=True)
class FP8E5M2(_FP8):
    name: ClassVar[str] = "fp8_e5m2"


@register
@dataclass(frozen=True)
class FP4MX(Format):
    """E2M1 codes in OCP MX groups of 32 with a shared E8M0 exponent."""

    name: ClassVar[str] = "fp4_mx"
    parts: ClassVar[tuple[str, ...]] = ("packed", "exponent")
    group_size: int | None = MX_GROUP

    @classmethod
    def make(cls, group_size: int | None, zero_point: bool) -> Format:
        if group_size not in (None, MX_GROUP):
            raise ConfigError(f"fp4_mx uses MX groups of {MX_GROUP}; drop group_size={group_size}")
        return cls()

    @property
    def bits(self) -> float:
        return 4.0 + 8.0 / MX_GROUP

    def quantize(self, w: Tensor) -> dict[str, Tensor]:
        return quantize_fp4_mx(w)

    def dequantize(self, parts: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_fp4_mx(parts["packed"], parts["exponent"], dtype)

    def part_shapes(self, out_features: int, in_features: int) -> PartShapes:
        return {"packed": ((out_features, in_features // 2), torch.uint8),
                "exponent": ((out_features, in_features // MX_GROUP), torch.uint8)}


FORMATS = tuple(FORMAT_CLASSES)  # the built-in formats, for CLI choices and test matrices


# ---------------------------------------------------------------- by format


def quantize(w: Tensor, fmt: Format) -> dict[str, Tensor]:
    """Quantise ``w [out, in]`` in format ``fmt``; returns the named parts to store."""
    if w.dim() != 2:
        raise ValueError(f"expected a weight matrix [out, in], got shape {tuple(w.shape)}")
    return fmt.quantize(w)


def dequantize(parts: dict[str, Tensor], fmt: Format, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of ``quantize``: the parts back to a ``[out, in]`` matrix of ``dtype``."""
    return fmt.dequantize(parts, dtype)


def fake_quantize(w: Tensor, fmt: Format) -> Tensor:
    """``dequantize(quantize(w))`` in ``w``'s dtype (no gradient; see qat.py for the STE)."""
    with torch.no_grad():
        return dequantize(quantize(w, fmt), fmt, w.dtype)
