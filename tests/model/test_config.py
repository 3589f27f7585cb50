"""LoopConfig validation and dict round trips."""

from __future__ import annotations

import json

import pytest

from looplm.errors import ConfigError
from looplm.model import LoopConfig, LoopLM
from tests.model.util import tiny

BAD = [  # (override, word the message must name)
    ({"mixer": "mamba"}, "mixer"),
    ({"ffn": "moe", "n_experts": 2, "top_k": 3}, "top_k"),
    ({"n_recursions": 0}, "n_recursions"),
    ({"n_heads": 3}, "n_heads"),
    ({"n_kv_heads": 3, "n_heads": 4}, "n_kv_heads"),
    ({"router": "expert_choice", "n_recursions": 1}, "router"),
    ({"router": "oracle", "n_recursions": 2}, "router"),
    ({"sharing": "middle_cycle", "n_prelude": 0}, "middle_cycle"),
    ({"n_recursions": 3, "capacity": [1.0, 0.5]}, "capacity"),
    ({"n_recursions": 2, "capacity": [0.5, 1.0]}, "capacity"),
    ({"n_recursions": 2, "capacity": [1.0, 0.0]}, "capacity"),
    ({"selection": "sample"}, "selection"),
    ({"threshold": 1.0}, "threshold"),
    ({"d_model": 0}, "d_model"),
    ({"n_core": 0}, "n_core"),
    ({"n_prelude": -1}, "n_prelude"),
    ({"dropout": 1.0}, "dropout"),
    ({"z_loss_weight": -1.0}, "z_loss_weight"),
    ({"kv_sharing": "yes"}, "kv_sharing"),
    ({"d_model": "32"}, "d_model"),
]


@pytest.mark.parametrize("override,word", BAD)
def test_invalid_config_raises_one_clear_error(override, word):
    with pytest.raises(ConfigError, match=word):
        tiny(**override)


def test_round_trip_through_json():
    c = tiny(router="expert_choice", n_recursions=3, capacity=[1, 0.5, 0.25], ffn="moe", n_experts=4)
    again = LoopConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c


def test_unknown_key_names_close_match():
    with pytest.raises(ConfigError, match="n_recursion.*did you mean n_recursions"):
        LoopConfig.from_dict({"n_recursion": 2})


def test_defaults_build_a_vanilla_transformer():
    c = LoopConfig(vocab_size=50, d_model=32, n_heads=2, n_core=2)
    m = LoopLM(c)
    assert m.router is None and all(b.is_attention for b in m.core)
    assert c.keep_fractions == [1.0]


def test_hierarchical_capacity_and_hybrid_layout():
    c = tiny(n_recursions=3, router="expert_choice", mixer="gla", attn_every=2)
    assert c.keep_fractions == pytest.approx([1, 2 / 3, 1 / 3])
    assert [c.layer_mixer(i) for i in range(4)] == ["gla", "attention", "gla", "attention"]
