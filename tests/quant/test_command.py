"""`looplm train --qat`, `looplm quantize`, then `eval` and `generate` on the result."""

from __future__ import annotations

import json

import pytest

from looplm.checkpoint import load_model
from looplm.cli import main
from looplm.quant.linear import QuantLinear
from looplm.quant.qat import QATLinear

TINY = ["--config", "tiny", "--no-progress", "--set", "max_files=30", "steps=3", "eval_interval=3",
        "sample_tokens=4"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LOOPLM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_qat_train_quantize_eval_generate(tmp_path, capsys, monkeypatch):
    import looplm.train.command as train_command

    built = []
    real = train_command.build_model
    monkeypatch.setattr(train_command, "build_model", lambda *a: built.append(real(*a)) or built[-1])
    assert main(["train", *TINY, "--qat", "int4", "--out", str(tmp_path / "run")]) == 0
    assert any(isinstance(m, QATLinear) for m in built[0].modules())
    ckpt = tmp_path / "run" / "latest"
    out = tmp_path / "q"
    assert main(["quantize", str(ckpt), "--format", "int4", "--group-size", "32", "--out", str(out)]) == 0
    assert "int4" in capsys.readouterr().out
    model = load_model(out)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    assert (out / "run.json").is_file() and json.loads((out / "config.json").read_text())["quantization"]
    assert main(["eval", str(out), "--iters", "1", "--batch-size", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["val_bpb"] > 0
    assert main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    # quantising a quantised checkpoint, or onto itself, is a one-line error
    assert main(["quantize", str(out), "--format", "int8", "--out", str(tmp_path / "qq")]) == 2
    assert main(["quantize", str(ckpt), "--format", "int8", "--out", str(ckpt)]) == 2
    assert "already quantised" in capsys.readouterr().err
    g = str(tmp_path / "g")
    assert main(["quantize", str(ckpt), "--format", "int8", "--group-size", "48", "--out", g]) == 2
    assert "group_size=48 for int8 must be a positive multiple of 32" in capsys.readouterr().err
    assert main(["quantize", str(ckpt), "--format", "fp8_e4m3", "--group-size", "64", "--out", g]) == 2
    assert "--group-size applies to int4 and int8 only" in capsys.readouterr().err
