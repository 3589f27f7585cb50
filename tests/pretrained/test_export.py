"""Round trips: looplm export --format hf loads in plain transformers with the same logits; a
directory written by the transformers wrapper's save_pretrained loads in load_model and every
command; its config's auto_map lets plain transformers load it with trust_remote_code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from looplm.checkpoint import load_model, save_model  # noqa: E402
from looplm.data.tokenizer import load_tokenizer  # noqa: E402
from looplm.errors import ConversionError  # noqa: E402
from looplm.model import LoopConfig, LoopLM  # noqa: E402
from looplm.pretrained.convert import import_checkpoint  # noqa: E402
from looplm.pretrained.export import export_hf  # noqa: E402
from tests.pretrained import synthetic as S  # noqa: E402

IDS = torch.randint(0, 300, (2, 70), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_imported_model_goes_back_out(tmp_path: Path, arch, tied):
    source = S.save_hf_dir(tmp_path / "hf", arch, tied)
    import_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "back")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(again) is type(source)
    assert (_logits(again) - _logits(source)).abs().max().item() <= 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>assistant\n")


def test_looplm_trained_vanilla_model_exports(tmp_path: Path):
    torch.manual_seed(0)
    config = LoopConfig(
        vocab_size=320,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        n_prelude=1,
        n_core=2,
        n_coda=1,
        tie_embeddings=False,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        norm_eps=1e-5,
    )
    model = LoopLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    save_model(model, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.num_hidden_layers == 4
    assert (_logits(hf) - _logits(model)).abs().max().item() <= 1e-4


def test_non_vanilla_and_quantised_checkpoints_refuse(tmp_path: Path):
    from looplm.quant.ptq import quantize_model

    save_model(
        LoopLM(LoopConfig(vocab_size=64, d_model=32, n_heads=2, mixer="gated_deltanet")), tmp_path / "gdn"
    )
    with pytest.raises(ConversionError, match="mixer 'gated_deltanet'"):
        export_hf(tmp_path / "gdn", tmp_path / "out")
    m = LoopLM(LoopConfig(vocab_size=64, d_model=32, n_heads=2))
    quantize_model(m, "int8")
    save_model(m, tmp_path / "q")
    with pytest.raises(ConversionError, match="quantised"):
        export_hf(tmp_path / "q", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "config",
    [
        dict(vocab_size=64, d_model=32, n_heads=2, n_core=2, ffn="moe", n_experts=4, top_k=2),
        dict(
            vocab_size=64,
            d_model=32,
            n_heads=2,
            n_core=2,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
    ],
)
def test_save_pretrained_directory_loads_everywhere(tmp_path: Path, config, capsys):
    from looplm.cli import main
    from looplm.hf import LoopLMForCausalLM, LoopLMHFConfig

    torch.manual_seed(0)
    model = LoopLM(LoopConfig(**config)).eval()
    hf = LoopLMForCausalLM(LoopLMHFConfig.from_loop_config(model.config)).eval()
    hf.model.load_state_dict(model.state_dict())
    hf.save_pretrained(tmp_path / "sp")
    saved = json.loads((tmp_path / "sp" / "config.json").read_text())
    assert "moe_top_k" in saved and "tie_word_embeddings" in saved and "auto_map" in saved
    loaded = load_model(tmp_path / "sp").eval()
    assert loaded.config == model.config
    ids = IDS[:, :20] % 64
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert main(["info", str(tmp_path / "sp")]) == 0
    # plain transformers, through the config's auto_map (looplm installed, not imported by the caller)
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sp", trust_remote_code=True).eval()
    assert torch.equal(auto(ids).logits, _logits(model, ids))


def test_generate_on_an_imported_model_uses_its_tokenizer(tmp_path: Path):
    S.save_hf_dir(tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
    tok = load_tokenizer(tmp_path / "ckpt")
    assert tok.kind == "pretrained" and tok.decode(tok.encode("Pack my box")) == "Pack my box"
