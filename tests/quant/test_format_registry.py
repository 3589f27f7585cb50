"""The format registry: every format is one class, found by name; a new one needs nothing else."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import Tensor

from looplm.checkpoint import load_model, save_model
from looplm.errors import ConfigError
from looplm.model import LoopConfig, LoopLM
from looplm.quant import formats as qf
from looplm.quant.ptq import quantize_model


@pytest.mark.parametrize("name", qf.FORMATS)
def test_part_shapes_are_what_quantize_stores(name: str) -> None:
    fmt = qf.make_format(name)
    parts = fmt.quantize(torch.randn(48, 128))
    assert tuple(parts) == fmt.parts
    assert {k: (tuple(v.shape), v.dtype) for k, v in parts.items()} == fmt.part_shapes(48, 128)
    assert fmt.dequantize(parts).shape == (48, 128)
    assert 4.0 <= fmt.bits <= 8.0


def test_unknown_format_is_one_config_error_listing_the_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        qf.make_format("int3")
    assert all(name in str(err.value) for name in qf.FORMATS)
    with pytest.raises(ConfigError, match="group_size"):
        qf.make_format("int8", 48)


@dataclass(frozen=True)
class BF16(qf.Format):
    """A format written as a test would add one: weights rounded to bfloat16."""

    name: ClassVar[str] = "bf16_test"
    parts: ClassVar[tuple[str, ...]] = ("w",)

    @property
    def bits(self) -> float:
        return 16.0

    def quantize(self, w: Tensor) -> dict[str, Tensor]:
        return {"w": w.to(torch.bfloat16)}

    def dequantize(self, parts: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
        return parts["w"].to(dtype)

    def part_shapes(self, out_features: int, in_features: int) -> qf.PartShapes:
        return {"w": ((out_features, in_features), torch.bfloat16)}


def test_a_new_format_is_one_class(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Registering the class is all it takes for PTQ, checkpoints and loading."""
    monkeypatch.setitem(qf.FORMAT_CLASSES, BF16.name, BF16)
    torch.manual_seed(0)
    model = LoopLM(LoopConfig(vocab_size=64, d_model=64, n_heads=2, n_core=2, mixer="gla")).eval()
    ids = torch.randint(0, 64, (1, 12))
    quantize_model(model, "bf16_test")
    assert model.quantization["format"] == "bf16_test" and model.quantization["modules"]
    save_model(model, tmp_path)
    loaded = load_model(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
