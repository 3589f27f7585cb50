"""In-process tests of the trainer's parts: config, schedule, decay groups, checkpoints, batches."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from looplm.data import BatchSampler, eval_batches
from looplm.errors import CheckpointError, ConfigError, DataError
from looplm.train import loop
from looplm.train.config import CONFIG_DIR, TrainConfig, apply_overrides, load_sections
from looplm.train.loop import DivergedError, evaluate, train
from looplm.train.optim import build_optimizer, lr_at, param_groups
from looplm.train.run_checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from tests.train.tiny import TinyLM, tiny_config, tokens


def test_unknown_train_key_names_close_match() -> None:
    with pytest.raises(ConfigError, match="did you mean lr"):
        TrainConfig.from_dict({"lrr": 0.1})
    with pytest.raises(ConfigError, match="did you mean batch_size"):
        apply_overrides({"model": {}, "train": {}}, ["batch_sise=3"], ["d_model"])
    with pytest.raises(ConfigError, match="did you mean d_model"):
        apply_overrides({"model": {}, "train": {}}, ["model.d_modle=3"], ["d_model"])


def test_overrides_parse_types_and_route_sections() -> None:
    out = apply_overrides({"model": {}, "train": {}}, ["lr=3e-4", "bf16=true", "d_model=64", "train.out=x"],
                          ["d_model"])
    assert out == {"model": {"d_model": 64}, "train": {"lr": 3e-4, "bf16": True, "out": "x"}}
    assert TrainConfig.from_dict(out["train"]).lr == 3e-4


def test_a_key_of_both_sections_must_be_prefixed() -> None:
    sections = {"model": {}, "train": {}}
    with pytest.raises(ConfigError, match="ambiguous.*model.vocab_size= or train.vocab_size="):
        apply_overrides(sections, ["vocab_size=512"], ["vocab_size", "d_model"])
    out = apply_overrides(sections, ["model.vocab_size=512", "train.vocab_size=300"], ["vocab_size"])
    assert out == {"model": {"vocab_size": 512}, "train": {"vocab_size": 300}}


@pytest.mark.parametrize("bad", [{"schedule": "linear"}, {"batch_size": 0}, {"lr": "fast"},
                                 {"batch_size": 6, "grad_accum": 4}, {"steps": True}])
def test_bad_values_raise(bad: dict) -> None:
    with pytest.raises(ConfigError):
        TrainConfig(**bad)


def test_base_config_is_merged_field_by_field(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text("base: tiny\nmodel:\n  mixer: linear\ntrain:\n  steps: 3\n")
    tiny, got = load_sections("tiny"), load_sections(str(child))
    assert got["model"] == {**tiny["model"], "mixer": "linear"}
    assert got["train"] == {**tiny["train"], "steps": 3}
    child.write_text(f"base: {child}\n")
    with pytest.raises(ConfigError, match="its own base"):
        load_sections(str(child))


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_sections(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {}\ntrian: {}\n")
    with pytest.raises(ConfigError, match="did you mean train"):
        load_sections(str(bad))
    bad.write_bytes(b"\xff\xfe\x00garbage: [")
    with pytest.raises(ConfigError):
        load_sections(str(bad))


@given(st.sampled_from(["cosine", "wsd"]), st.integers(1, 50), st.integers(51, 400))
def test_schedule_warms_up_and_ends_at_min(schedule: str, warmup: int, steps: int) -> None:
    cfg = TrainConfig(schedule=schedule, warmup_steps=warmup, steps=steps, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(steps)]
    assert all(0 < v <= 1.0 + 1e-12 for v in lrs)
    assert lrs[warmup - 1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert all(a >= b - 1e-12 for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert lr_at(steps - 1, cfg) == pytest.approx(0.1)


def test_no_decay_for_norms_biases_embeddings() -> None:
    model = TinyLM()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {"mlp.0.weight", "mlp.2.weight", "head.weight"}
    assert "embed.weight" in {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0


def test_checkpoint_round_trip_restores_everything(tmp_path: Path) -> None:
    cfg = tiny_config(str(tmp_path), 3)
    model = TinyLM()
    opt = build_optimizer(model, cfg)
    model(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)).loss.backward()
    opt.step()
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    save_checkpoint(tmp_path, 1, model, opt, {"tokens": 5, "best_val": 1.5})
    expect = (torch.rand(3), np.random.rand(3), random.random())
    model2 = TinyLM(d=32)
    opt2 = build_optimizer(model2, cfg)
    state = load_checkpoint(list_checkpoints(tmp_path)[-1][1], model2, opt2)
    assert state == {"tokens": 5, "best_val": 1.5, "step": 1}
    assert torch.equal(torch.rand(3), expect[0]) and np.array_equal(np.random.rand(3), expect[1])
    assert random.random() == expect[2]
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    for (_, s1), (_, s2) in zip(opt.state_dict()["state"].items(), opt2.state_dict()["state"].items()):
        assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_unreadable_checkpoint_is_a_checkpoint_error(tmp_path: Path) -> None:
    cfg = tiny_config(str(tmp_path), 3)
    model = TinyLM()
    ckpt = save_checkpoint(tmp_path, 1, model, build_optimizer(model, cfg), {})
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot resume"):
        load_checkpoint(ckpt, model, build_optimizer(model, cfg))
    with pytest.raises(CheckpointError, match="does not match"):
        small = TinyLM(d=8)
        save_checkpoint(tmp_path, 2, small, build_optimizer(small, cfg), {})
        load_checkpoint(tmp_path / "ckpt-000002", model, build_optimizer(model, cfg))


def test_keeps_last_n_and_best(tmp_path: Path) -> None:
    model = TinyLM()
    opt = build_optimizer(model, tiny_config(str(tmp_path), 3))
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, opt, {}, keep_last=2, is_best=step == 2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 5]
    assert (tmp_path / "best").resolve().name == "ckpt-000002"
    assert (tmp_path / "latest").resolve().name == "ckpt-000005"


def test_evaluate_bits_per_byte() -> None:
    model = TinyLM()
    batches = list(eval_batches(tokens(), 4, 16, max_batches=2))
    ev = evaluate(model, batches, token_bytes=torch.full((64,), 2))
    assert ev["val_bpb"] == pytest.approx(ev["val_loss"] / (2 * math.log(2)))


def test_nan_losses_skip_then_stop(tmp_path: Path) -> None:
    model = TinyLM()
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    data = BatchSampler(tokens(), 8, 16)
    with pytest.raises(DivergedError, match="NaN/inf 3 steps in a row"):
        cfg = tiny_config(str(tmp_path), 10, max_bad_steps=3)
        train(cfg, model, data, progress=False, log=lambda s: None)
    assert list_checkpoints(tmp_path) == []


def test_refuses_to_overwrite_a_run_without_resume(tmp_path: Path) -> None:
    data = BatchSampler(tokens(), 8, 16)
    cfg = tiny_config(str(tmp_path), 2)
    train(cfg, TinyLM(), data, progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg, TinyLM(), data, progress=False)


def test_time_budget_stops_with_a_checkpoint_and_a_decayed_lr(tmp_path: Path, monkeypatch) -> None:
    clock = itertools.count(0.0, 0.05)  # a deterministic clock: 50 ms per reading
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    cfg = tiny_config(str(tmp_path), 10**6, max_minutes=0.04, warmup_steps=1, eval_interval=10**6)
    row = train(cfg, TinyLM(), BatchSampler(tokens(), 8, 16), progress=False, log=lambda s: None)
    assert 5 < row["step"] < 10**6 and row["elapsed_s"] >= 0.04 * 60
    assert [s for s, _ in list_checkpoints(tmp_path)] == [row["step"]]
    assert row["lr"] < 0.15 * cfg.lr  # the schedule followed the clock to its end


def test_plot_reads_the_metrics_of_a_run(tmp_path: Path) -> None:
    from looplm.train.plot import plot_run

    train(tiny_config(str(tmp_path), 10), TinyLM(), BatchSampler(tokens(), 8, 16), tokens(2000, seed=1),
          token_bytes=torch.ones(64, dtype=torch.long), progress=False)
    png = plot_run(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(DataError, match="metrics.jsonl"):
        plot_run(tmp_path / "nowhere")


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_config_builds(name: str) -> None:
    from looplm.model import LoopConfig, LoopLM

    sections = load_sections(name)
    TrainConfig.from_dict(sections["train"])
    model = LoopLM(LoopConfig.from_dict({**sections["model"], "vocab_size": 4096}))
    # baselines: the parameters of small (moe, moe_recurrent: its active ones; mom: 4 memories)
    if name not in ("tiny", "moe", "moe_recurrent", "mom"):
        small = LoopLM(LoopConfig.from_dict({**load_sections("small")["model"], "vocab_size": 4096}))
        assert abs(model.num_params() - small.num_params()) < 0.1 * small.num_params()
