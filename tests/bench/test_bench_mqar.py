"""`looplm bench mqar --quick` end to end; the sweep resumes without redoing finished configurations."""

import json

import pytest
import torch

from looplm.bench import mqar
from looplm.bench.runner import Sweep
from looplm.cli import main


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("mqar")
    assert main(["bench", "mqar", "--quick", "--threads", "1", "--out", str(out)]) == 0
    return out


def test_writes_json_and_png(quick):
    data = json.loads((quick / "mqar.json").read_text())
    assert set(data["results"]) == {"attention-d32-T32-p4", "gated_deltanet-d32-T32-p4"}
    for r in data["results"].values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 3 and r["state_bytes"] > 0
    assert "| attention | 32 |" in data["table"]
    assert (quick / "mqar.png").stat().st_size > 1000


def test_rerun_skips_finished_configurations(quick, monkeypatch):
    before = json.loads((quick / "mqar.json").read_text())["results"]

    def fail(*args, **kwargs):
        raise AssertionError("a finished configuration was run again")

    monkeypatch.setattr(mqar, "run_one", fail)
    assert main(["bench", "mqar", "--quick", "--threads", "1", "--out", str(quick)]) == 0
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


def test_bad_settings_name_the_flag():
    args = mqar.argparse.Namespace(quick=False, vocab=16, seq_lens=[16], pairs=[9], widths=[32],
                                   mixers=["linear"], steps=1, batch_size=1, lr=1e-3, train_examples=1,
                                   test_examples=1, seed=0)
    with pytest.raises(ValueError, match="n_pairs"):
        mqar.settings(args)
    args.pairs = [1, 2]
    with pytest.raises(ValueError, match="--pairs"):
        mqar.settings(args)
