"""transformers integration: Auto* loading of a looplm checkpoint, logits, greedy tokens, round trip."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from looplm.checkpoint import save_model
from looplm.errors import ConfigError
from looplm.generate import generate_ids
from looplm.hf import LoopLMCache, LoopLMForCausalLM, LoopLMHFConfig
from looplm.model import LoopConfig, LoopLM

BASE = dict(vocab_size=259, d_model=32, n_heads=2, n_core=2, tie_embeddings=False, init_std=0.2)
CONFIGS = {
    "gated_deltanet_moe": dict(mixer="gated_deltanet", ffn="moe", n_experts=4, top_k=3),
    "hybrid_expert_choice": dict(mixer="retention", attn_every=2, n_prelude=1, n_coda=1,
                                 sharing="middle_cycle", n_recursions=3, router="expert_choice"),
    "attention_tied": dict(mixer="attention", tie_embeddings=True),
}


def saved(tmp_path, name):
    torch.manual_seed(0)
    model = LoopLM(LoopConfig(**{**BASE, **CONFIGS[name]})).eval()
    save_model(model, tmp_path)
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_auto_loads_a_looplm_checkpoint_with_equal_logits_and_greedy_tokens(tmp_path, name):
    model = saved(tmp_path, name)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(hf, LoopLMForCausalLM) and hf.generation_config.top_k is None
    assert hf.model.config == model.config
    x = torch.tensor([[5, 9, 20, 31, 7, 3], [1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(hf(x).logits, model(x).logits)
    # left-padded batch: transformers' attention_mask -> looplm's mask
    rows = [[7, 3, 100], [5, 9, 20, 31, 7, 3]]
    ids = torch.tensor([[0, 0, 0, 7, 3, 100], rows[1]])
    attn = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    out = hf.generate(ids, attention_mask=attn, max_new_tokens=8, do_sample=False)
    want = generate_ids(model, rows, max_new_tokens=8)
    assert out[:, 6:].tolist() == want
    assert len(set(want[0])) > 1


def test_save_pretrained_round_trip_and_loss(tmp_path):
    saved(tmp_path / "a", "gated_deltanet_moe")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    hf.save_pretrained(tmp_path / "b")
    assert AutoConfig.from_pretrained(tmp_path / "b").moe_top_k == 3
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    x = torch.randint(0, 259, (2, 10))
    with torch.no_grad():
        a, b = hf(x, labels=x), again(x, labels=x)
        ref = hf.model(x, torch.cat([x[:, 1:], torch.full((2, 1), -100)], 1))
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, ref.loss)


def test_cache_carries_the_state():
    torch.manual_seed(0)
    hf = LoopLMForCausalLM(LoopLMHFConfig.from_loop_config(LoopConfig(**BASE, mixer="gla"))).eval()
    x = torch.randint(0, 259, (1, 9))
    with torch.no_grad():
        full = hf(x).logits
        out = hf(x[:, :5], use_cache=True)
        assert isinstance(out.past_key_values, LoopLMCache)
        assert out.past_key_values.get_seq_length() == 5
        step = hf(x[:, 5:], past_key_values=out.past_key_values).logits
    torch.testing.assert_close(step, full[:, 5:], rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="beam"):
        out.past_key_values.reorder_cache(torch.tensor([0]))


def test_invalid_config_fails_clearly():
    with pytest.raises(ConfigError, match="mixer"):
        LoopLMHFConfig(mixer="lstm").to_loop_config()
