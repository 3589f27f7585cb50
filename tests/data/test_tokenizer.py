"""Tokenizers: round trips over arbitrary text and bytes, specials, save/load, errors."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from looplm.data.tokenizer import (
    SPECIAL_TOKENS,
    BPETokenizer,
    ByteTokenizer,
    _byte_level_alphabet,
    load_tokenizer,
)
from looplm.errors import CheckpointError, ConfigError

TRAIN_TEXT = [
    "def f(x):\n    return x + 1\n",
    "class A:\n    def __init__(self):\n        self.x = 0\n",
    "for i in range(10):\n    print(i, 'héllo', \"wörld\")\n",
    "import os\nimport sys\n# comment: ünïcödé ✓ 中文\n",
] * 20


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(TRAIN_TEXT, 400)


@given(st.binary(max_size=300))
def test_byte_round_trip_bytes(data):
    tok = ByteTokenizer()
    ids = tok.encode(data)
    assert ids == list(data)
    assert tok.decode_bytes(ids) == data
    assert tok.decode(ids) == data.decode("utf-8", errors="replace")


@given(st.text(max_size=200))
def test_byte_round_trip_text(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


@given(st.text(max_size=200))
def test_bpe_round_trip_text(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert int(bpe.token_nbytes()[ids].sum()) == len(text.encode())  # bytes per token for bits/byte


@given(st.binary(max_size=200))
def test_bpe_invalid_utf8_never_crashes(bpe, data):
    text = data.decode("utf-8", errors="replace")
    assert bpe.decode(bpe.encode(data)) == text


@given(st.lists(st.integers(-5, 600), max_size=50))
def test_decode_arbitrary_ids_never_crashes(bpe, ids):
    for tok in (ByteTokenizer(), bpe):
        assert isinstance(tok.decode(ids), str)


def test_bpe_merges_and_specials(bpe):
    assert 259 < bpe.vocab_size <= 400  # a tiny corpus runs out of pairs to merge
    assert len(bpe.encode(TRAIN_TEXT[0])) < len(TRAIN_TEXT[0]) / 2  # it learnt merges
    specials = {bpe.bos_id, bpe.eos_id, bpe.pad_id}
    assert len(specials) == 3 and max(specials) < bpe.vocab_size
    for tok in (ByteTokenizer(), bpe):
        literal = "x = '" + "".join(SPECIAL_TOKENS) + "'"
        assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(tok.encode(literal))
        assert tok.decode([tok.bos_id, *tok.encode("ab"), tok.eos_id, tok.pad_id]) == "ab"


def test_byte_level_alphabet_matches_tokenizers():
    from tokenizers import pre_tokenizers

    alphabet = _byte_level_alphabet()
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(alphabet.values()) == list(range(256))


def test_save_load_round_trip(bpe, tmp_path):
    for tok in (ByteTokenizer(), bpe):
        tok.save(tmp_path / tok.kind)
        back = load_tokenizer(tmp_path / tok.kind)
        assert type(back) is type(tok)
        assert back.identity == tok.identity and back.vocab_size == tok.vocab_size
        assert back.encode(TRAIN_TEXT[2]) == tok.encode(TRAIN_TEXT[2])
        assert (back.bos_id, back.eos_id, back.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_bpe_loads_in_transformers(bpe, tmp_path):
    from transformers import AutoTokenizer

    bpe.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode(TRAIN_TEXT[1], add_special_tokens=False) == bpe.encode(TRAIN_TEXT[1])
    assert hf.eos_token_id == bpe.eos_id


def test_training_is_deterministic(bpe):
    again = BPETokenizer.train(TRAIN_TEXT, 400)
    assert again.identity == bpe.identity


def test_encode_arrays_matches_encode(bpe):
    for tok in (ByteTokenizer(), bpe):
        arrays = tok.encode_arrays([t.encode() for t in TRAIN_TEXT[:4]])
        assert [a.tolist() for a in arrays] == [tok.encode(t) for t in TRAIN_TEXT[:4]]
        assert all(isinstance(a, np.ndarray) for a in arrays)


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size"):
        BPETokenizer.train(TRAIN_TEXT, 100)
    with pytest.raises(TypeError, match="str or bytes"):
        ByteTokenizer().encode(123)
    with pytest.raises(CheckpointError, match="tokenizer_config.json is missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"looplm_tokenizer": "wordpiece"}))
    with pytest.raises(CheckpointError, match="unknown tokenizer kind"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"looplm_tokenizer": "bpe"}))
    with pytest.raises(CheckpointError, match="unreadable BPE tokenizer"):
        load_tokenizer(tmp_path)
