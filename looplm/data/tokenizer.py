"""Tokenizers: raw bytes (the default) and byte-level BPE trained locally.

Both map any input to ids without failing: text is UTF-8 bytes, invalid UTF-8 is either
kept as bytes (``ByteTokenizer``) or replaced by U+FFFD (``BPETokenizer``), and decoding
turns bytes that are not valid UTF-8 into U+FFFD. The special tokens ``<|bos|>``,
``<|eos|>``, ``<|pad|>`` are ids no text can produce (a literal ``"<|eos|>"`` in the text
is encoded as ordinary text).

BPE is the byte-level variant of GPT-2 (Radford et al. 2019), trained with Hugging Face
``tokenizers``; a saved directory holds ``tokenizer.json`` (loadable by ``tokenizers`` and
``transformers``) and ``tokenizer_config.json`` naming the kind, read by ``load_tokenizer``.
``PretrainedTokenizer`` is an imported model's own tokenizer (``looplm import``): its
tokenizer.json, special tokens, ``add_bos_token`` and chat template.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from looplm.data.chat_template import render_chat
from looplm.errors import CheckpointError, ConfigError

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
CONFIG_NAME = "tokenizer_config.json"
BPE_NAME = "tokenizer.json"


def _as_bytes(item: str | bytes) -> bytes:
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    if isinstance(item, str):
        return item.encode("utf-8", errors="replace")  # lone surrogates become "?"
    raise TypeError(f"text must be str or bytes, got {type(item).__name__}")


def _as_str(item: str | bytes) -> str:
    return _as_bytes(item).decode("utf-8", errors="replace")


class Tokenizer:
    """Common interface. Subclasses set ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id``,
    ``identity`` (a string that changes whenever the id mapping does) and ``token_bytes``
    (the bytes each id stands for; ``b""`` for specials)."""

    kind = "base"
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    identity: str
    token_bytes: list[bytes]

    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of ``text`` (no specials added)."""
        return self.encode_arrays([text])[0].tolist()

    def encode_arrays(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        """Fast path for many documents: one integer array of ids per text."""
        raise NotImplementedError

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of ``ids``; specials and ids outside the vocabulary contribute nothing
        (a model whose vocabulary is padded past the tokenizer's may sample those)."""
        table, n = self.token_bytes, self.vocab_size
        return b"".join(table[i] for i in map(int, ids) if 0 <= i < n)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 become U+FFFD, never an error."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_nbytes(self) -> np.ndarray:
        """``[vocab_size]`` int64: bytes each id stands for (0 for specials)."""
        return np.array([len(b) for b in self.token_bytes], dtype=np.int64)

    def save(self, directory: str | Path) -> None:
        raise NotImplementedError

    def _write_config(self, directory: Path, extra: dict) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        config = {"looplm_tokenizer": self.kind, "identity": self.identity, "vocab_size": self.vocab_size}
        config.update(extra)
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, identity={self.identity!r})"


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the bytes; 256, 257, 258 are ``<|bos|>``, ``<|eos|>``, ``<|pad|>``.
    Nothing to train; every input is valid."""

    kind = "byte"

    def __init__(self) -> None:
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self.bos_id, self.eos_id, self.pad_id = 256, 257, 258
        self.identity = "byte-v1"
        self.token_bytes = [bytes([i]) for i in range(256)] + [b""] * len(SPECIAL_TOKENS)

    def encode_arrays(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        return [np.frombuffer(_as_bytes(t), dtype=np.uint8) for t in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return bytes(i for i in map(int, ids) if 0 <= i < 256)

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer_config.json`` to ``directory``."""
        self._write_config(Path(directory), {})


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level map, inverted: the printable character standing for each byte.

    Printable Latin-1 bytes stand for themselves; the other 68 take the code points from
    256 upward in byte order. ``tokenizers`` uses the same map but does not expose it.
    """
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in keep}
    extra = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return {c: b for b, c in chars.items()}


class BPETokenizer(Tokenizer):
    """Byte-level BPE over a ``tokenizers.Tokenizer``; train with ``BPETokenizer.train``."""

    kind = "bpe"

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        ids = [tokenizer.token_to_id(s) for s in SPECIAL_TOKENS]
        if any(i is None for i in ids):
            raise CheckpointError(f"BPE tokenizer lacks the special tokens {SPECIAL_TOKENS}; retrain it")
        self.bos_id, self.eos_id, self.pad_id = ids
        raw = tokenizer.to_str()
        self.identity = "bpe-" + hashlib.sha256(raw.encode()).hexdigest()[:16]
        alphabet = _byte_level_alphabet()
        table = [b""] * self.vocab_size
        for token, i in tokenizer.get_vocab(with_added_tokens=True).items():
            if token not in SPECIAL_TOKENS:
                table[i] = bytes(alphabet[c] for c in token)
        self.token_bytes = table

    @classmethod
    def train(cls, texts: Iterable[str | bytes], vocab_size: int) -> BPETokenizer:
        """Learn merges from ``texts`` (streamed) up to ``vocab_size`` ids including the 256
        byte tokens and 3 specials. A small corpus may stop with fewer ids."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        n_special = len(SPECIAL_TOKENS)
        if not isinstance(vocab_size, int) or not 256 + n_special <= vocab_size <= 2**31 - 1:
            raise ConfigError(f"BPE vocab_size must be an int >= {256 + n_special}, got {vocab_size!r}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - n_special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator((_as_str(t) for t in texts), trainer=trainer)
        # Specials go into the model's vocabulary, not as "added tokens": added tokens are
        # matched in the input text, so a literal "<|eos|>" in a document would become eos.
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        for s in SPECIAL_TOKENS:
            vocab[s] = len(vocab)
        return cls(HFTokenizer.from_str(json.dumps(spec)))

    def encode_arrays(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch([_as_str(t) for t in texts], add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / BPE_NAME))
        names = dict(zip(("bos_token", "eos_token", "pad_token"), SPECIAL_TOKENS))
        self._write_config(directory, {"tokenizer_class": "PreTrainedTokenizerFast", **names})


SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _is_byte_level(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer's tokens are spelled in GPT-2's byte alphabet (a ByteLevel decoder)."""
    decoder = spec.get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) or []]
    return "ByteLevel" in kinds


class PretrainedTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` and its settings (``tokenizer_config`` keys: the special tokens,
    ``add_bos_token``, ``chat_template``). ``encode`` adds no special tokens; ``prompt_ids``
    adds the bos token where the model expects it."""

    kind = "pretrained"

    def __init__(self, tokenizer: Any, config: dict[str, Any] | None = None) -> None:
        self._tok = tokenizer
        self.config = dict(config or {})
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        raw = tokenizer.to_str()
        self.identity = "pretrained-" + hashlib.sha256(raw.encode()).hexdigest()[:16]
        ids = {k: self._id(self.config.get(k)) for k in SPECIAL_KEYS}
        self.bos_id = ids["bos_token"] if ids["bos_token"] is not None else -1
        self.eos_id = ids["eos_token"] if ids["eos_token"] is not None else -1
        self.pad_id = next((i for i in (ids["pad_token"], ids["eos_token"]) if i is not None), -1)
        self.add_bos = bool(self.config.get("add_bos_token", False)) and self.bos_id >= 0
        self.chat_template: str | None = self.config.get("chat_template")
        self.byte_level = _is_byte_level(json.loads(raw))
        self.token_bytes = self._token_bytes(tokenizer)

    def _id(self, token: Any) -> int | None:
        if isinstance(token, dict):  # {"content": ...} as Hugging Face sometimes writes it
            token = token.get("content")
        return None if not isinstance(token, str) else self._tok.token_to_id(token)

    def _token_bytes(self, tokenizer: Any) -> list[bytes]:
        specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        table = [b""] * self.vocab_size
        alphabet = _byte_level_alphabet()
        for token, i in tokenizer.get_vocab(with_added_tokens=True).items():
            if token in specials:
                continue
            if self.byte_level and all(c in alphabet for c in token):
                table[i] = bytes(alphabet[c] for c in token)
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):  # byte fallback
                table[i] = bytes([int(token[3:5], 16)])
            else:
                table[i] = token.replace("\u2581", " ").encode("utf-8")
        return table

    def encode_arrays(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch([_as_str(t) for t in texts], add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]

    def prompt_ids(self, text: str | bytes) -> list[int]:
        """Ids of a prompt: ``encode(text)``, after the bos token when ``add_bos_token`` is set
        and the text does not already start with it."""
        ids = self.encode(text)
        if self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` without special tokens; ids outside the vocabulary are dropped."""
        if self.byte_level:
            return super().decode(ids)
        keep = [i for i in map(int, ids) if 0 <= i < self.vocab_size]
        return self._tok.decode(keep, skip_special_tokens=True)

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation rendered with the model's chat template (as transformers'
        ``apply_chat_template(..., tokenize=False)``); ConfigError if the model has none."""
        if not self.chat_template:
            raise ConfigError("this model has no chat template; use a plain prompt")
        specials = {k: v for k, v in self.config.items() if k.endswith("_token") and isinstance(v, str)}
        return render_chat(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt, **specials
        )

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (Hugging Face layout) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / BPE_NAME))
        extra = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **{k: v for k, v in self.config.items() if v is not None},
        }
        self._write_config(directory, extra)

    @classmethod
    def from_json(cls, tokenizer_json: str, config: dict[str, Any]) -> PretrainedTokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_str(tokenizer_json), config)
        except Exception as err:  # tokenizers raises its own Exception type for bad input
            raise ConfigError(f"unreadable tokenizer.json: {err}") from None

    @classmethod
    def load(cls, directory: str | Path, config: dict[str, Any]) -> PretrainedTokenizer:
        path = Path(directory) / BPE_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise CheckpointError(f"cannot read {path}: {err}") from None
        try:
            return cls.from_json(text, config)
        except ConfigError as err:
            raise CheckpointError(f"{path}: {err}") from None


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved in ``directory`` (a checkpoint or tokenizer dir)."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
        kind = config["looplm_tokenizer"]
    except FileNotFoundError:
        raise CheckpointError(f"no tokenizer in {directory}: {CONFIG_NAME} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"unreadable {path} ({e}); re-save the tokenizer") from None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return BPETokenizer(HFTokenizer.from_file(str(directory / BPE_NAME)))
        except Exception as e:  # tokenizers raises its own Exception type for bad files
            raise CheckpointError(f"unreadable BPE tokenizer {directory / BPE_NAME}: {e}") from None
    if kind == "pretrained":  # a pretrained model's own tokenizer (looplm import)
        return PretrainedTokenizer.load(directory, config)
    raise CheckpointError(f"{path}: unknown tokenizer kind {kind!r} (expected 'byte', 'bpe' or 'pretrained')")
