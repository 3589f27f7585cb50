"""Sampling and streaming text: no model needed."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from looplm.data.tokenizer import ByteTokenizer
from looplm.generate import TextStream, sample_next

TOK = ByteTokenizer()


def _pieces(text: str, stop=(), eos_at: int | None = None) -> list[str]:
    stream = TextStream(TOK, stop)
    out = [stream.push(t) for t in TOK.encode(text)]
    return out + [stream.finish()]


def test_greedy_is_argmax():
    logits = torch.randn(5, 40)
    assert torch.equal(sample_next(logits), logits.argmax(-1))
    assert torch.equal(sample_next(logits, top_k=3, top_p=0.5), logits.argmax(-1))


def test_seeded_sampling_reproduces_and_differs_by_seed():
    logits = torch.zeros(4, 1000)
    draws = []
    for seed in (1, 1, 2):
        g = torch.Generator().manual_seed(seed)
        draws.append(sample_next(logits, temperature=1.0, generator=g))
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def test_top_k_keeps_only_the_k_largest():
    logits = torch.randn(3, 50)
    allowed = logits.topk(4, dim=-1).indices
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        t = sample_next(logits, temperature=5.0, top_k=4, generator=g)
        assert (allowed == t[:, None]).any(-1).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps the first two, top_p=0.85 three
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, temperature=1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert seen == {1, 3}
    seen = {int(sample_next(logits, temperature=1.0, top_p=0.85, generator=g)) for _ in range(300)}
    assert seen == {1, 2, 3}
    tiny = {int(sample_next(logits, temperature=1.0, top_p=1e-6, generator=g)) for _ in range(20)}
    assert tiny == {1}


def test_temperature_sharpens():
    logits = torch.tensor([[0.0, 1.0]]).expand(4000, 2)
    g = torch.Generator().manual_seed(0)
    hot = sample_next(logits, temperature=10.0, generator=g).float().mean()
    cold = sample_next(logits, temperature=0.1, generator=g).float().mean()
    assert 0.45 < hot < 0.6 and cold > 0.99


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"temperature": float("nan")},
                                    {"top_k": 0}, {"top_k": 2.5}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_sampling_values_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        sample_next(torch.zeros(1, 5), **kwargs)


def test_stream_emits_only_complete_utf8():
    text = "aé€😀b"
    pieces = _pieces(text)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # the 4-byte emoji comes out in one piece, at its last byte
    assert "😀" in pieces


@given(st.text(max_size=40), st.lists(st.text(min_size=1, max_size=4), max_size=3))
def test_stream_equals_text_cut_at_first_stop(text, stop):
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    want = text[:min(hits)] if hits else text
    pieces = _pieces(text, stop)
    assert "".join(pieces) == want.encode("utf-8", "replace").decode("utf-8")


def test_stop_string_across_tokens_is_held_back_then_cut():
    stream = TextStream(TOK, ["END"])
    out = [stream.push(t) for t in TOK.encode("abEN")]
    assert "".join(out) == "ab"  # "EN" might start "END": held back
    assert stream.push(ord("D")) == "" and stream.stopped
    assert stream.push(ord("x")) == "" and stream.finish() == ""


def test_held_text_released_when_stop_does_not_match():
    stream = TextStream(TOK, ["END"])
    assert "".join(stream.push(t) for t in TOK.encode("xEN")) == "x"
    assert stream.push(ord("!")) == "EN!"
