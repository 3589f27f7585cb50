"""``prepare_corpus``: source → split → tokenizer → cached train/validation token files.

The build is deterministic: documents in the source's sorted order, exact duplicates
(same bytes) dropped after their first occurrence, and a document goes to validation when
a hash of its key (relative path, or ``path:line``) falls below ``val_fraction``. When no
document lands in validation (a single file, a tiny corpus) the last ``val_fraction`` of
the training tokens become the validation split instead.

The result lives in ``<cache>/corpora/<label>-<key>/`` (``train.bin``/``.json``,
``val.bin``/``.json``, ``tokenizer/``, ``stats.json``), ``<cache>`` being the argument, else
``$LOOPLM_CACHE``, else ``~/.cache/looplm``. The key hashes the interpreter version, the
source's fingerprint, the tokenizer and the split, so a second run is a cache hit. The
directory is built under a temporary name and renamed when complete; concurrent builders
(several ranks) are safe, the first rename wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from looplm.data.finetune import finetune_source
from looplm.data.sources import Document, HFSource, Source, file_source
from looplm.data.stdlib import stdlib_source
from looplm.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer
from looplm.data.tokens import TokenFile, TokenWriter, split_tail
from looplm.errors import ConfigError, DataError

CORPUS_VERSION = 1
DEFAULT_BPE_VOCAB = 8192
_ENCODE_BATCH_BYTES = 4 << 20


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$LOOPLM_CACHE``, else ``~/.cache/looplm``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("LOOPLM_CACHE") or Path.home() / ".cache" / "looplm").expanduser()


@dataclass(frozen=True)
class CorpusStats:
    """Size of a built corpus. ``documents`` counts kept files (or rows); bytes are UTF-8
    bytes of text, tokens include one eos per document."""

    source: str
    tokenizer: str
    documents: int
    duplicates: int
    skipped: int
    train_bytes: int
    val_bytes: int
    train_tokens: int
    val_tokens: int
    build_seconds: float

    @property
    def bytes(self) -> int:
        return self.train_bytes + self.val_bytes

    @property
    def tokens(self) -> int:
        return self.train_tokens + self.val_tokens

    @property
    def bytes_per_token(self) -> float:
        """Validation bytes per token: bits/byte = (mean nats per token) / ln 2 / this."""
        return self.val_bytes / max(self.val_tokens, 1)


@dataclass(frozen=True)
class Corpus:
    """A built corpus: memory-mapped ``train``/``val`` token files and their tokenizer."""

    path: Path
    train: TokenFile
    val: TokenFile
    tokenizer: Tokenizer
    stats: CorpusStats

    @classmethod
    def open(cls, path: str | Path) -> Corpus:
        """Open a built corpus directory."""
        path = Path(path)
        try:
            stats = CorpusStats(**json.loads((path / "stats.json").read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise DataError(f"unreadable corpus {path} ({e}); delete it to rebuild") from None
        return cls(path, TokenFile(path / "train.bin"), TokenFile(path / "val.bin"),
                   load_tokenizer(path / "tokenizer"), stats)

    def describe(self) -> str:
        """One line: source, documents, size, tokens, tokenizer."""
        s = self.stats
        return (f"{s.source}: {s.documents} documents, {s.bytes / 1e6:.1f} MB, {s.tokens / 1e6:.2f}M tokens "
                f"({s.train_tokens / 1e6:.2f}M train, {s.val_tokens / 1e6:.2f}M val), "
                f"{s.bytes / max(s.tokens, 1):.2f} bytes/token, tokenizer {s.tokenizer}")


def in_validation(key: str, val_fraction: float) -> bool:
    """Whether the document named ``key`` belongs to the validation split."""
    h = hashlib.blake2b(key.encode("utf-8", errors="replace"), digest_size=8).digest()
    return int.from_bytes(h, "big") < val_fraction * 2.0**64


class _Split:
    """Deduplicated, split documents of a source; counts what it dropped."""

    def __init__(self, source: Source, val_fraction: float) -> None:
        self.source, self.val_fraction = source, val_fraction
        self.duplicates = 0

    def __iter__(self) -> Iterator[tuple[bool, Document]]:
        seen: set[bytes] = set()
        self.duplicates, whole = 0, True
        for doc in self.source.documents():
            if whole and doc.last:  # dedupe whole documents, not pieces of large files
                digest = hashlib.blake2b(doc.data, digest_size=16).digest()
                if digest in seen:
                    self.duplicates += 1
                    continue
                seen.add(digest)
            whole = doc.last
            yield in_validation(doc.key, self.val_fraction), doc


def _resolve_tokenizer(spec: str | Tokenizer) -> tuple[Tokenizer | int, str]:
    """A ready tokenizer, or the BPE vocabulary size to train; and its cache-key part."""
    if isinstance(spec, Tokenizer):
        return spec, spec.identity
    if not isinstance(spec, str):
        raise TypeError(f"tokenizer must be a str or a Tokenizer, got {type(spec).__name__}")
    if spec == "byte":
        tok = ByteTokenizer()
        return tok, tok.identity
    if spec == "bpe" or spec.startswith("bpe:"):
        size = spec[4:] or str(DEFAULT_BPE_VOCAB)
        if not size.isdigit():
            raise ConfigError(f"tokenizer {spec!r}: write bpe:<vocab size>, e.g. bpe:8192")
        return int(size), f"bpe-train-{size}"
    if Path(spec).expanduser().is_dir():
        loaded = load_tokenizer(Path(spec).expanduser())
        return loaded, loaded.identity
    raise ConfigError(
        f"unknown tokenizer {spec!r}: use 'byte', 'bpe', 'bpe:<vocab size>' or a tokenizer directory"
    )


def resolve_source(
    spec: str | Sequence[str] | Source | None, text_field: str = "text", max_files: int | None = None
) -> Source:
    """A ``Source`` from a spec: ``None``/``"stdlib"`` (the default corpus), ``"finetune"`` (stdlib +
    English text, without the held-out texts: data/finetune.py), ``"hf:NAME[:CONFIG]"``,
    or paths, directories and globs (a string or a list)."""
    if isinstance(spec, Source):
        return spec
    if spec is None or spec == "stdlib":
        return stdlib_source(max_files=max_files)
    if spec == "finetune":
        return finetune_source(max_files=max_files)
    if isinstance(spec, str) and spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not name:
            raise DataError("hf: needs a dataset name, e.g. hf:roneneldan/TinyStories")
        return HFSource(name, config or None, text_field)
    return file_source(spec, text_field=text_field, max_files=max_files)


def prepare_corpus(
    source: str | list[str] | Source | None = None,
    tokenizer: str | Tokenizer = "byte",
    cache_dir: str | Path | None = None,
    *,
    text_field: str = "text",
    max_files: int | None = None,
    val_fraction: float = 0.015,
    progress: bool = False,
) -> Corpus:
    """Build (or load from the cache) the token files of ``source``.

    source: ``None``/``"stdlib"`` (default corpus), paths/dirs/globs, ``"hf:NAME[:CONFIG]"``.
    tokenizer: ``"byte"``, ``"bpe"``/``"bpe:N"`` (trained here on the training split), a saved
    tokenizer directory, or a ``Tokenizer`` (e.g. a checkpoint's, to evaluate on new data).
    max_files: only the first N files (tests). Raises ``DataError`` for unusable data.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    src = resolve_source(source, text_field=text_field, max_files=max_files)
    tok, tok_key = _resolve_tokenizer(tokenizer)
    key = hashlib.sha256(json.dumps(
        [CORPUS_VERSION, sys.version, src.label, src.fingerprint(), tok_key, val_fraction]
    ).encode()).hexdigest()[:16]
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", src.label).strip("._") or "corpus"
    final = cache_root(cache_dir) / "corpora" / f"{label}-{tok_key.split('-')[0]}-{key}"
    if (final / "stats.json").exists():
        return Corpus.open(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        _build(src, tok, val_fraction, tmp, progress)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: use its result
            if not (final / "stats.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Corpus.open(final)


def _build(src: Source, tok: Tokenizer | int, val_fraction: float, out: Path, progress: bool) -> None:
    start = time.perf_counter()
    split = _Split(src, val_fraction)
    if isinstance(tok, int):
        tok = _train_bpe(split, tok)
    tok.save(out / "tokenizer")
    writers = {v: TokenWriter(out / f"{'val' if v else 'train'}.bin", tok.vocab_size, tok.identity)
               for v in (False, True)}
    eos = np.array([tok.eos_id])
    documents = 0
    val: TokenFile | None
    try:
        from tqdm import tqdm

        bar = tqdm(desc=f"tokenizing {src.label}", unit="B", unit_scale=True, disable=not progress)
        for batch in _batched(split, _ENCODE_BATCH_BYTES):
            for (is_val, doc), ids in zip(batch, tok.encode_arrays([d.data for _, d in batch])):
                writers[is_val].write(ids, len(doc.data), documents=int(doc.last))
                if doc.last:
                    writers[is_val].write(eos)
                    documents += 1
            bar.update(sum(len(d.data) for _, d in batch))
        bar.close()
        train, val = writers[False].close(), writers[True].close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    if len(train) + len(val) == 0:
        why = f" ({len(src.skipped)} files skipped, e.g. {src.skipped[0]})" if src.skipped else ""
        raise DataError(f"no text found in {src.label}{why}")
    if len(train) == 0:  # every document hashed into validation: split by position instead
        for suffix in (".bin", ".json"):
            os.replace(val.path.with_suffix(suffix), train.path.with_suffix(suffix))
        train, val = TokenFile(train.path), None
    if val is None or len(val) == 0:
        train, val = split_tail(train.path, out / "val.bin", val_fraction, tok.token_nbytes())
    stats = CorpusStats(
        source=src.label, tokenizer=tok.identity, documents=documents, duplicates=split.duplicates,
        skipped=len(src.skipped), train_bytes=train.text_bytes, val_bytes=val.text_bytes,
        train_tokens=len(train), val_tokens=len(val), build_seconds=round(time.perf_counter() - start, 3),
    )
    (out / "stats.json").write_text(json.dumps(asdict(stats), indent=2) + "\n")


def _batched(split: _Split, max_bytes: int) -> Iterator[list[tuple[bool, Document]]]:
    """Documents in groups of about ``max_bytes`` (one call of the tokenizer each)."""
    batch, size = [], 0
    for item in split:
        batch.append(item)
        size += len(item[1].data)
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _train_bpe(split: _Split, vocab_size: int) -> BPETokenizer:
    """BPE on the training split (on everything when no document is in the training split)."""
    seen = [0]

    def train_texts() -> Iterator[bytes]:
        for is_val, doc in split:
            if not is_val:
                seen[0] += 1
                yield doc.data

    tok = BPETokenizer.train(train_texts(), vocab_size)
    return tok if seen[0] else BPETokenizer.train((d.data for _, d in split), vocab_size)
