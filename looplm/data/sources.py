"""Where text comes from: files, directories, globs, JSON Lines, Parquet, Hugging Face hub.

A source is a deterministic, streamed sequence of ``Document``s: nothing holds the corpus
in memory (a large text file arrives in pieces cut at line ends). Text stays bytes; invalid
UTF-8 is the tokenizer's business and never an error here. Errors a user can cause (a
missing path, an empty or binary file named explicitly, a bad JSON line, a missing field)
raise ``DataError`` naming the file and the fix; inside a directory, empty and binary
files are skipped and listed in ``Source.skipped``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from looplm.errors import DataError

PIECE_BYTES = 32 << 20  # a text file is read in pieces of about this size
_BINARY_PROBE = 8192  # like git: a NUL byte in the first 8 KiB means binary
_JSONL = (".jsonl", ".ndjson")
_PARQUET = (".parquet",)


@dataclass(frozen=True)
class Document:
    """One document or a piece of one. ``key`` is a stable name (it decides the split);
    ``last`` is False for all but the final piece of a file read in pieces."""

    key: str
    data: bytes
    last: bool = True


@dataclass(frozen=True)
class FileEntry:
    path: Path
    key: str
    explicit: bool  # named by the user (errors) rather than found in a directory (skipped)


@dataclass
class Source:
    """Base: ``label`` for names, ``fingerprint()`` for the cache key, ``documents()``."""

    label: str
    skipped: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        raise NotImplementedError

    def documents(self) -> Iterator[Document]:
        raise NotImplementedError


class FileSource(Source):
    """Local files. Kind by suffix: ``.jsonl``/``.ndjson`` (one JSON object a line, text in
    ``text_field``), ``.parquet`` (text column ``text_field``), anything else plain text."""

    def __init__(
        self, files: Sequence[FileEntry], label: str, text_field: str = "text", salt: str = ""
    ) -> None:
        super().__init__(label)
        self.files = list(files)
        self.text_field = text_field
        self._salt = salt

    def fingerprint(self) -> str:
        """Hash of the file list with sizes and modification times (as make and ccache do):
        cheap for corpora larger than RAM, and it changes whenever a file is edited."""
        h = hashlib.sha256(f"{self.label}\0{self.text_field}\0{self._salt}".encode())
        for f in self.files:
            try:
                st = f.path.stat()
            except OSError as e:
                raise DataError(f"cannot read {f.path}: {e.strerror}") from None
            h.update(f"{f.key}\0{f.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def documents(self) -> Iterator[Document]:
        self.skipped = []
        for f in self.files:
            suffix = f.path.suffix.lower()
            if suffix in _JSONL:
                yield from self._jsonl(f)
            elif suffix in _PARQUET:
                yield from self._parquet(f)
            else:
                yield from self._text(f)

    def _skip(self, f: FileEntry, reason: str) -> None:
        if f.explicit:
            raise DataError(f"{f.path} {reason}")
        self.skipped.append(f"{f.path}: {reason}")

    def _text(self, f: FileEntry) -> Iterator[Document]:
        try:
            with open(f.path, "rb") as fh:
                head = fh.read(PIECE_BYTES)
                if not head:
                    return self._skip(f, "is empty; give a file with text")
                if b"\0" in head[:_BINARY_PROBE]:
                    return self._skip(f, "looks binary (NUL bytes); give a text, .jsonl or .parquet file")
                while True:
                    tail = fh.read(PIECE_BYTES)
                    if not tail:
                        yield Document(f.key, head)
                        return
                    cut = _cut(head)
                    yield Document(f.key, head[:cut], last=False)
                    head = head[cut:] + tail
        except OSError as e:
            raise DataError(f"cannot read {f.path}: {e.strerror}") from None

    def _jsonl(self, f: FileEntry) -> Iterator[Document]:
        n = 0
        try:
            with open(f.path, "rb") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line.decode("utf-8", errors="replace"))
                    except json.JSONDecodeError as e:
                        raise DataError(
                            f"{f.path}:{lineno}: invalid JSON ({e.msg}); each line must be one JSON object"
                        ) from None
                    text = self._field(row, f"{f.path}:{lineno}")
                    if text:
                        n += 1
                        yield Document(f"{f.key}:{lineno}", text.encode("utf-8", errors="replace"))
        except OSError as e:
            raise DataError(f"cannot read {f.path}: {e.strerror}") from None
        if n == 0:
            self._skip(f, f"has no rows with text in field {self.text_field!r}")

    def _field(self, row: object, where: str) -> str | None:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if self.text_field not in row:
            keys = ", ".join(map(repr, list(row)[:10]))
            raise DataError(
                f"{where}: no field {self.text_field!r} (fields: {keys}); "
                "choose it with --set text_field=NAME"
            )
        text = row[self.text_field]
        if text is not None and not isinstance(text, str):
            raise DataError(f"{where}: field {self.text_field!r} is {type(text).__name__}, expected a string")
        return text

    def _parquet(self, f: FileEntry) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(f.path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{f.path} is not a readable Parquet file ({e})") from None
        names = pf.schema_arrow.names
        if self.text_field not in names:
            raise DataError(
                f"{f.path}: no column {self.text_field!r} (columns: {', '.join(names[:10])}); "
                "choose it with --set text_field=NAME"
            )
        kind = pf.schema_arrow.field(self.text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)):
            raise DataError(f"{f.path}: column {self.text_field!r} is {kind}, expected strings")
        row, n = 0, 0
        try:
            for batch in pf.iter_batches(columns=[self.text_field], batch_size=1024):
                for value in batch.column(0).to_pylist():
                    row += 1
                    if value:
                        n += 1
                        data = value if isinstance(value, bytes) else value.encode("utf-8", errors="replace")
                        yield Document(f"{f.key}:{row}", data)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{f.path} is not a readable Parquet file ({e})") from None
        if n == 0:
            self._skip(f, f"has no rows with text in column {self.text_field!r}")


def _cut(buf: bytes) -> int:
    """Where to end a piece: after the last newline, else at a UTF-8 character boundary."""
    nl = buf.rfind(b"\n")
    if nl >= 0:
        return nl + 1
    cut = len(buf)
    while cut > len(buf) - 4 and cut > 0 and buf[cut - 1] & 0xC0 == 0x80:
        cut -= 1
    if cut > 0 and buf[cut - 1] >= 0xC0:  # a lead byte whose continuation was cut off
        cut -= 1
    return cut or len(buf)


class HFSource(Source):
    """A Hugging Face ``datasets`` dataset, streamed (``hf:NAME`` or ``hf:NAME:CONFIG``, split
    ``train``). Needs the optional ``datasets`` package and the network."""

    def __init__(self, name: str, config: str | None, text_field: str = "text") -> None:
        super().__init__(f"hf-{name.replace('/', '--')}")
        self.name, self.config, self.text_field = name, config, text_field

    def fingerprint(self) -> str:
        # A hub dataset has no cheap content hash; a new revision needs a fresh cache dir.
        return hashlib.sha256(f"{self.name}\0{self.config}\0{self.text_field}".encode()).hexdigest()

    def documents(self) -> Iterator[Document]:
        self.skipped = []
        try:
            import datasets
        except ImportError:
            raise DataError(
                f"reading hf:{self.name} needs the `datasets` package: pip install datasets "
                "(or download the data and pass local files)"
            ) from None
        where = f"hf:{self.name}" + (f":{self.config}" if self.config else "")
        try:
            rows = datasets.load_dataset(self.name, self.config, split="train", streaming=True)
            for i, row in enumerate(rows):
                if self.text_field not in row:
                    raise DataError(
                        f"{where}: no field {self.text_field!r} (fields: {', '.join(list(row)[:10])}); "
                        "choose it with --set text_field=NAME"
                    )
                text = row[self.text_field]
                if text:
                    yield Document(f"{self.name}:{i}", text.encode("utf-8", errors="replace"))
        except DataError:
            raise
        except Exception as e:  # network, missing dataset, auth: datasets raises many kinds
            raise DataError(
                f"could not load {where} from the Hugging Face hub ({type(e).__name__}: {e}); check the "
                "name and the network, or download the data and pass local files"
            ) from None


def _walk(directory: Path) -> list[Path]:
    """Files under ``directory``, recursively, sorted; hidden files and directories skipped."""
    out: list[Path] = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(Path(root) / f for f in files if not f.startswith("."))
    return sorted(out)


def _expand(spec: str) -> list[FileEntry]:
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data path {spec!r}; pass a file, directory or glob")
    if any(c in spec for c in "*?["):
        matches = sorted(Path(p) for p in glob.glob(spec, recursive=True))
        files = [p for p in matches if p.is_file()]
        if not files:
            raise DataError(f"no files match {spec!r}; check the pattern")
        return [FileEntry(p, p.as_posix(), explicit=False) for p in files]
    path = Path(spec).expanduser()
    if path.is_dir():
        files = _walk(path)
        if not files:
            raise DataError(f"directory {path} has no files")
        return [FileEntry(p, p.relative_to(path).as_posix(), explicit=False) for p in files]
    if path.is_file():
        return [FileEntry(path, path.name, explicit=True)]
    hint = ""
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        hint = f"; for a Hugging Face dataset write hf:{spec}"
    raise DataError(f"data path {spec!r} does not exist{hint}")


def file_source(
    specs: str | Sequence[str], text_field: str = "text", max_files: int | None = None
) -> FileSource:
    """Files named by paths, directories (recursive) and globs, in sorted order; at most
    ``max_files`` of them when given."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise DataError("no data given; pass a file, directory or glob")
    files = [f for s in specs for f in _expand(s)]
    if max_files is not None:
        files = files[:max_files]
    label = Path(specs[0].rstrip("/*")).name or "files"
    return FileSource(files, label=label, text_field=text_field)
