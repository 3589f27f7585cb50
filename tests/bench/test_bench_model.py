"""`looplm bench model --quick`: runs end to end, sizes match, verdicts follow the ratios."""

import json
import math

import pytest

from looplm.bench.model import TARGETS, verdicts
from looplm.cli import main


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_model")
    assert main(["bench", "model", "--quick", "--threads", "1", "--out", str(out)]) == 0
    return json.loads((out / "model.json").read_text()), out


def test_every_target_is_measured_and_plotted(report):
    results, out = report
    assert set(results["checks"]) == set(TARGETS)
    for check in results["checks"].values():
        assert math.isfinite(check["ratio"]) and check["ratio"] > 0
    assert (out / "model.png").stat().st_size > 1000


def test_compared_models_have_the_same_size(report):
    results, _ = report
    for part, a, b in (("train", "looplm_gdn_moe", "qwen3_next"), ("train", "looplm_vanilla", "llama"),
                       ("decode", "looplm_fixed_state", "llama")):
        p = results[part]["params"]
        assert abs(p[a] / p[b] - 1) < 0.1, (a, b, p)


def test_matmul_profile_bounds_the_gdn_moe_ratio(report):
    train = report[0]["train"]
    assert all(0 < p["share"] <= 1 for p in train["matmul_profile"].values())
    assert train["gdn_moe_matmul_bound"] >= train["train_gdn_moe_speedup"]


def test_mor_routes_fewer_tokens_and_counts_fewer_flops(report):
    mor = report[0]["mor"]
    assert mor["reach"][0] == pytest.approx(1.0) and mor["reach"][-1] < 0.5
    assert mor["mor_flops_ratio"] < 0.9


def test_verdicts_follow_the_ratios():
    checks = verdicts({"train": {"train_gdn_moe_speedup": 2.5, "train_vanilla_speedup": 0.9},
                       "decode": {"decode_long_over_short": 1.1}})
    assert checks["gdn_moe vs Qwen3-Next train tokens/s"]["pass"]
    assert not checks["vanilla vs Llama train tokens/s"]["pass"]
    assert checks["fixed-state latency long / short prompt"]["pass"]
    assert len(checks) == 3


def test_mod_runs_an_eighth_of_the_tokens_through_every_other_layer(report):
    mod = report[0]["mod"]
    assert mod["mod_flops_ratio"] < 0.75  # half the layers at 1/8 of the tokens (+ the head)
    assert mod["params"]["mod"] > mod["params"]["dense"]  # its routers
