"""Sources: files, directories, globs, JSON Lines, Parquet, the hub; corrupted inputs."""

import json
import sys
import types

import pytest

from looplm.data import sources
from looplm.data.corpus import resolve_source
from looplm.data.sources import HFSource
from looplm.data.stdlib import stdlib_files, stdlib_root
from looplm.errors import DataError


def docs(spec, **kw):
    return [(d.key, d.data, d.last) for d in resolve_source(spec, **kw).documents()]


def test_text_files_directories_and_globs(tmp_path):
    (tmp_path / "b.txt").write_text("bee\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.py").write_text("x = 1\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("hidden\n")
    (tmp_path / ".hidden").write_text("hidden\n")
    assert docs(str(tmp_path)) == [("b.txt", b"bee\n", True), ("sub/a.py", b"x = 1\n", True)]
    assert [k for k, _, _ in docs(str(tmp_path / "**" / "*.py"))] == [(tmp_path / "sub" / "a.py").as_posix()]
    assert docs(str(tmp_path / "b.txt")) == [("b.txt", b"bee\n", True)]
    assert len(docs([str(tmp_path / "b.txt"), str(tmp_path / "sub")])) == 2
    assert len(docs(str(tmp_path), max_files=1)) == 1


def test_invalid_utf8_is_kept_as_bytes(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe\xc3 end\n")
    assert docs(str(tmp_path / "bad.txt"))[0][1] == b"ok \xff\xfe\xc3 end\n"
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    assert docs(str(tmp_path / "bad.jsonl"))[0][1] == "caf\ufffd".encode()


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        resolve_source(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="hf:someone/dataset"):
        resolve_source("someone/dataset")
    with pytest.raises(DataError, match="no files match"):
        resolve_source(str(tmp_path / "*.txt"))
    with pytest.raises(DataError, match="empty data path"):
        resolve_source([" "])


def test_explicit_empty_or_binary_file_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="empty.txt is empty"):
        docs(str(tmp_path / "empty.txt"))
    with pytest.raises(DataError, match="blob.bin looks binary"):
        docs(str(tmp_path / "blob.bin"))


def test_directory_skips_empty_and_binary_files(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01garbage")
    (tmp_path / "good.txt").write_text("hello\n")
    src = resolve_source(str(tmp_path))
    assert [d.key for d in src.documents()] == ["good.txt"]
    assert len(src.skipped) == 2 and any("binary" in s for s in src.skipped)


def test_jsonl(tmp_path):
    rows = [{"text": "one", "id": 1}, {"text": ""}, {"text": None}, {"text": "two"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert docs(str(tmp_path / "d.jsonl")) == [("d.jsonl:1", b"one", True), ("d.jsonl:4", b"two", True)]
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    assert docs(str(tmp_path / "c.jsonl"), text_field="content")[0][1] == b"x"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "a"}\n{"text": oops}\n', r"bad.jsonl:2: invalid JSON"),
        ('{"body": "a"}\n', r"bad.jsonl:1: no field 'text' \(fields: 'body'\).*--set text_field=NAME"),
        ('{"text": 3}\n', r"field 'text' is int"),
        ('["text"]\n', r"expected a JSON object"),
        ("\n\n", r"no rows with text"),
    ],
)
def test_jsonl_errors(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        docs(str(tmp_path / "bad.jsonl"))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": ["alpha", None, "beta\xe9"], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)
    assert docs(str(tmp_path / "d.parquet")) == [
        ("d.parquet:1", b"alpha", True), ("d.parquet:3", "beta\xe9".encode(), True)
    ]
    with pytest.raises(DataError, match=r"no column 'body' \(columns: text, n\)"):
        docs(str(tmp_path / "d.parquet"), text_field="body")
    with pytest.raises(DataError, match="column 'n' is int64"):
        docs(str(tmp_path / "d.parquet"), text_field="n")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="bad.parquet is not a readable Parquet file"):
        docs(str(tmp_path / "bad.parquet"))


def test_large_text_file_arrives_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_BYTES", 64)
    text = "".join(f"line {i} é中\n" for i in range(50)).encode() + "no newline é中 ".encode() * 20
    (tmp_path / "big.txt").write_bytes(text)
    pieces = docs(str(tmp_path / "big.txt"))
    assert len(pieces) > 5
    assert b"".join(p for _, p, _ in pieces) == text
    assert [last for _, _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    for _, p, _ in pieces:
        p.decode("utf-8")  # cut at a line end or a character boundary


def test_hub_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="needs the `datasets` package: pip install datasets"):
        list(resolve_source("hf:someone/corpus").documents())


def test_hub_unreachable(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match=r"could not load hf:someone/corpus:cfg .*ConnectionError"):
        list(resolve_source("hf:someone/corpus:cfg").documents())


def test_hub_rows(monkeypatch):
    rows = [{"text": "a"}, {"text": ""}, {"text": "b"}]
    fake = types.SimpleNamespace(load_dataset=lambda name, config, split, streaming: iter(rows))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    src = resolve_source("hf:someone/corpus")
    assert isinstance(src, HFSource)
    got = [(d.key, d.data) for d in src.documents()]
    assert got == [("someone/corpus:0", b"a"), ("someone/corpus:2", b"b")]


def test_stdlib_files():
    files = stdlib_files()
    keys = [k for _, k in files]
    assert keys == sorted(keys) and len(keys) > 100
    assert "os.py" in keys and "json/__init__.py" in keys
    assert not any("site-packages" in k or "__pycache__" in k or k.startswith("_sysconfigdata") for k in keys)
    assert all(p == stdlib_root() / k for p, k in files[:20])


def test_fingerprint_changes_with_content(tmp_path):
    (tmp_path / "a.txt").write_text("one\n")
    before = resolve_source(str(tmp_path)).fingerprint()
    assert resolve_source(str(tmp_path)).fingerprint() == before
    (tmp_path / "a.txt").write_text("one more\n")
    assert resolve_source(str(tmp_path)).fingerprint() != before
