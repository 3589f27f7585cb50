"""QuantLinear / QuantEmbedding: outputs match the float modules within the format's error."""

import pytest
import torch
from torch import nn

from looplm.quant.formats import FORMATS, make_format
from looplm.quant.linear import QuantEmbedding, QuantLinear

# relative output error of a random 128-wide layer: quantisation error only
REL_TOL = {"int8": 0.02, "int4": 0.15, "fp8_e4m3": 0.06, "fp8_e5m2": 0.12, "fp4_mx": 0.25}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("kernel", ["auto", "dequant"])
def test_quant_linear_matches_float_linear(name, kernel):
    torch.manual_seed(0)
    lin = nn.Linear(128, 48, bias=True)
    q = QuantLinear.from_linear(lin, make_format(name), kernel=kernel)
    x = torch.randn(2, 3, 128)
    y = q(x)
    assert y.shape == (2, 3, 48) and y.dtype == x.dtype
    assert rel_err(y, lin(x)) < REL_TOL[name]
    # against the dequantised weight the only error left is the kernel's (bf16 activations)
    exact = nn.functional.linear(x, q.dequantized(), lin.bias)
    assert rel_err(y, exact) < (1e-2 if q.packed_available(x.device) and kernel == "auto" else 1e-6)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_packed_kernel_agrees_with_dequant_kernel(name):
    torch.manual_seed(1)
    lin = nn.Linear(256, 64, bias=False)
    packed = QuantLinear.from_linear(lin, make_format(name, 32 if name == "int4" else None), kernel="packed")
    ref = QuantLinear.from_linear(lin, make_format(name, 32 if name == "int4" else None), kernel="dequant")
    for rows in (1, 7):
        x = torch.randn(rows, 256)
        assert rel_err(packed(x), ref(x)) < 1e-2


def test_packed_kernel_refuses_unsupported_shape_and_state_dict_round_trip():
    lin = nn.Linear(64, 24, bias=False)  # int4's packed CPU op needs out % 16 == 0
    q = QuantLinear.from_linear(lin, make_format("int4", 32), kernel="packed")
    with pytest.raises(ValueError, match="no packed kernel"):
        q(torch.randn(1, 64))
    auto = QuantLinear.from_linear(nn.Linear(64, 32), make_format("int4", 32))
    y = auto(torch.randn(1, 64))  # builds the kernel layout cache
    fresh = QuantLinear.from_linear(nn.Linear(64, 32), make_format("int4", 32))
    fresh.load_state_dict(auto.state_dict())
    x = torch.randn(1, 64)
    assert torch.equal(fresh(x), auto(x)) and y.shape == (1, 32)


@pytest.mark.parametrize("name", FORMATS)
def test_quant_embedding_rows_and_tied_weight(name):
    emb = nn.Embedding(50, 64)
    q = QuantEmbedding.from_embedding(emb, make_format(name, 32 if name == "int4" else None))
    ids = torch.tensor([[3, 7, 3], [0, 49, 1]])
    out = q(ids)
    assert out.shape == (2, 3, 64)
    assert torch.equal(out, q.weight[ids])
    assert rel_err(out, emb(ids)) < REL_TOL[name]
