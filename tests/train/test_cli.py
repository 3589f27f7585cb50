"""`looplm train/eval/info` end to end on the stdlib corpus, and one-line errors on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from looplm.checkpoint import load_model
from looplm.cli import main
from looplm.layers.layer_step import describe

TINY = ["--config", "tiny", "--no-progress", "--set", "max_files=30", "steps=4", "eval_interval=2",
        "sample_tokens=4"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPLM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "tiny"
    mp = pytest.MonkeyPatch()
    mp.setenv("LOOPLM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    assert main(["train", *TINY, "--out", str(out)]) == 0
    mp.undo()
    return out


def test_default_command_trains_a_loadable_checkpoint(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = run_dir / "latest"
    model = load_model(ckpt)
    assert model.config.d_model == 64
    assert (ckpt / "tokenizer_config.json").is_file() and (ckpt / "run.json").is_file()
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_bpb" in r] == [2, 4]
    assert all(r["tokens_per_s"] > 0 for r in rows if "loss" in r)
    assert main(["generate", str(ckpt), "--prompt", "import ", "--max-new-tokens", "8"]) == 0
    assert len(capsys.readouterr().out.rstrip("\n")) > 0  # text, maybe only spaces after 4 steps


def test_eval_and_info_read_the_checkpoint(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(run_dir / "latest"), "--iters", "1", "--batch-size", "4", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < ev["val_bpb"] < 9 and ev["val_loss"] > 0
    assert main(["info", str(run_dir / "latest"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = load_model(run_dir / "latest").eval()
    assert info["params_unique"] == model.num_params() and info["step"] == 4
    layers = [*model.prelude, *model.core, *model.coda]  # one decision per layer, as layer_step made it
    assert list(info["kernels"].values()) == [f"{b.mixer_name}: {describe(b)}" for b in layers]


def test_invalid_utf8_trains(tmp_path: Path) -> None:
    data = tmp_path / "weird.txt"
    data.write_bytes(b"def f(x):\n    return x \xff\xfe caf\xc3\xa9 \xc3(\n" * 600)
    assert main(["train", *TINY, "--set", "steps=2", "--data", str(data), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "ckpt-000002" / "model.safetensors").is_file()


def _fails(argv: list[str], capsys: pytest.CaptureFixture, *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_data_is_one_line_and_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty, garbage = tmp_path / "empty.txt", tmp_path / "garbage.bin"
    empty.write_bytes(b"")
    garbage.write_bytes(bytes(range(256)) * 64)
    for path, word in [(empty, "empty"), (garbage, "binary"), (tmp_path / "missing.txt", "missing.txt")]:
        out = tmp_path / f"out-{path.stem}"
        _fails(["train", *TINY, "--data", str(path), "--out", str(out)], capsys, word)
        assert not out.exists()


def test_config_typos_name_close_matches(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o"
    _fails(["train", *TINY, "--set", "lrr=1e-3", "--out", str(out)], capsys, "lrr", "lr")
    _fails(["train", *TINY, "--set", "model.d_modle=8", "--out", str(out)], capsys, "d_model")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layer: 2\ntrain:\n  steps: 2\n")
    _fails(["train", "--config", str(bad), "--out", str(out)], capsys, "n_layer")
    _fails(["train", "--config", "nonesuch", "--out", str(out)], capsys, "tiny")
    assert not out.exists()


def test_unreadable_checkpoint(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((run_dir / "latest" / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00\x01garbage")
    for cmd in ("info", "eval"):
        _fails([cmd, str(broken)], capsys, "model.safetensors")
        _fails([cmd, str(tmp_path / "nowhere")], capsys, "nowhere")


def test_resume_of_the_real_model_is_bit_identical(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, symlinks=True)
    shutil.rmtree(copy / "ckpt-000004")  # as if killed after the step-2 checkpoint
    assert main(["train", *TINY, "--out", str(copy), "--resume"]) == 0
    a = load_file(str(run_dir / "ckpt-000004" / "model.safetensors"))
    b = load_file(str(copy / "ckpt-000004" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
