"""prepare_corpus: determinism, split, dedupe, eos separation, cache, no partial output."""

import numpy as np
import pytest

from looplm.data import corpus as corpus_mod
from looplm.data.corpus import cache_root, in_validation, prepare_corpus
from looplm.data.stdlib import stdlib_files
from looplm.data.tokenizer import ByteTokenizer
from looplm.errors import ConfigError, DataError

N_FILES = 40


def _leftovers(root):
    return [p.name for p in (root / "corpora").iterdir() if p.name.startswith(".")]


def test_stdlib_build_is_deterministic(tmp_path):
    a = prepare_corpus(None, "byte", tmp_path / "a", max_files=N_FILES)
    b = prepare_corpus("stdlib", "byte", tmp_path / "b", max_files=N_FILES)
    for split in ("train", "val"):
        np.testing.assert_array_equal(getattr(a, split).tokens, getattr(b, split).tokens)
    assert a.stats.documents == b.stats.documents and a.stats.train_bytes == b.stats.train_bytes
    assert a.path.name == b.path.name  # the same cache key on every build


def test_split_dedupe_and_eos(tmp_path):
    files = {"a.txt": "alpha\n", "b.txt": "beta\n", "c.txt": "alpha\n", "d.txt": "gamma \xe9\n"}
    files.update({f"f{i}.txt": f"file {i}\n" for i in range(200)})
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    c = prepare_corpus(str(tmp_path), "byte", tmp_path / "cache", val_fraction=0.1)
    assert c.stats.duplicates == 1 and c.stats.documents == len(files) - 1
    val_keys = sorted(k for k in files if k != "c.txt" and in_validation(k, 0.1))
    assert 5 < len(val_keys) < 40
    eos = c.tokenizer.eos_id
    assert int((c.val.tokens == eos).sum()) == len(val_keys)
    assert int((c.train.tokens == eos).sum()) == len(files) - 1 - len(val_keys)
    val_text = ByteTokenizer().decode(c.val.tokens)
    assert sorted(val_text.split("\n")[:-1]) == sorted(files[k].rstrip("\n") for k in val_keys)
    assert c.stats.bytes == sum(len(t.encode()) for k, t in files.items() if k != "c.txt")
    assert c.val.text_bytes == c.stats.val_bytes and c.stats.bytes_per_token < 1.0  # eos carries no text


def test_single_file_splits_by_position(tmp_path):
    text = "".join(f"line {i}\n" for i in range(500))
    (tmp_path / "one.txt").write_text(text)
    c = prepare_corpus(str(tmp_path / "one.txt"), "byte", tmp_path / "cache", val_fraction=0.05)
    both = np.concatenate([c.train.tokens, c.val.tokens])
    assert c.tokenizer.decode(both) == text and len(c.val) == round(0.05 * (len(text) + 1))
    assert c.stats.train_bytes + c.stats.val_bytes == len(text)


def test_cache_hit_skips_the_build(tmp_path, monkeypatch):
    first = prepare_corpus(None, "byte", tmp_path, max_files=5)
    monkeypatch.setattr(corpus_mod, "_build", lambda *a: pytest.fail("rebuilt a cached corpus"))
    again = prepare_corpus(None, ByteTokenizer(), tmp_path, max_files=5)
    assert again.path == first.path
    monkeypatch.setenv("LOOPLM_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    assert prepare_corpus(None, "byte", max_files=5).path == first.path


def test_cache_key_follows_inputs(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("one two three four\n" * 20)
    base = prepare_corpus(str(tmp_path / "d"), "byte", tmp_path / "c").path
    assert prepare_corpus(str(tmp_path / "d"), "byte", tmp_path / "c", val_fraction=0.2).path != base
    (tmp_path / "d" / "a.txt").write_text("changed\n" * 20)
    assert prepare_corpus(str(tmp_path / "d"), "byte", tmp_path / "c").path != base


def test_bpe_corpus_and_tokenizer_round_trip(tmp_path):
    c = prepare_corpus(None, "bpe:600", tmp_path, max_files=N_FILES)
    assert c.stats.bytes_per_token > 1.5 and c.tokenizer.vocab_size <= 600
    assert c.train.tokenizer_id == c.tokenizer.identity == c.stats.tokenizer
    nbytes = c.tokenizer.token_nbytes()
    assert int(nbytes[np.asarray(c.val.tokens)].sum()) == c.val.text_bytes  # valid UTF-8 stdlib files
    again = prepare_corpus(None, str(c.path / "tokenizer"), tmp_path / "other", max_files=N_FILES)
    np.testing.assert_array_equal(again.train.tokens, c.train.tokens)


def test_unusable_data_leaves_no_output(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "empty.txt").write_bytes(b"")
    (tmp_path / "d" / "blob.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match=r"no text found in d \(2 files skipped"):
        prepare_corpus(str(tmp_path / "d"), "byte", tmp_path / "cache")
    assert list((tmp_path / "cache" / "corpora").iterdir()) == []
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{broken\n')
    with pytest.raises(DataError, match="bad.jsonl:2: invalid JSON"):
        prepare_corpus(str(tmp_path / "bad.jsonl"), "bpe:300", tmp_path / "cache")
    assert list((tmp_path / "cache" / "corpora").iterdir()) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="val_fraction"):
        prepare_corpus(None, "byte", tmp_path, val_fraction=0.0)
    with pytest.raises(ConfigError, match="bpe:<vocab size>"):
        prepare_corpus(None, "bpe:lots", tmp_path, max_files=2)
    with pytest.raises(ConfigError, match="unknown tokenizer"):
        prepare_corpus(None, "sentencepiece", tmp_path, max_files=2)


def test_stdlib_validation_is_by_file_hash():
    keys = [k for _, k in stdlib_files()]
    frac = sum(in_validation(k, 0.015) for k in keys) / len(keys)
    assert 0.005 < frac < 0.03


def test_glob_source_names_a_safe_directory(tmp_path):
    (tmp_path / "a b.txt").write_text("hello world\n" * 10)
    c = prepare_corpus(str(tmp_path / "*.txt"), "byte", tmp_path / "cache")
    assert c.path.parent == tmp_path / "cache" / "corpora"
    assert not set(c.path.name) & set("* /?[")
    assert "1 documents" in c.describe() and "byte-v1" in c.describe()


def test_all_documents_in_validation_falls_back_to_a_position_split(tmp_path):
    names = [n for n in (f"f{i}.txt" for i in range(20)) if in_validation(n, 0.9)][:3]
    assert len(names) == 3
    for n in names:
        (tmp_path / n).write_text(f"{n} " * 30 + "\n")
    c = prepare_corpus(str(tmp_path), "bpe:300", tmp_path / "cache", val_fraction=0.9)
    assert len(c.train) > 0 and len(c.val) > len(c.train)  # the last 90% of the tokens
    text = c.tokenizer.decode(np.concatenate([c.train.tokens, c.val.tokens]))
    assert text == "".join((tmp_path / n).read_text() for n in sorted(names))
