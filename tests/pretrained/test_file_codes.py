"""Lossless quantised import: a GGUF's Q4_1 matrices imported as int4 g32 and its Q8_0 table as
int8 g32 keep the file's own codes, so the checkpoint's dequantised weights equal the gguf
package's dequantisation bit for bit; other formats requantise."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from looplm.checkpoint import load_model  # noqa: E402
from looplm.cli import main  # noqa: E402
from looplm.pretrained.convert import import_checkpoint  # noqa: E402
from looplm.pretrained.gguf_file import file_codes  # noqa: E402
from looplm.quant.formats import make_format  # noqa: E402
from looplm.quant.linear import QuantEmbedding, QuantLinear  # noqa: E402
from tests.pretrained import synthetic as S  # noqa: E402

MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _file(tmp_path: Path) -> Path:
    source, tok = S.hf_model(tied=True)
    path = tmp_path / "m.gguf"
    S.save_gguf(path, source, tok, {**{m: "Q4_1" for m in MATRICES}, "token_embd": "Q8_0"})
    return path


def _quantised(model) -> dict[str, QuantLinear | QuantEmbedding]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear | QuantEmbedding)}


def test_q4_1_and_q8_0_import_as_the_files_own_codes(tmp_path: Path, capsys):
    path = _file(tmp_path)
    import_checkpoint(path, tmp_path / "f32")  # float32: the gguf package's dequantisation
    out = tmp_path / "q"
    assert main(["import", str(path), "--out", str(out), "--quantize", "int4", "--group-size", "32",
                 "--embedding-format", "int8", "--embedding-group-size", "32"]) == 0
    assert "9 matrices keep the file's own codes" in capsys.readouterr().out
    f32, q = load_model(tmp_path / "f32"), load_model(out)
    mods = _quantised(q)
    assert len(mods) == 9 and json.loads((out / "pretrained.json").read_text())["file_codes"] == 9
    reference = dict(f32.named_parameters())
    for name, m in mods.items():
        assert torch.equal(m.dequantized(), reference[f"{name}.weight"]), name
    assert q.embed.fmt == make_format("int8", 32)
    # the same file quantised otherwise: requantised from the float weights, not the same values
    import_checkpoint(path, tmp_path / "g64", quantize="int4", quantize_options={"group_size": 64})
    g64 = load_model(tmp_path / "g64")
    assert json.loads((tmp_path / "g64" / "pretrained.json").read_text())["file_codes"] == 0
    w = g64.get_submodule("core.0.ffn.w_in")
    assert not torch.equal(w.dequantized(), reference["core.0.ffn.w_in.weight"])


def test_file_codes_match_the_gguf_dequantisation_per_tensor_and_skip_what_they_cannot_hold():
    gen = np.random.default_rng(0)
    w = (gen.standard_normal((8, 96)) * 0.1).astype(np.float32)
    for kind in ("Q8_0", "Q4_1"):
        qtype = gguf.GGMLQuantizationType[kind]
        raw = gguf.quants.quantize(w, qtype)
        t = SimpleNamespace(tensor_type=qtype, shape=[96, 8], data=raw)
        fmt, parts = file_codes(t)
        assert fmt == make_format("int8" if kind == "Q8_0" else "int4", 32)
        want = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
        assert torch.equal(fmt.dequantize(parts), want)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    raw[0, 2] = 128  # the code -128 (int8), which no quantiser writes and the kernels do not take
    bad = SimpleNamespace(tensor_type=gguf.GGMLQuantizationType.Q8_0, shape=[96, 8], data=raw)
    assert file_codes(bad) is None
    f16 = SimpleNamespace(tensor_type=gguf.GGMLQuantizationType.F16, shape=[96, 8], data=w.astype(np.float16))
    assert file_codes(f16) is None
