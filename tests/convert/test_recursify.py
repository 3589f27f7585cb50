"""Recursive conversion (Relaxed Recursive Transformers): R = 1 is the original model, select
init is the model of the selected layers cycled, full-rank relaxations give back each layer's
projections, bad recursion counts raise."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from looplm.checkpoint import load_model, save_model
from looplm.cli import main
from looplm.convert.recursify import recursify
from looplm.data import ByteTokenizer
from looplm.data.tokenizer import load_tokenizer
from looplm.errors import ConfigError
from looplm.layers.lora import LoRALinear
from looplm.model import LoopLM
from tests.model.util import model, tokens


@pytest.mark.parametrize("init", ["average", "select"])
def test_one_recursion_without_lora_is_the_original_model(init):
    src = model(n_prelude=1, n_core=2, n_coda=1)
    rec = recursify(src, 1, init)
    x = tokens()
    assert rec.config.n_core == 4 and rec.config.n_recursions == 1
    torch.testing.assert_close(rec(x).logits, src(x).logits, atol=0, rtol=0)


@pytest.mark.parametrize("mixer", ["attention", "gated_deltanet"])
def test_select_is_the_selected_layers_model_cycled(mixer):
    src = model(n_prelude=1, n_core=4, n_coda=1, mixer=mixer)  # 6 layers
    rec = recursify(src, 3, "select")  # shared layers = original 0 and 3, applied 3 times
    layers = [*src.prelude, *src.core, *src.coda]
    flat = LoopLM(dataclasses.replace(src.config, n_prelude=0, n_core=6, n_coda=0)).eval()
    state = {k: v for k, v in src.state_dict().items() if not k.startswith(("prelude.", "core.", "coda."))}
    for depth in range(6):
        state.update({f"core.{depth}.{k}": v for k, v in layers[(depth % 2) * 3].state_dict().items()})
    flat.load_state_dict(state)
    x = tokens()
    torch.testing.assert_close(rec(x).logits, flat(x).logits, atol=1e-5, rtol=1e-5)


def test_average_init_and_full_rank_relaxation_give_back_each_layers_projections():
    src = model(n_prelude=0, n_core=4, n_coda=0)
    rec = recursify(src, 2, "average", lora_rank=32)  # d_model = 32: full rank
    for j, layer in enumerate(rec.core):
        for name, lora in layer.named_modules():
            if not isinstance(lora, LoRALinear):
                continue
            originals = [src.core[r * 2 + j].get_submodule(name).weight for r in range(2)]
            torch.testing.assert_close(lora.weight, (originals[0] + originals[1]) / 2)
            for r, w in enumerate(originals):
                torch.testing.assert_close(lora.weight + lora.delta(r), w, atol=1e-5, rtol=1e-5)
    low = recursify(src, 2, "average", lora_rank=2)
    x = tokens()
    err = [(m(x).logits - src(x).logits).abs().mean() for m in (recursify(src, 2, "average"), low)]
    assert err[1] < err[0]  # a rank-2 relaxation moves towards the original model


def test_bad_recursions_raise_one_clear_error():
    src = model(n_prelude=1, n_core=2, n_coda=1)  # 4 layers
    with pytest.raises(ConfigError, match=r"does not divide the model's 4 layers; choose one of \[1, 2, 4\]"):
        recursify(src, 3)
    with pytest.raises(ConfigError, match="--init"):
        recursify(src, 2, "lowest")
    with pytest.raises(ConfigError, match="n_recursions=1"):
        recursify(model(n_recursions=2), 2)


def test_recursify_command_writes_a_loadable_checkpoint_and_reports_bad_input(tmp_path, capsys):
    src = tmp_path / "src"
    save_model(model(n_prelude=1, n_core=2, n_coda=1), src)
    ByteTokenizer().save(src)
    out = str(tmp_path / "r")
    assert main(["recursify", str(src), "--recursions", "2", "--lora", "2", "--out", out]) == 0
    loaded = load_model(tmp_path / "r")
    assert (loaded.config.n_core, loaded.config.n_recursions, loaded.config.lora_rank) == (2, 2, 2)
    assert load_tokenizer(tmp_path / "r").kind == "byte"
    assert main(["recursify", str(src), "--recursions", "3", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not divide the model's 4 layers" in err[0]
    assert not (tmp_path / "bad").exists()


def test_train_init_adds_a_mor_router_to_a_recursified_checkpoint(tmp_path):
    """``--set router=expert_choice`` applies to the --init checkpoint's config (3 recursions),
    not to the default model's (one recursion, where the router is refused)."""
    src = tmp_path / "src"
    save_model(model(n_prelude=0, n_core=3, n_coda=0, vocab_size=320), src)  # the byte tokenizer's ids fit
    ByteTokenizer().save(src)
    assert main(["recursify", str(src), "--recursions", "3", "--out", str(tmp_path / "r")]) == 0
    assert main(["train", "--init", str(tmp_path / "r"), "--no-progress", "--data", "finetune",
                 "--out", str(tmp_path / "mor"), "--set", "router=expert_choice", "seq_len=32",
                 "batch_size=2", "steps=2", "warmup_steps=1", "eval_interval=2", "eval_iters=1",
                 "sample_tokens=0", "max_files=3", "threads=1"]) == 0
    trained = load_model(tmp_path / "mor" / "latest")
    assert (trained.config.router, trained.config.n_recursions) == ("expert_choice", 3)
    assert main(["train", "--init", str(tmp_path / "r"), "--out", str(tmp_path / "bad"),
                 "--set", "n_heads=3"]) == 2  # a shape change of the checkpoint: one clear error
