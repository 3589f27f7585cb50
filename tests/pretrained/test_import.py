"""looplm import: parity with transformers on small random Llama-family models written by the
test as Hugging Face directories and GGUF files (float and quantised tensors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from looplm.checkpoint import load_model  # noqa: E402
from looplm.data.tokenizer import load_tokenizer  # noqa: E402
from looplm.pretrained.convert import import_checkpoint  # noqa: E402
from looplm.quant.ptq import quantize_model  # noqa: E402
from tests.pretrained import synthetic as S  # noqa: E402

PROMPTS = [S.TEXT[:400], S.TEXT[150:600], "def f(x):\n    return x * 2  # 1234567890\n" * 8]


def _prompt_ids(tokenizer) -> list[list[int]]:
    rows = [tokenizer.encode(p) for p in PROMPTS]
    assert all(len(r) >= 64 for r in rows)
    return rows


@pytest.mark.parametrize(
    "arch,tied,extra",
    [
        ("llama", False, {}),
        ("llama", True, {}),
        ("qwen2", False, {}),
        ("mistral", True, {}),
        (
            "llama",
            False,
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            },
        ),
        ("llama", False, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
        ("llama", False, {"head_dim": 32}),
    ],
)
def test_hf_directory_imports_with_transformers_logits_and_greedy_tokens(tmp_path: Path, arch, tied, extra):
    reference = S.save_hf_dir(tmp_path / "hf", arch, tied, **extra)
    import_checkpoint(tmp_path / "hf", tmp_path / "out")
    model = load_model(tmp_path / "out").eval()
    assert model.config.tie_embeddings == tied and model.config.qkv_bias == (arch == "qwen2")
    tokenizer = load_tokenizer(tmp_path / "out")
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "hf")  # the file as written
    rows = _prompt_ids(tokenizer)
    assert rows == [hf_tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    S.assert_parity(reference, model, rows)


@pytest.mark.parametrize(
    "types",
    [
        {},
        {
            "attn_q": "Q8_0",
            "attn_k": "Q4_0",
            "attn_v": "Q4_1",
            "attn_output": "F16",
            "ffn_gate": "Q5_0",
            "ffn_up": "Q5_1",
            "ffn_down": "BF16",
            "token_embd": "Q8_0",
            "output": "Q4_1",
        },
    ],
)
def test_gguf_imports_with_transformers_logits_and_greedy_tokens(tmp_path: Path, types):
    source, tok = S.hf_model()
    S.save_gguf(tmp_path / "m.gguf", source, tok, types)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()
    import_checkpoint(tmp_path / "m.gguf", tmp_path / "out")
    model = load_model(tmp_path / "out").eval()
    tokenizer = load_tokenizer(tmp_path / "out")
    rows = _prompt_ids(tokenizer)
    assert rows == [tok.encode(p).ids for p in PROMPTS]  # the GGUF's tokenizer is the original one
    assert tokenizer.decode(rows[0]) == PROMPTS[0]
    assert tokenizer.eos_id == 2 and tokenizer.bos_id == 0 and tokenizer.chat_template == S.CHAT_TEMPLATE
    S.assert_parity(reference, model, rows)
    if not types:  # float32 tensors: the weights are the original model's, bit for bit
        with torch.no_grad():
            ids = torch.tensor(rows[:1])
            assert (source(ids).logits - model(ids).logits).abs().max().item() <= 1e-3


def test_tied_gguf_and_quantised_import(tmp_path: Path):
    source, tok = S.hf_model(tied=True)
    S.save_gguf(tmp_path / "m.gguf", source, tok, {"token_embd": "Q8_0"})
    import_checkpoint(tmp_path / "m.gguf", tmp_path / "f32")
    import_checkpoint(tmp_path / "m.gguf", tmp_path / "int8", quantize="int8")
    f32, int8 = load_model(tmp_path / "f32").eval(), load_model(tmp_path / "int8").eval()
    assert f32.config.tie_embeddings and f32.head is None
    assert int8.quantization["format"] == "int8" and int8.quantization["modules"]
    ids = torch.tensor([_prompt_ids(load_tokenizer(tmp_path / "int8"))[0]])
    quantize_model(f32, "int8")  # --quantize is looplm quantize of the float import
    with torch.no_grad():
        assert torch.equal(f32(ids).logits, int8(ids).logits)


def test_import_command_then_generate(tmp_path: Path, capsys):
    from looplm.cli import main

    source, tok = S.hf_model()
    S.save_gguf(tmp_path / "m.gguf", source, tok)
    assert main(["import", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "out")]) == 0
    assert main(["generate", str(tmp_path / "out"), "--prompt", "The quick", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "The quick" in out or out.strip()
    assert main(["info", str(tmp_path / "out")]) == 0
