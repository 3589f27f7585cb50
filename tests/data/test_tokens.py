"""Token files: streaming write, memory-mapped read, atomicity, damage detection, tail split."""

import numpy as np
import pytest

from looplm.data.tokens import TokenFile, TokenWriter, split_tail, token_dtype
from looplm.errors import DataError


def test_dtype_by_vocab():
    assert token_dtype(259) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


@pytest.mark.parametrize("vocab", [300, 100_000])
def test_round_trip_streams(tmp_path, vocab):
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, vocab, size=n) for n in (0, 5, 17, 3, 40)]
    with TokenWriter(tmp_path / "t.bin", vocab, "tok-x", buffer_tokens=8) as w:
        for c in chunks:
            w.write(c, text_bytes=2 * len(c), documents=1)
    f = TokenFile(tmp_path / "t.bin")
    assert isinstance(f.tokens, np.memmap) and f.tokens.dtype == token_dtype(vocab)
    np.testing.assert_array_equal(f.tokens, np.concatenate(chunks))
    assert (len(f), f.text_bytes, f.tokenizer_id, f.meta["documents"]) == (65, 130, "tok-x", 5)
    assert f.bytes_per_token == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin", "t.json"]


def test_empty_file(tmp_path):
    TokenWriter(tmp_path / "e.bin", 300, "x").close()
    assert len(TokenFile(tmp_path / "e.bin")) == 0


def test_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), TokenWriter(tmp_path / "t.bin", 300, "x", buffer_tokens=2) as w:
        w.write(np.arange(10))
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 300\)"):
        TokenWriter(tmp_path / "u.bin", 300, "x").write(np.array([1, 300]))


def test_damaged_files_are_detected(tmp_path):
    with TokenWriter(tmp_path / "t.bin", 300, "x") as w:
        w.write(np.arange(10))
    with open(tmp_path / "t.bin", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(DataError, match="damaged"):
        TokenFile(tmp_path / "t.bin")
    (tmp_path / "t.json").write_text("{")
    with pytest.raises(DataError, match="unreadable token sidecar"):
        TokenFile(tmp_path / "t.bin")
    with pytest.raises(DataError, match="missing"):
        TokenFile(tmp_path / "other.bin")


def test_split_tail(tmp_path):
    nbytes = np.array([1, 2, 3, 0], dtype=np.int64)  # id 3 plays eos
    ids = np.array([0, 1, 2, 3] * 25)
    with TokenWriter(tmp_path / "t.bin", 4, "x") as w:
        w.write(ids, text_bytes=int(nbytes[ids].sum()), documents=25)
    head, tail = split_tail(tmp_path / "t.bin", tmp_path / "v.bin", 0.1, nbytes, chunk=3)
    assert (len(head), len(tail)) == (90, 10)
    np.testing.assert_array_equal(np.concatenate([head.tokens, tail.tokens]), ids)
    assert head.text_bytes == nbytes[ids[:90]].sum() and tail.text_bytes == nbytes[ids[90:]].sum()
    assert TokenFile(tmp_path / "t.bin").meta["count"] == 90
    with TokenWriter(tmp_path / "one.bin", 4, "x") as w:
        w.write(np.array([1]))
    with pytest.raises(DataError, match="too little text"):
        split_tail(tmp_path / "one.bin", tmp_path / "v2.bin", 0.1, nbytes)
