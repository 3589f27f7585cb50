"""`looplm chat`: the model's chat template over a multi-turn conversation, streaming, end of
turn, /reset and /exit through a pipe; parity of the prompt with transformers' template."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from looplm.chat import Chat, end_of_turn_ids
from looplm.checkpoint import load_model
from looplm.data.tokenizer import load_tokenizer
from looplm.errors import ConfigError
from looplm.generate import generate_ids
from looplm.pretrained.convert import import_checkpoint
from looplm.pretrained.pull import cached_model_path
from tests.pretrained import synthetic as S

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A tiny random Llama with a ChatML template, as a Hugging Face directory and its import."""
    hf = tmp_path_factory.mktemp("hf")
    S.save_hf_dir(hf)
    out = tmp_path_factory.mktemp("ckpt") / "model"
    import_checkpoint(hf, out)
    return hf, out


def _chat(out: Path, **kw) -> Chat:
    return Chat(load_model(out), load_tokenizer(out), **kw)


def test_end_of_turn_is_im_end_and_eos(imported):
    tok = load_tokenizer(imported[1])
    ends = end_of_turn_ids(tok)
    assert tok.encode("<|im_end|>")[0] in ends and tok.eos_id in ends
    assert all(len(tok.encode(t)) > 1 for t in ("hello", " world"))  # plain text is not an end


def test_second_turn_prompt_and_reply_match_transformers(imported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, out = imported
    chat = _chat(out, max_new_tokens=6)
    first = "".join(chat.reply("Hello there"))
    pieces = list(chat.reply("And the fox?"))
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[1]["content"] == first and chat.messages[3]["content"] == "".join(pieces)
    ref_tok = AutoTokenizer.from_pretrained(hf)
    ref = AutoModelForCausalLM.from_pretrained(hf).eval()
    convo = chat.messages[:3]
    ids = ref_tok.apply_chat_template(convo, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    chat.messages = convo
    assert chat.prompt_ids() == ids
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                            eos_token_id=sorted(chat.ends))[0, len(ids):].tolist()
    want = [t for t in want if t not in chat.ends]
    assert "".join(pieces) == load_tokenizer(out).decode(want)


def test_reply_streams_and_stops_at_end_of_turn(imported):
    chat = _chat(out := imported[1], max_new_tokens=8)
    chat.messages.append({"role": "user", "content": "Pack my box"})
    prompt = chat.prompt_ids()
    chat.reset()
    free = generate_ids(chat.model, [prompt], max_new_tokens=8)[0]
    chat.ends = frozenset({free[3]})  # pretend the 4th token ends the turn
    pieces = list(chat.reply("Pack my box"))
    tok = load_tokenizer(out)
    assert "".join(pieces) == tok.decode(free[:free.index(free[3])])
    chat.ends = frozenset()
    assert len([p for p in chat.reply("Pack my box") if p]) > 1  # text arrives in several pieces


def test_checkpoint_without_template_is_a_clear_error(tmp_path):
    from looplm.data.tokenizer import ByteTokenizer
    from looplm.model import LoopConfig, LoopLM

    with pytest.raises(ConfigError, match="chat template"):
        Chat(LoopLM(LoopConfig(vocab_size=259, d_model=32, n_heads=2, n_core=1)), ByteTokenizer())


def _pipe(out: Path, text: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "looplm", "chat", str(out), *flags], input=text,
                          capture_output=True, text=True, env=env, timeout=300)


def test_pipe_reset_and_exit(imported):
    out = imported[1]
    done = _pipe(out, "Hello there\nAnd the fox?\n/reset\nHello there\n/exit\nnever read\n",
                 "--max-new-tokens", "6")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    chat = _chat(out, max_new_tokens=6)
    first = "".join(chat.reply("Hello there"))
    second = "".join(chat.reply("And the fox?"))
    assert "\n" not in first + second  # one line per reply for this comparison
    assert lines[:4] == [first, second, first, ""]  # after /reset the first answer again; /exit stops


def test_a_message_too_long_is_reported_and_the_chat_goes_on(imported):
    done = _pipe(imported[1], "fox " * 600 + "\nHello there\n", "--max-new-tokens", "6")
    assert done.returncode == 0 and "error:" in done.stderr and "context" in done.stderr
    chat = _chat(imported[1], max_new_tokens=6)
    assert done.stdout == "".join(chat.reply("Hello there")) + "\n"


@pytest.mark.skipif(not cached_model_path("smollm2").is_file(),
                    reason="SmolLM2 is not in the cache (looplm pull smollm2)")
def test_smollm2_knows_the_capital_of_france(tmp_path):
    out = tmp_path / "smol"
    import_checkpoint(cached_model_path("smollm2"), out)
    done = _pipe(out, "What is the capital of France?\n", "--max-new-tokens", "24")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
