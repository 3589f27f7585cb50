"""Bad inputs to looplm import: one ConversionError each, and nothing written to --out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("gguf")
pytest.importorskip("transformers")

from looplm.errors import ConversionError  # noqa: E402
from looplm.pretrained.convert import import_checkpoint  # noqa: E402
from tests.pretrained import synthetic as S  # noqa: E402


def _fails(tmp_path: Path, src: Path, match: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=match):
        import_checkpoint(src, out)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]  # no temporary left


def test_truncated_gguf(tmp_path: Path):
    source, tok = S.hf_model()
    S.save_gguf(tmp_path / "m.gguf", source, tok)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    _fails(tmp_path, tmp_path / "cut.gguf", "truncated")
    (tmp_path / "head.gguf").write_bytes(data[:100])
    _fails(tmp_path, tmp_path / "head.gguf", "truncated|not a readable GGUF")


def test_gguf_of_another_architecture(tmp_path: Path):
    source, tok = S.hf_model()
    S.save_gguf(tmp_path / "m.gguf", source, tok, arch="gpt2")
    _fails(tmp_path, tmp_path / "m.gguf", "architecture 'gpt2'")


def test_gguf_missing_tensor(tmp_path: Path):
    source, tok = S.hf_model()
    S.save_gguf(tmp_path / "m.gguf", source, tok, drop=("ffn_up",))
    _fails(tmp_path, tmp_path / "m.gguf", "missing tensors model.layers.0.mlp.up_proj.weight")


def test_not_a_gguf_nor_a_directory(tmp_path: Path):
    (tmp_path / "x.bin").write_bytes(b"PK\x03\x04 not gguf")
    _fails(tmp_path, tmp_path / "x.bin", "not a GGUF file")
    _fails(tmp_path, tmp_path / "absent.gguf", "does not exist")


def test_hf_directory_with_missing_tensors(tmp_path: Path):
    from safetensors.torch import load_file, save_file

    S.save_hf_dir(tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    _fails(tmp_path, tmp_path / "hf", "missing tensors model.layers.1.self_attn.k_proj.weight")


def test_tokenizer_larger_than_the_vocabulary(tmp_path: Path):
    S.save_hf_dir(tmp_path / "hf", vocab_size=200)  # the tokenizer has 300 tokens
    _fails(tmp_path, tmp_path / "hf", "tokenizer has 300 tokens but the model only 200")


def test_unsupported_architecture_and_rope_scaling(tmp_path: Path):
    S.save_hf_dir(tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "architectures": ["GPTNeoXForCausalLM"]}))
    _fails(tmp_path, tmp_path / "hf", "architecture 'GPTNeoXForCausalLM' is not supported")
    yarn = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    config_file.write_text(json.dumps({**config, "rope_parameters": yarn}))
    _fails(tmp_path, tmp_path / "hf", "RoPE scaling 'yarn' is not supported")


def test_missing_tokenizer_and_existing_out(tmp_path: Path):
    S.save_hf_dir(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").unlink()
    _fails(tmp_path, tmp_path / "hf", "tokenizer.json' is missing")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists"):
        import_checkpoint(tmp_path / "hf", tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_cli_prints_one_line(tmp_path: Path, capsys):
    from looplm.cli import main

    assert main(["import", str(tmp_path / "nothing.gguf"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and not (tmp_path / "out").exists()
