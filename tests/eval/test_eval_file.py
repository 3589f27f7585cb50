"""`looplm eval --data FILE` scores the whole file: equal to per-window losses computed here."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn import functional as F

from looplm.checkpoint import save_model
from looplm.cli import main
from looplm.data.tokenizer import ByteTokenizer
from looplm.model import LoopConfig, LoopLM
from looplm.ops.qlinear import bf16_rows
from looplm.perplexity import windows

TOK = ByteTokenizer()
TEXT = "def f(x):\n    return x * 2  # twice\n" * 9  # 333 ASCII bytes = 333 tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = LoopLM(LoopConfig(vocab_size=TOK.vocab_size, d_model=32, n_heads=2, n_core=2, d_ffn=48,
                              init_std=0.2, max_seq_len=64)).eval()
    directory = tmp_path_factory.mktemp("ckpt")
    save_model(model, directory)
    TOK.save(directory)
    data = directory.parent / "text.txt"
    data.write_text(TEXT)
    return directory, model, data


def _eval(capsys, *argv: str) -> dict:
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _token_nll(model: LoopLM, ids: torch.Tensor, start: int, t: int) -> float:
    """-log p(ids[t] | ids[start:t]) from a full forward over that context alone."""
    with torch.no_grad():
        logits = model(ids[None, start:t]).logits[0, -1]
    return F.cross_entropy(logits[None].float(), ids[t:t + 1]).item()


def test_whole_file_equals_the_mean_of_independent_windows(checkpoint, capsys):
    directory, model, data = checkpoint
    ids = torch.tensor(TOK.encode(TEXT))
    L = 40
    nll = n = 0.0
    for s in range(0, len(ids) - 1, L):  # non-overlapping windows: inputs ids[s:s+L], targets shifted by one
        x, y = ids[s:s + L], ids[s + 1:s + L + 1]
        x = x[:len(y)]
        with torch.no_grad():
            logits = model(x[None]).logits[0]
        nll += F.cross_entropy(logits.float(), y, reduction="sum").item()
        n += len(y)
    got = _eval(capsys, str(directory), "--data", str(data), "--seq-len", str(L))
    assert got["tokens"] == len(ids) - 1 == n
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert got["bytes"] == len(TEXT) - 1  # one byte per scored token
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / (len(TEXT) - 1), rel=1e-5)
    batched = _eval(capsys, str(directory), "--data", str(data), "--seq-len", str(L), "--batch-size", "3")
    assert batched["loss"] == pytest.approx(got["loss"], rel=1e-5)


def test_strided_windows_score_each_token_with_its_window_context(checkpoint, capsys):
    directory, model, data = checkpoint
    ids = torch.tensor(TOK.encode(TEXT))[:90]
    L, S = 32, 12
    nll = 0.0
    for t in range(1, len(ids)):  # target t belongs to the first window reaching it
        k = next(k for k in range(len(ids)) if min(k * S + L, len(ids) - 1) >= t)
        nll += _token_nll(model, ids, k * S, t)
    got = _eval(capsys, str(directory), "--data", str(data), "--seq-len", str(L), "--stride", str(S),
                "--max-tokens", "90")
    assert got["tokens"] == 89 and got["stride"] == S
    assert got["loss"] == pytest.approx(nll / 89, rel=1e-5)


@given(n=st.integers(2, 300), window=st.integers(1, 70), data=st.data())
def test_windows_score_every_target_once(n, window, data):
    stride = data.draw(st.integers(1, window))
    ws = windows(n, window, stride)
    scored = [t for w in ws for t in range(w.end - w.scored + 1, w.end + 1)]
    assert scored == list(range(1, n))
    assert all(w.end - w.start <= window and w.start == i * stride for i, w in enumerate(ws))


@pytest.mark.parametrize("args, message", [
    (["--stride", "80", "--seq-len", "40"], "stride"),
    (["--max-tokens", "1"], "--max-tokens"),
])
def test_bad_windows_are_one_line_errors(checkpoint, capsys, args, message):
    directory, _, data = checkpoint
    assert main(["eval", str(directory), "--data", str(data), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_stride_without_data_is_an_error(checkpoint, capsys):
    assert main(["eval", str(checkpoint[0]), "--stride", "4"]) == 2
    assert "--data" in capsys.readouterr().err


def test_expert_choice_is_scored_causally_and_top_k_beside(tmp_path, capsys):
    torch.manual_seed(0)
    model = LoopLM(LoopConfig(vocab_size=TOK.vocab_size, d_model=32, n_heads=2, n_core=1, n_recursions=3,
                              router="expert_choice", layer_router="mod", mod_capacity=0.5, d_ffn=48,
                              init_std=0.2, max_seq_len=512)).eval()
    save_model(model, tmp_path / "ckpt")
    TOK.save(tmp_path / "ckpt")
    (tmp_path / "text.txt").write_text(TEXT)
    got = _eval(capsys, str(tmp_path / "ckpt"), "--data", str(tmp_path / "text.txt"), "--seq-len", "333")
    ids = torch.tensor(TOK.encode(TEXT))
    x, y = ids[None, :-1], ids[None, 1:]
    with torch.no_grad():
        topk = model(x, y).loss.item()
        for m in model.modules():
            if hasattr(m, "selection"):
                m.selection = "threshold"
        causal = model(x, y).loss.item()
    assert got["loss"] == pytest.approx(causal, rel=1e-5)
    assert got["loss_topk"] == pytest.approx(topk, rel=1e-5)
    assert causal != topk


@pytest.mark.skipif(not bf16_rows(), reason="no AMX bfloat16 tiles on this CPU or build")
def test_bf16_products_score_the_file_near_float32(checkpoint, capsys):
    """--bf16-products (the products of `looplm serve --bf16-prefill`) moves the loss by about
    bfloat16's rounding, not more, and not at all is suspicious (the products did not change)."""
    directory, _, data = checkpoint
    exact = _eval(capsys, str(directory), "--data", str(data), "--seq-len", "64")
    rounded = _eval(capsys, str(directory), "--data", str(data), "--seq-len", "64", "--bf16-products")
    assert rounded["tokens"] == exact["tokens"]
    assert 0 < abs(rounded["loss"] - exact["loss"]) < 0.01 * exact["loss"]


def test_bf16_products_need_data(checkpoint, capsys):
    directory, _, _ = checkpoint
    assert main(["eval", str(directory), "--bf16-products"]) == 2
    assert "--bf16-products apply to --data FILE" in capsys.readouterr().err
