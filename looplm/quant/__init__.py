"""Low precision: weight formats (int8, int4, FP8, FP4-MX), quantised modules and checkpoints,
quantisation-aware training and decoding-state quantisation (docs/mechanisms.md §4)."""

from looplm.quant.formats import FORMATS, Format, dequantize, fake_quantize, make_format, quantize
from looplm.quant.linear import QuantEmbedding, QuantLinear
from looplm.quant.ptq import quantize_model
from looplm.quant.qat import apply_qat, remove_qat

__all__ = ["FORMATS", "Format", "QuantEmbedding", "QuantLinear", "apply_qat", "dequantize", "fake_quantize",
           "make_format", "quantize", "quantize_model", "remove_qat"]
