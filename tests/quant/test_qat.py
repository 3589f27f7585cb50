"""QAT: fake-quantised forward, straight-through gradients, and QAT-then-quantise beats PTQ."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from looplm.quant.formats import FORMATS, fake_quantize
from looplm.quant.ptq import quantize_model
from looplm.quant.qat import QATEmbedding, QATLinear, apply_qat, remove_qat


@pytest.mark.parametrize("name", FORMATS)
def test_qat_linear_forward_is_fake_quantised_and_gradient_straight_through(name):
    torch.manual_seed(0)
    model = apply_qat(nn.Sequential(nn.Linear(64, 32)), name, group_size=32 if name == "int4" else None)
    lin = model[0]
    assert isinstance(lin, QATLinear)
    x = torch.randn(5, 64, requires_grad=True)
    y = lin(x)
    w_hat = fake_quantize(lin.weight, lin.qat_format).requires_grad_(True)
    ref = F.linear(x, w_hat, lin.bias)
    assert torch.allclose(y, ref) and not torch.equal(w_hat, lin.weight)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    assert torch.allclose(lin.weight.grad, w_hat.grad)  # dL/dW = dL/dŴ


def test_qat_embedding_and_remove_qat_restore_plain_modules():
    model = nn.ModuleDict({"embed": nn.Embedding(10, 32), "proj": nn.Linear(32, 32)})
    apply_qat(model, "int8", keep_embeddings=False)
    assert isinstance(model["embed"], QATEmbedding) and model.qat_format.name == "int8"
    ids = torch.tensor([1, 4])
    assert torch.equal(model["embed"](ids), fake_quantize(model["embed"].weight, model.qat_format)[ids])
    keys = set(model.state_dict())
    remove_qat(model)
    assert type(model["embed"]) is nn.Embedding and type(model["proj"]) is nn.Linear
    assert set(model.state_dict()) == keys and not hasattr(model, "qat_format")


def _fit(model, x, y, steps, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        decay.step()
    return model


@pytest.mark.parametrize("name, group", [("int4", 64), ("fp4_mx", None)])
def test_qat_then_quantise_beats_post_training_quantisation_at_4_bits(name, group):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64))
    x = torch.randn(256, 64)
    with torch.no_grad():
        y = teacher(x)
    student = _fit(nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64)), x, y, 300, 3e-3)

    def quant_loss(m):
        q = quantize_model(copy.deepcopy(m), name, group_size=group, kernel="dequant")
        with torch.no_grad():
            return F.mse_loss(q(x), y).item()

    ptq = quant_loss(student)
    qat = apply_qat(copy.deepcopy(student), name, group_size=group)
    qat = remove_qat(_fit(qat, x, y, 100, 1e-3))
    with torch.no_grad():
        float_loss = F.mse_loss(student(x), y).item()
    assert float_loss < ptq / 2  # quantisation, not fitting, dominates the PTQ loss
    assert quant_loss(qat) < 0.75 * ptq
