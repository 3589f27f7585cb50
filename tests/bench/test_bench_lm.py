"""`looplm bench lm --quick` end to end; training stops at the FLOPs budget the model counts; the
statistics (verdicts, scaling fit) on known inputs; shards merge into one table."""

import json
import math

import numpy as np
import pytest
import torch

from looplm.bench import lm_stats
from looplm.bench.lm import SCALING_AT, VARIANTS, model_config, parse_shard
from looplm.bench.runner import lr_at, step_flops, train_model
from looplm.cli import main
from looplm.errors import ConfigError
from looplm.model import LoopConfig, LoopLM

MODELS = ["transformer", "mor_expert", "mod"]
SEEDS = ["0", "1"]


def bench(out, *extra, models=MODELS):
    args = ["bench", "lm", "--quick", "--threads", "1", "--out", str(out), "--models", *models,
            "--seeds", *SEEDS, *extra]
    assert main(args) == 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    bench(out, "--scaling-models", "transformer")
    return json.loads((out / "lm.json").read_text()), out


def test_every_model_and_seed_reaches_the_same_budget_and_is_plotted(quick):
    data, out = quick
    budget = data["settings"]["flops"]
    full = [r for r in data["results"].values() if r["budget"] == budget]
    assert {(r["model"], r["seed"]) for r in full} == {(m, int(s)) for m in MODELS for s in SEEDS}
    for r in full:
        overshoot = r["flops"] - budget
        assert 0 <= overshoot <= r["flops_per_token"] * r["tokens"] / r["steps"] * 1.01
        assert 0 < r["val_bpb"] < 10 and r["tokens_per_s"] > 0
        assert len(r["curve"]) == 4 and r["curve"][-1]["val_bpb"] == r["val_bpb"]
    rows = data["summary"]["models"]
    assert rows["mor_expert"]["params_unique"] < rows["transformer"]["params_unique"]
    assert rows["mor_expert"]["flops_per_token"] < rows["transformer"]["flops_per_token"]
    # expert-choice models: the causal routing is the table's number, the top-k one beside it
    assert "val_bpb_topk" in rows["mor_expert"] and "val_bpb_topk" in rows["mod"]
    assert "val_bpb_topk" not in rows["transformer"]
    assert all(r["seeds"] == 2 and "vs_transformer" in r for m, r in rows.items() if m != "transformer")
    assert (out / "lm.png").stat().st_size > 1000


def test_scaling_fit_has_four_budgets_twice_apart(quick):
    data, _ = quick
    fit = data["summary"]["scaling"]["fits"]["transformer"]
    budgets = sorted(float(b) for b in fit["points"])
    assert len(budgets) == 4 and all(b / a == pytest.approx(2) for a, b in zip(budgets, budgets[1:]))
    assert budgets[-1] == pytest.approx(data["settings"]["flops"]) and len(SCALING_AT) == 4


def test_shards_together_run_each_job_once(quick, tmp_path):
    data, _ = quick
    for shard in ("0/2", "1/2"):
        bench(tmp_path, "--shard", shard, "--scaling-models", models=["transformer"])
    files = sorted(p.name for p in tmp_path.glob("lm*.json"))
    assert files == ["lm.shard-0-of-2.json", "lm.shard-1-of-2.json"]
    first = json.loads((tmp_path / files[0]).read_text())["results"]
    second = json.loads((tmp_path / files[1]).read_text())["results"]
    assert len(first) == 1 and len(second) == len(SEEDS) and set(first) < set(second)  # 1 read 0's
    for key, r in second.items():  # the same jobs as one process ran
        assert r["val_bpb"] == pytest.approx(data["results"][key]["val_bpb"], rel=1e-4)
    with pytest.raises(ConfigError, match="shard"):
        parse_shard("2/2")


def test_verdicts_count_standard_errors():
    v = lm_stats.verdict([1.0, 1.2, 1.1], [2.0, 2.2, 2.1])
    assert v["delta"] == pytest.approx(-1.0) and v["sigma"] == pytest.approx(math.sqrt(2 * 0.01 / 3))
    assert v["verdict"] == "better"
    assert lm_stats.verdict([1.0, 1.2], [1.05, 1.15])["verdict"] == "tie"
    assert lm_stats.verdict([3.0, 3.1], [1.0, 1.1])["verdict"] == "worse"


def test_scaling_fit_recovers_a_power_law_and_its_crossing():
    c = np.array([1e9, 2e9, 4e9, 8e9])
    a = {"E": 1.0, "A": 30.0, "alpha": 0.2}
    b = {"E": 0.5, "A": 1000.0, "alpha": 0.3}
    points = {"a": {float(x): [float(lm_stats.predict(a, x)) + d for d in (-1e-4, 1e-4)] for x in c},
              "b": {float(x): [float(lm_stats.predict(b, x)) + d for d in (-1e-4, 1e-4)] for x in c}}
    out = lm_stats.scaling(points)
    fit = out["fits"]["a"]
    assert fit["E"] == pytest.approx(1.0, abs=0.05) and fit["alpha"] == pytest.approx(0.2, abs=0.02)
    assert fit["alpha_std"] < 0.05 and not fit["alpha_at_bound"]
    grid = np.logspace(8, 13, 20000)
    true = grid[np.argmax(lm_stats.predict(a, grid) > lm_stats.predict(b, grid))]
    assert out["crossing"] == pytest.approx(true, rel=0.2) and out["cross_share"] > 0.9


def test_variants_differ_as_documented():
    s = {"d_model": 64, "n_heads": 2, "seq_len": 32}
    cfgs = {name: model_config(name, s, 259) for name in VARIANTS}
    assert cfgs["moe"].ffn_dim * 2 == cfgs["transformer"].ffn_dim
    assert cfgs["mor_token_kv"].kv_sharing and not cfgs["mor_token"].kv_sharing
    assert cfgs["mod"].layer_router == "mod" and cfgs["mod"].mod_capacity == 0.125
    assert cfgs["moe_recurrent"].moe_router == "recurrent" and cfgs["mom"].mixer == "mom"
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
