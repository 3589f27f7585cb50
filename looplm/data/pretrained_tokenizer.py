"""A pretrained model's own tokenizer: a ``tokenizers`` tokenizer.json with its special tokens,
``add_bos_token`` and chat template (``tokenizer_config.json``, as Hugging Face writes it, plus
``"looplm_tokenizer": "pretrained"``). ``looplm import`` writes it; ``load_tokenizer`` reads it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from looplm.data.chat_template import render_chat
from looplm.data.tokenizer import BPE_NAME, Tokenizer, _as_str, _byte_level_alphabet
from looplm.errors import CheckpointError, ConfigError

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
