"""QAT on a LoopLM: the fake-quantised forward is the forward of the quantised checkpoint."""

import copy

import pytest
import torch

from looplm.model import LoopConfig, LoopLM
from looplm.quant.ptq import quantize_model
from looplm.quant.qat import apply_qat, remove_qat


@pytest.mark.parametrize("name, group, keep", [("int4", 32, False), ("fp4_mx", None, False),
                                               ("int4", 64, True)])
def test_qat_loopm_forward_matches_the_quantised_model_including_a_tied_head(name, group, keep):
    torch.manual_seed(0)
    model = LoopLM(LoopConfig(vocab_size=257, d_model=64, n_heads=4, n_core=2, n_recursions=2,
                              tie_embeddings=True, max_seq_len=32)).eval()
    kw = dict(group_size=group, keep_embeddings=keep, keep_head=keep)
    ids = torch.randint(0, 257, (2, 16))
    qat = apply_qat(copy.deepcopy(model), name, **kw)
    quantised = quantize_model(copy.deepcopy(model), name, kernel="dequant", **kw)
    with torch.no_grad():
        want, got, plain = quantised(ids).logits, qat(ids).logits, model(ids).logits
    assert not torch.allclose(want, plain, atol=1e-4)  # quantisation changes the logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert set(qat.state_dict()) == set(model.state_dict())
    torch.testing.assert_close(qat.embed.weight, quantised.embed.weight if not keep else model.embed.weight)
    qat(ids).logits.sum().backward()  # straight-through: the float table gets the gradient
    assert qat.embed._parameters["weight"].grad is not None
    remove_qat(qat)
    torch.testing.assert_close(qat(ids).logits, model(ids).logits)
