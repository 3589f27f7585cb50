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


def test_default_sweep_is_the_short_task_at_every_width_and_longer_tasks_at_fewer():
    s = mqar.settings(parse())
    tasks = [(t.seq_len, t.pairs) for t in mqar.DEFAULT_TASKS]
    assert list(zip(s["seq_lens"], s["pairs"])) == tasks
    assert max(s["seq_lens"]) == 256 and max(s["pairs"]) == 32
    assert [mqar.task_widths(s, i) for i in range(len(tasks))] == [list(t.widths) for t in mqar.DEFAULT_TASKS]
    assert [mqar.task_value(s, "batch_size", i) for i in range(len(tasks))] == [
        t.batch_size for t in mqar.DEFAULT_TASKS]
    assert mqar.task_widths(s, 0) == [64, 256] and min(s["widths"][1]) == 64
    # --widths and one --batch-size apply to every default task
    s = mqar.settings(parse("--widths", "64", "--batch-size", "8"))
    assert s["widths"] == [64] and s["batch_size"] == 8 and mqar.task_value(s, "batch_size", 2) == 8


def test_given_sequence_lengths_keep_the_single_values_of_before():
    s = mqar.settings(parse("--seq-lens", "128", "--pairs", "8", "--widths", "64", "--steps", "1500"))
    got = (s["seq_lens"], s["pairs"], s["widths"], s["steps"], s["batch_size"])
    assert got == ([128], [8], [64], 1500, 64)
    s = mqar.settings(parse("--seq-lens", "64", "128", "--pairs", "4", "8", "--steps", "100", "200"))
    assert s["widths"] == mqar.WIDTHS and [mqar.task_value(s, "steps", i) for i in (0, 1)] == [100, 200]
    with pytest.raises(ValueError, match="--steps"):
        mqar.settings(parse("--seq-lens", "64", "--pairs", "4", "--steps", "100", "200"))
    with pytest.raises(ValueError, match="--batch-size"):
        mqar.settings(parse("--seq-lens", "64", "128", "--pairs", "4", "8", "--batch-size", "1", "2", "3"))


def test_per_task_batch_and_steps_reach_the_runs(tmp_path):
    argv = ["bench", "mqar", "--seq-lens", "16", "24", "--pairs", "2", "3", "--widths", "16",
            "--mixers", "linear", "--batch-size", "4", "2", "--steps", "2", "3", "--target", "1.01",
            "--eval-every", "1", "--val-examples", "4", "--test-examples", "4", "--workers", "1",
            "--threads", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    res = json.loads((tmp_path / "mqar.json").read_text())["results"]
    assert {k: (r["batch_size"], r["steps"]) for k, r in res.items()} == {
        "linear-d16-T16-p2": (4, 2), "linear-d16-T24-p3": (2, 3)}


def test_sparse_loss_trains_like_the_full_head():
    """Logits only at the answers (``sparse_loss``) give the same training as logits everywhere."""
    data = mqar.make_mqar(8, vocab_size=32, seq_len=32, n_pairs=4, seed=0)
    params = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = mqar.LoopLM(mqar.model_config("gated_deltanet", 32, 32, 32))
        res = mqar.train_model(model, lambda step: (data.inputs, data.targets), steps=3, sparse_loss=sparse)
        params.append((res.train_loss, [p.detach().clone() for p in model.parameters()]))
    assert params[1][0] == pytest.approx(params[0][0], rel=1e-5)
    for a, b in zip(params[0][1], params[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_plot_has_lines_over_widths_and_bars_for_a_task_of_one_width(tmp_path):
    res = {f"{k}-d{w}-T{t}-p{p}": {"mixer": k, "width": w, "seq_len": t, "n_pairs": p, "vocab": 2 * t,
                                     "accuracy": 0.5, "steps": 10, "state_bytes": 1024}
           for t, p, widths in ((16, 2, (16, 32)), (32, 4, (16,))) for w in widths for k in ("linear", "gla")}
    assert mqar.plot(res, tmp_path / "m.png").stat().st_size > 1000
    assert "| gla | 32 | 1 | 0.500 (10) |  |" in mqar.table(res)
