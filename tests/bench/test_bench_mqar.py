"""`looplm bench mqar --quick` end to end; the sweep resumes without redoing finished configurations."""

import argparse
import json

import pytest
import torch

from looplm.bench import mqar
from looplm.bench.runner import Sweep
from looplm.cli import main


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("mqar")
    assert main(["bench", "mqar", "--quick", "--workers", "1", "--threads", "1", "--out", str(out)]) == 0
    return out


def test_writes_json_and_png(quick):
    data = json.loads((quick / "mqar.json").read_text())
    assert set(data["results"]) == {"attention-d32-T32-p4", "gated_deltanet-d32-T32-p4"}
    for r in data["results"].values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 3 and r["state_bytes"] > 0
        assert r["lr"] == mqar.lr_for(data["settings"], r["mixer"]) and r["vocab"] == 32
    assert "| attention | 32 |" in data["table"]
    assert (quick / "mqar.png").stat().st_size > 1000


def test_rerun_skips_finished_configurations(quick, monkeypatch):
    before = json.loads((quick / "mqar.json").read_text())["results"]

    def fail(*args, **kwargs):
        raise AssertionError("a finished configuration was run again")

    monkeypatch.setattr(mqar, "run_one", fail)
    assert main(["bench", "mqar", "--quick", "--workers", "1", "--threads", "1", "--out", str(quick)]) == 0
    assert json.loads((quick / "mqar.json").read_text())["results"] == before


def test_sweep_keeps_results_across_swept_settings_and_restarts_on_others(tmp_path):
    calls = []

    def job(key):
        return lambda: calls.append(key) or {"v": key}

    Sweep(tmp_path, "s", {"lr": 1, "widths": [1]}, swept=("widths",), quiet=True).run([("a", job("a"))])
    sweep = Sweep(tmp_path, "s", {"lr": 1, "widths": [1, 2]}, swept=("widths",), quiet=True)
    sweep.run([("a", job("a")), ("b", job("b"))])
    assert calls == ["a", "b"]  # a was done; b is new
    changed = Sweep(tmp_path, "s", {"lr": 2, "widths": [1]}, swept=("widths",), quiet=True)
    assert changed.results == {}  # a different shared setting invalidates the stored results


def test_a_failing_configuration_keeps_the_finished_ones(tmp_path):
    def boom():
        raise RuntimeError("boom")

    sweep = Sweep(tmp_path, "s", {}, quiet=True)
    with pytest.raises(RuntimeError):
        sweep.run([("ok", lambda: {"x": 1}), ("bad", boom)])
    assert json.loads((tmp_path / "s.json").read_text())["results"] == {"ok": {"x": 1}}


def test_accuracy_counts_only_answer_positions():
    cfg = mqar.model_config("attention", 32, 16, 16)
    model = mqar.LoopLM(cfg)
    batch = mqar.make_mqar(4, vocab_size=16, seq_len=16, n_pairs=2, seed=0)
    with torch.no_grad():
        pred = model(batch.inputs).logits.argmax(-1)
    # make the targets equal to the predictions at the answers, and wrong everywhere else: accuracy 1
    targets = torch.where(batch.targets != -100, pred, torch.full_like(pred, -100))
    assert mqar.accuracy(model, batch.inputs, targets) == 1.0
    assert mqar.accuracy(model, batch.inputs, torch.where(targets != -100, (pred + 1) % 16, targets)) == 0.0


def parse(*argv: str):
    parser = argparse.ArgumentParser()
    mqar.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_two_workers_give_the_results_of_one(quick, tmp_path):
    """The process pool runs the same seeded jobs: identical results, each stored once."""
    assert main(["bench", "mqar", "--quick", "--workers", "2", "--out", str(tmp_path)]) == 0
    one = json.loads((quick / "mqar.json").read_text())["results"]
    two = json.loads((tmp_path / "mqar.json").read_text())["results"]
    strip = lambda res: {k: {f: v for f, v in r.items() if f != "seconds"} for k, r in res.items()}  # noqa: E731
    assert strip(two) == strip(one)


def test_training_stops_once_validation_reaches_the_target():
    s = mqar.settings(parse("--quick"))
    s.update(steps=6, eval_every=2)
    full = mqar.run_one("linear", 32, 32, 4, s)
    assert full["steps"] == 6 and [c[0] for c in full["val_curve"]] == [2, 4, 6]
    s["target"] = 0.0  # reached at the first check
    early = mqar.run_one("linear", 32, 32, 4, s)
    assert early["steps"] == 2 and len(early["val_curve"]) == 1


def test_learning_rate_per_mixer_unless_given():
    s = mqar.settings(parse())
    assert mqar.lr_for(s, "attention") < mqar.lr_for(s, "deltanet") == mqar.DEFAULT_LR
    assert mqar.lr_for(mqar.settings(parse("--lr", "0.01")), "attention") == 0.01


def test_default_vocabulary_is_twice_the_sequence_length():
    s = mqar.settings(parse())
    assert [mqar.vocab_for(s, t) for t in s["seq_lens"]] == [2 * t for t in s["seq_lens"]]
    assert mqar.vocab_for(mqar.settings(parse("--vocab", "1024")), 64) == 1024


def test_attention_has_one_head_fixed_state_heads_are_64_wide():
    assert mqar.model_config("attention", 256, 128, 64).n_heads == 1
    assert mqar.model_config("deltanet", 256, 128, 64).n_heads == 4


def test_bad_settings_name_the_flag():
    with pytest.raises(ValueError, match="n_pairs"):
        mqar.settings(parse("--vocab", "16", "--seq-lens", "16", "--pairs", "9"))
    with pytest.raises(ValueError, match="--pairs"):
        mqar.settings(parse("--seq-lens", "64", "--pairs", "1", "2"))


def test_d_ffn_zero_builds_mixer_only_models():
    assert mqar.model_config("gla", 64, 32, 16, d_ffn=0).ffn == "none"
    cfg = mqar.model_config("gla", 64, 32, 16, d_ffn=1)
    assert (cfg.ffn, cfg.d_ffn) == ("dense", 1)
