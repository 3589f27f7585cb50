"""`looplm generate/chat --draft`, `looplm train-draft` and `looplm bench speculative`: same text
as plain decoding, a stats line on stderr, one error line for bad flags."""

from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors import safe_open

from looplm.bench.speculative import same_output
from looplm.chat import Chat
from looplm.checkpoint import load_model, save_model
from looplm.cli import main
from looplm.data.tokenizer import ByteTokenizer, load_tokenizer
from looplm.draft_heads import distill_heads, new_heads
from looplm.generate import generate
from looplm.model import LoopConfig, LoopLM
from looplm.pretrained.convert import import_checkpoint
from tests.model.util import model
from tests.pretrained import synthetic as S

TOK = ByteTokenizer()
TEXT = "def add(a, b):\n    return a + b\n\n" * 20 + "The quick brown fox jumps over the lazy dog. " * 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = LoopLM(LoopConfig(vocab_size=TOK.vocab_size, d_model=32, n_heads=2, n_core=3,
                              mixer="gated_deltanet",
                              attn_every=3, init_std=0.5, max_seq_len=512))
    directory = tmp_path_factory.mktemp("ckpt")
    save_model(model, directory)
    TOK.save(directory)
    text = directory / "text.txt"
    text.write_text(TEXT)
    return directory, model, text


def test_generate_with_a_draft_prints_the_plain_text(checkpoint, capsys):
    directory, model, _ = checkpoint
    want = generate(model, TOK, "def add(a, b):\n    return a", max_new_tokens=20)
    for spec in ("ngram:3", "layers:2"):
        assert main(["generate", str(directory), "--prompt", "def add(a, b):\n    return a",
                     "--max-new-tokens", "20", "--draft", spec, "--gamma", "3"]) == 0
        captured = capsys.readouterr()
        assert captured.out == want + "\n"
        assert "acceptance" in captured.err and "tokens/s" in captured.err


@pytest.mark.parametrize("flags,match", [
    (["--draft", "layers:3"], "K must be in 1..2"),
    (["--draft", "recursions:2"], "needs a recursive model"),
    (["--draft", "ngram:0"], "N must be at least 1"),
    (["--draft", "ngram:2", "--gamma", "0"], "--gamma"),
    (["--draft", "ngram:2", "--repetition-penalty", "1.3"], "repetition_penalty"),
])
def test_bad_draft_flags_are_one_error_line(checkpoint, capsys, flags, match):
    directory = checkpoint[0]
    assert main(["generate", str(directory), "--prompt", "ab", "--max-new-tokens", "4", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and match in err[0]


def test_train_draft_heads_then_decode_with_them(checkpoint, tmp_path, capsys):
    directory, model, text = checkpoint
    want = generate(model, TOK, "The quick", max_new_tokens=16)
    for kind in ("exit:1", "medusa:2"):
        out = tmp_path / f"{kind.replace(':', '')}.safetensors"
        assert main(["train-draft", str(directory), "--kind", kind, "--data", str(text), "--out", str(out),
                     "--steps", "3", "--seq-len", "32"]) == 0
        assert "after 3 steps" in capsys.readouterr().out
        assert main(["generate", str(directory), "--prompt", "The quick", "--max-new-tokens", "16",
                     "--draft", f"heads:{out}"]) == 0
        assert capsys.readouterr().out == want + "\n"
    assert main(["train-draft", str(directory), "--kind", "exit:3", "--data", str(text),
                 "--out", str(tmp_path / "x.safetensors"), "--steps", "1"]) == 2
    assert "layer must be in 1..2" in capsys.readouterr().err
    first = tmp_path / "medusa2.safetensors"
    more = tmp_path / "more.safetensors"
    assert main(["train-draft", str(directory), "--kind", "medusa:2", "--data", str(text), "--out", str(more),
                 "--steps", "2", "--seq-len", "32", "--init", str(first), "--draft-vocab", "5"]) == 0
    with safe_open(str(first), "pt") as a, safe_open(str(more), "pt") as b:  # the shortlist is kept
        assert torch.equal(a.get_tensor("vocab"), b.get_tensor("vocab")) and b.get_tensor("vocab").numel() > 5
    assert main(["train-draft", str(directory), "--kind", "medusa:3", "--data", str(text), "--out", str(more),
                 "--steps", "1", "--init", str(first)]) == 2
    assert "holds medusa:2 heads, not medusa:3" in capsys.readouterr().err
    assert main(["train-draft", str(directory), "--kind", "tree:2", "--out", str(tmp_path / "x")]) == 2
    assert "--kind" in capsys.readouterr().err


def test_distillation_lowers_the_loss(checkpoint):
    model = checkpoint[1]
    tokens = torch.tensor(TOK.encode(TEXT))
    heads = new_heads(model, "medusa", 2)
    losses = distill_heads(model, heads, tokens, seq_len=32, batch_size=2, steps=60, lr=3e-3)
    assert sum(losses[-10:]) < sum(losses[:10])
    assert all(p.grad is None for p in model.parameters())  # the model stays frozen


def test_chat_with_a_draft(tmp_path, monkeypatch, capsys):
    hf, out = tmp_path / "hf", tmp_path / "model"
    hf.mkdir()
    S.save_hf_dir(hf)
    import_checkpoint(hf, out)
    chat = Chat(load_model(out), load_tokenizer(out), max_new_tokens=8)
    want = "".join(chat.reply("Hello there"))
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n"))
    assert main(["chat", str(out), "--max-new-tokens", "8", "--draft", "layers:1"]) == 0
    captured = capsys.readouterr()
    assert captured.out == want + "\n" and "acceptance" in captured.err


def test_bench_speculative_quick(checkpoint, tmp_path, capsys):
    directory, _, text = checkpoint
    assert main(["bench", "speculative", str(directory), "--quick", "--prose", str(text), "--code", str(text),
                 "--drafts", "ngram:3", "layers:1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "speculative.json").read_text())["rows"]
    assert [r["draft"] for r in rows] == ["plain", "ngram:3", "layers:1"] * 2
    assert all(r["identical"] for r in rows)
    assert all(r["verify_ms"] > 0 and r["step_ms"] > 0 for r in rows)
    assert all(0 <= r["accepted_per_round"] <= 4 for r in rows[1:] if r["draft"] != "plain")
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "a verification of 5 tokens" in printed


def test_bench_tells_a_near_tie_from_a_wrong_token():
    """``same_output``: a first difference where the model's two candidates tie is rounding
    ("tie"), one where the emitted token is far behind the model's choice is a bug ("NO")."""
    m = model(init_std=1.0)
    prompt = [3, 4, 5, 6]
    with torch.no_grad():
        logits = m(torch.tensor([prompt])).logits[0, -1]
        best, worst = int(logits.argmax()), int(logits.argmin())
        twin = next(t for t in range(m.config.vocab_size) if t not in (best, *prompt))
        table = m.embed.weight if m.head is None else m.head.weight
        table[twin] = table[best]  # its logit now equals the best one's
    assert same_output(m, prompt, [best, 1], [best, 1]) == "yes"
    assert same_output(m, prompt, [best, 1], [twin, 2]) == "tie"
    assert same_output(m, prompt, [best, 1], [worst, 2]) == "NO"
    assert same_output(m, prompt, [best, 1], [best]) == "NO"  # cut short
