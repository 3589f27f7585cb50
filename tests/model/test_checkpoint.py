"""save_model / load_model: exact round trip, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from looplm.checkpoint import load_model, save_model
from looplm.errors import CheckpointError
from tests.model.util import model, tokens


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_reproduces_logits(tmp_path, tie):
    m = model(router="expert_choice", n_recursions=2, ffn="moe", n_experts=2, top_k=1,
              mixer="gated_deltanet", attn_every=2, tie_embeddings=tie)
    save_model(m, tmp_path / "ck")
    again = load_model(tmp_path / "ck").eval()
    x = tokens()
    assert torch.equal(m(x).logits, again(x).logits)
    assert again.config == m.config
    if tie:
        assert again.head is None


def test_mismatched_config_names_the_parameters(tmp_path):
    save_model(model(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_core"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing core.2"):
        load_model(tmp_path)
    cfg["n_core"], cfg["d_model"] = 2, 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="embed.weight has shape"):
        load_model(tmp_path)


@pytest.mark.parametrize("damage", ["no_dir", "no_config", "no_weights", "bad_json", "bad_key", "garbage"])
def test_broken_checkpoints_raise_checkpoint_error(tmp_path, damage):
    save_model(model(), tmp_path / "ck")
    ck = tmp_path / "ck"
    if damage == "no_dir":
        ck = tmp_path / "missing"
    elif damage == "no_config":
        (ck / "config.json").unlink()
    elif damage == "no_weights":
        (ck / "model.safetensors").unlink()
    elif damage == "bad_json":
        (ck / "config.json").write_text("{not json")
    elif damage == "bad_key":
        (ck / "config.json").write_text(json.dumps({"d_modle": 32}))
    else:
        (ck / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError):
        load_model(ck)
