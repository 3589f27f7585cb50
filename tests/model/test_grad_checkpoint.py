"""grad_checkpoint=true recomputes each layer in the backward: loss and gradients unchanged."""

from __future__ import annotations

import pytest
import torch

from looplm.errors import ConfigError
from tests.model.util import model, tokens

CASES = {
    "attention": dict(mixer="attention"),
    "gated_deltanet": dict(mixer="gated_deltanet"),
    "hybrid_moe": dict(mixer="gated_deltanet", attn_every=2, ffn="moe", n_experts=3, top_k=2),
    "mor": dict(mixer="attention", n_recursions=3, router="expert_choice", kv_sharing=True),
    "mor_gdn": dict(mixer="gated_deltanet", n_recursions=2, router="token_choice"),
    "mor_lora": dict(mixer="attention", n_recursions=3, lora_rank=2),  # one adapter per recursion
    "mod_halting": dict(layer_router="mod", mod_capacity=0.5, n_recursions=3, router="halting"),
    "moe_recurrent_mom": dict(mixer="mom", ffn="moe", n_experts=3, top_k=2, moe_router="recurrent"),
}


def _grads(m, x):
    m.zero_grad(set_to_none=True)
    out = m(x, x)
    (out.loss + out.aux_loss).backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_equal_without_checkpointing(name):
    m = model(**CASES[name]).train()
    with torch.no_grad():  # LoRA's B starts at zero: make each recursion's adapter matter
        for n, p in m.named_parameters():
            if "lora_b" in n:
                p.normal_(std=0.1)
    x = tokens(length=16)
    loss, grads = _grads(m, x)
    m.config.grad_checkpoint = True
    calls = []
    for layer in [*m.prelude, *m.core, *m.coda]:  # the recompute really runs: count layer calls
        layer.register_forward_pre_hook(lambda *a: calls.append(1))
    loss_ck, grads_ck = _grads(m, x)
    n_runs = len(m.prelude) + len(m.coda) + len(m.core) * m.config.n_recursions
    assert len(calls) == 2 * n_runs  # each layer application ran again in the backward
    torch.testing.assert_close(loss_ck, loss, atol=0, rtol=0)
    assert grads_ck.keys() == grads.keys()
    for key in grads:
        torch.testing.assert_close(grads_ck[key], grads[key], atol=1e-6, rtol=1e-5, msg=key)


def test_no_checkpointing_in_eval_or_decoding():
    m = model(grad_checkpoint=True)
    calls = []
    for layer in m.core:
        layer.register_forward_pre_hook(lambda *a: calls.append(1))
    out = m(tokens(length=8), use_cache=True)
    assert out.state is not None and len(calls) == len(m.core)


def test_bad_value():
    with pytest.raises(ConfigError, match="grad_checkpoint"):
        model(grad_checkpoint="yes")
