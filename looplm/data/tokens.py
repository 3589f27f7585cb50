"""Token files: a flat array of ids on disk, written streaming, read memory-mapped.

``name.bin`` holds the ids (uint16 when the vocabulary fits, else uint32), documents
separated by eos; the sidecar ``name.json`` holds dtype, count, the UTF-8 bytes of text
they encode (for bits per byte), the document count and the tokenizer identity. Writing
goes to temporary names renamed at the end, the sidecar last, so a crash never leaves a
token file that looks complete. Reading maps the file, so corpora larger than RAM work.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from looplm.errors import DataError

FORMAT = "looplm-tokens/1"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _write_sidecar(path: Path, meta: dict) -> None:
    side = _sidecar(path)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, side)


class TokenWriter:
    """Append token arrays to ``path`` with bounded memory; ``close()`` commits.

    ``with TokenWriter(path, vocab_size, tokenizer_id) as w: w.write(ids, text_bytes)``;
    an exception inside the ``with`` statement removes the partial file instead.
    """

    def __init__(self, path: str | Path, vocab_size: int, tokenizer_id: str, buffer_tokens: int = 1 << 20):
        self.path = Path(path)
        self.dtype = token_dtype(vocab_size)
        self.meta = {"format": FORMAT, "dtype": self.dtype.name, "count": 0, "text_bytes": 0,
                     "documents": 0, "tokenizer": tokenizer_id, "vocab_size": vocab_size}
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._fh = open(self._tmp, "wb")
        self._buf: list[np.ndarray] = []
        self._buffered = 0
        self._limit = buffer_tokens

    def write(self, ids: np.ndarray, text_bytes: int = 0, documents: int = 0) -> None:
        """Append ``ids`` (any integer array) that encode ``text_bytes`` bytes of text."""
        ids = np.asarray(ids)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.meta["vocab_size"]):
            raise ValueError(f"ids must lie in [0, {self.meta['vocab_size']}), got {ids.min()}..{ids.max()}")
        self._buf.append(ids.astype(self.dtype, copy=False))
        self._buffered += ids.size
        self.meta["count"] += int(ids.size)
        self.meta["text_bytes"] += int(text_bytes)
        self.meta["documents"] += int(documents)
        if self._buffered >= self._limit:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            self._fh.write(np.concatenate(self._buf).tobytes())
        self._buf, self._buffered = [], 0

    def close(self) -> TokenFile:
        """Flush, rename into place, write the sidecar; returns the file opened for reading."""
        self._flush()
        self._fh.close()
        os.replace(self._tmp, self.path)
        _write_sidecar(self.path, self.meta)
        return TokenFile(self.path)

    def abort(self) -> None:
        """Drop everything written so far."""
        self._fh.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> TokenWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TokenFile:
    """A token file opened for reading: ``tokens`` is a read-only ``np.memmap`` ``[count]``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        side = _sidecar(self.path)
        try:
            meta = json.loads(side.read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
            dtype, count = np.dtype(meta["dtype"]), int(meta["count"])
            size = self.path.stat().st_size
        except FileNotFoundError as e:
            raise DataError(f"token file {e.filename} is missing; rebuild the corpus") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"unreadable token sidecar {side} ({e}); rebuild the corpus") from None
        if size != count * dtype.itemsize:
            raise DataError(
                f"token file {self.path} has {size} bytes, its sidecar says {count} x {dtype.name}; "
                "it is damaged: delete it and rebuild the corpus"
            )
        self.meta = meta
        empty = np.empty(0, dtype)
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r", shape=(count,)) if count else empty

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def text_bytes(self) -> int:
        """UTF-8 bytes of the text these tokens encode."""
        return int(self.meta["text_bytes"])

    @property
    def bytes_per_token(self) -> float:
        """Text bytes per token (eos separators included): bits/byte = nats/token / ln 2 / this."""
        return self.text_bytes / max(len(self), 1)

    @property
    def tokenizer_id(self) -> str:
        return str(self.meta["tokenizer"])

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r}, tokens={len(self)}, text_bytes={self.text_bytes})"


def split_tail(
    path: str | Path, tail_path: str | Path, fraction: float, token_nbytes: np.ndarray, chunk: int = 1 << 20
) -> tuple[TokenFile, TokenFile]:
    """Move the last ``fraction`` of the tokens of ``path`` (at least one) to a new token file
    ``tail_path``; text bytes are recounted from ``token_nbytes [vocab]`` (bytes per id)."""
    head = TokenFile(path)
    n = len(head)
    if n < 2:
        raise DataError(f"{path} holds {n} token(s): too little text for a training and a validation split")
    keep = n - min(max(1, round(n * fraction)), n - 1)
    meta = dict(head.meta)
    writer = TokenWriter(tail_path, meta["vocab_size"], meta["tokenizer"])
    moved = 0
    for s in range(keep, n, chunk):
        ids = np.array(head.tokens[s : min(s + chunk, n)])
        nbytes = int(token_nbytes[ids].sum())
        writer.write(ids, nbytes, documents=int(s == keep))
        moved += nbytes
    tail = writer.close()
    del head  # release the map before truncating the file under it
    os.truncate(path, keep * np.dtype(meta["dtype"]).itemsize)
    meta.update(count=keep, text_bytes=max(0, meta["text_bytes"] - moved))
    _write_sidecar(Path(path), meta)
    return TokenFile(path), tail
