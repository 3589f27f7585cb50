"""`looplm generate`: streams a checkpoint's text; bad input gives one error line, exit 2."""

import pytest
import torch

from looplm.checkpoint import save_model
from looplm.cli import main
from looplm.data.tokenizer import ByteTokenizer
from looplm.generate import generate
from looplm.model import LoopConfig, LoopLM

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = LoopLM(LoopConfig(vocab_size=TOK.vocab_size, d_model=32, n_heads=2, n_core=2, mixer="gla",
                              tie_embeddings=False, init_std=0.2, max_seq_len=64))
    directory = tmp_path_factory.mktemp("ckpt")
    save_model(model, directory)
    TOK.save(directory)
    return directory, model


def test_streams_the_same_text_as_the_library(checkpoint, capsys):
    directory, model = checkpoint
    want = generate(model, TOK, "def f(", max_new_tokens=12, temperature=0.8, seed=3)
    assert main(["generate", str(directory), "--prompt", "def f(", "--max-new-tokens", "12",
                 "--temperature", "0.8", "--seed", "3"]) == 0
    assert capsys.readouterr().out == want + "\n"


def test_stop_flag(checkpoint, capsys):
    directory, model = checkpoint
    raw = generate(model, TOK, "ab", max_new_tokens=12)
    assert main(["generate", str(directory), "--prompt", "ab", "--max-new-tokens", "12",
                 "--stop", raw[4:6], "--stop", "never"]) == 0
    assert capsys.readouterr().out == raw[:raw.index(raw[4:6])] + "\n"


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x"], "does not exist"),
    (["--prompt", "", "--max-new-tokens", "3"], "empty"),
    (["--prompt", "x", "--top-p", "2"], "top_p"),
])
def test_user_errors_are_one_line(checkpoint, tmp_path, capsys, args, message):
    directory = tmp_path / "nothing" if message == "does not exist" else checkpoint[0]
    assert main(["generate", str(directory), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_unreadable_checkpoint(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "config.json" in capsys.readouterr().err
