"""A ``tokenizers`` tokenizer.json from a GGUF file's tokenizer metadata.

GGUF keeps no tokenizer.json, only llama.cpp's fields: ``tokenizer.ggml.model`` (``gpt2`` for
byte-level BPE), ``.pre`` (how text is split before the merges), ``.tokens``, ``.merges``,
``.token_type`` (3 = control, 4 = user-defined), the special ids and ``tokenizer.chat_template``.
Byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen2 vocabularies) is rebuilt with the ``tokenizers``
library; SentencePiece vocabularies (``llama``: Llama 1-2, Mistral) are not, with an error that
names the way around (import the Hugging Face directory, which has its tokenizer.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from looplm.errors import ConversionError

# text splits before the merges, by tokenizer.ggml.pre (llama.cpp's names); None: GPT-2's own
# ByteLevel regex. Llama 3's split; Qwen2's is the same with single digits.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_PRE_SPLITS: dict[str, str | None] = {
    "default": None,
    "gpt2": None,
    "gpt-2": None,
    "smollm": "digits",
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}


def _pre_tokenizer(pre: str | None, path: Path):
    from tokenizers import Regex, pre_tokenizers

    if pre is None:
        pre = "default"
    if pre not in _PRE_SPLITS:
        raise ConversionError(
            f"{str(path)!r}: GGUF pre-tokenizer {pre!r} is not supported "
            f"(supported: {', '.join(sorted(_PRE_SPLITS))})"
        )
    split = _PRE_SPLITS[pre]
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split == "digits":  # SmolLM: every digit alone, then GPT-2's split
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _field(fields: dict, key: str, default: Any = None) -> Any:
    f = fields.get(key)
    return default if f is None else f.contents()


def tokenizer_from_gguf(fields: dict, path: Path) -> tuple[str, dict[str, Any]]:
    """``(tokenizer.json text, tokenizer config)`` from a GGUFReader's ``fields``; the config holds
    ``bos_token``, ``eos_token``, ``pad_token``, ``unk_token`` (strings or None),
    ``add_bos_token`` and ``chat_template``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = _field(fields, "tokenizer.ggml.model")
    if kind is None:
        raise ConversionError(f"{str(path)!r} has no tokenizer metadata (tokenizer.ggml.model)")
    if kind != "gpt2":
        raise ConversionError(
            f"{str(path)!r}: GGUF tokenizer {kind!r} is not supported (only byte-level BPE, "
            "'gpt2'); import the model's Hugging Face directory (with tokenizer.json) instead"
        )
    tokens: list[str] = list(_field(fields, "tokenizer.ggml.tokens", []))
    merges = [tuple(m.split(" ", 1)) for m in _field(fields, "tokenizer.ggml.merges", [])]
    types = list(_field(fields, "tokenizer.ggml.token_type", [1] * len(tokens)))
    if not tokens or len(types) != len(tokens):
        raise ConversionError(
            f"{str(path)!r}: tokenizer tokens and token types are missing or differ in length"
        )
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConversionError(f"{str(path)!r}: the tokenizer vocabulary has duplicate tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(_field(fields, "tokenizer.ggml.pre"), path)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ConversionError(
            f"{str(path)!r}: special tokens outside the vocabulary; cannot rebuild the tokenizer"
        )

    def name(key: str) -> str | None:
        i = _field(fields, f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    config = {
        "bos_token": name("bos_token_id"),
        "eos_token": name("eos_token_id"),
        "pad_token": name("padding_token_id"),
        "unk_token": name("unknown_token_id"),
        "add_bos_token": bool(_field(fields, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": _field(fields, "tokenizer.chat_template"),
    }
    return tok.to_str(), config
