"""bfloat16 autocast (the trainer's --bf16 option) works for every mixer; the recurrent
state of fixed-state mixers stays in the parameters' dtype."""

import pytest
import torch

from looplm.model import MIXERS, LoopConfig, LoopLM


@pytest.mark.parametrize("mixer", MIXERS)
def test_bf16_autocast_forward_backward(mixer: str) -> None:
    torch.manual_seed(0)
    cfg = LoopConfig(vocab_size=64, d_model=32, n_heads=2, n_core=2, mixer=mixer,
                     n_recursions=2, router="expert_choice")
    model = LoopLM(cfg)
    x = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        ref = model(x, targets=x).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, targets=x)
    (out.loss + out.aux_loss).backward()
    assert torch.isfinite(out.loss)
    assert abs(float(out.loss) - float(ref)) < 0.05  # bf16 matmuls, same model
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        state = model(x, use_cache=True).state
    for layer_state in state.layers.values():
        ssm = getattr(layer_state, "ssm", None)
        if ssm is not None:
            assert ssm.dtype == torch.float32
