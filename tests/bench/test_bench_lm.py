"""`looplm bench lm --quick` end to end; training stops at the FLOPs budget the model counts."""

import json

import pytest
import torch

from looplm.bench.lm import VARIANTS, model_config
from looplm.bench.runner import lr_at, step_flops, train_model
from looplm.cli import main
from looplm.model import LoopConfig, LoopLM

MODELS = ["transformer", "mor_expert", "mor_token_kv", "moe"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    args = ["bench", "lm", "--quick", "--threads", "1", "--out", str(out), "--models", *MODELS]
    assert main(args) == 0
    return json.loads((out / "lm.json").read_text()), out


def test_every_model_reaches_the_same_budget_and_is_plotted(quick):
    data, out = quick
    budget = data["settings"]["flops"]
    assert set(data["results"]) == set(MODELS)
    for r in data["results"].values():
        overshoot = r["flops"] - budget
        assert 0 <= overshoot <= r["flops_per_token"] * r["tokens"] / r["steps"] * 1.01
        assert 0 < r["val_bpb"] < 10 and r["tokens_per_s"] > 0
        assert len(r["curve"]) == 4 and r["curve"][-1]["val_bpb"] == r["val_bpb"]
    res = data["results"]
    assert res["mor_expert"]["params_unique"] < res["transformer"]["params_unique"]
    assert res["mor_expert"]["flops_per_token"] < res["transformer"]["flops_per_token"]
    assert (out / "lm.png").stat().st_size > 1000


def test_variants_differ_as_documented():
    s = {"d_model": 64, "n_heads": 2, "seq_len": 32}
    cfgs = {name: model_config(name, s, 259) for name in VARIANTS}
    assert cfgs["moe"].ffn_dim * 2 == cfgs["transformer"].ffn_dim
    assert cfgs["mor_token_kv"].kv_sharing and not cfgs["mor_token"].kv_sharing
    depth = {n: c.n_prelude + c.n_core * c.n_recursions + c.n_coda for n, c in cfgs.items()}
    assert set(depth.values()) == {6}


def test_train_model_stops_at_the_counted_budget():
    torch.manual_seed(0)
    model = LoopLM(LoopConfig(vocab_size=32, d_model=16, n_heads=2, n_core=1, max_seq_len=8))
    x = torch.randint(0, 32, (2, 8))
    per_step = step_flops(model, x, x)
    seen = []
    res = train_model(model, lambda step: (x, x), budget=3.5 * per_step, hook=lambda f, t: seen.append(f),
                      hook_at=(0.25, 0.5, 0.55))
    assert res.steps == 4 and res.flops == pytest.approx(4 * per_step)
    assert seen == pytest.approx([per_step, 2 * per_step])  # 0.5 and 0.55 both passed at step 2
    assert train_model(model, lambda step: (x, x), steps=2).steps == 2
    with pytest.raises(ValueError, match="budget"):
        train_model(model, lambda step: (x, x))


def test_schedule_warms_up_then_decays():
    lrs = [lr_at(f / 100, 1.0) for f in range(101)]
    assert lrs[0] < lrs[5] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:])) and lrs[-1] == pytest.approx(0.1)
