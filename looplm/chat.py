"""A multi-turn conversation with a model through its chat template.

Each turn renders the whole conversation with the tokenizer's chat template (its
``apply_chat_template``, as transformers renders it, with the assistant's opening appended),
encodes it (special tokens in the text such as ``<|im_start|>`` become their ids), prefills it and
streams the reply until an end-of-turn token, a stop string or ``max_new_tokens``. The reply's text
joins the conversation for the next turn. Re-prefilling the conversation each turn keeps the
tokens exactly those the template gives (a template may render earlier turns differently once a
later one exists); at these model sizes a prefill costs far less than the reply's decoding.
When the conversation outgrows the model's context, its oldest exchanges are dropped (a system
message stays).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from looplm.errors import ConfigError
from looplm.generate import stream_text
from looplm.model import LoopLM

# Tokens that end an assistant's turn in the common chat formats (ChatML, Llama 3, Phi-3, Gemma,
# Llama 2 / Mistral); a tokenizer's own eos always ends one too.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


def end_of_turn_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that end a turn: the tokenizer's eos and each of ``END_OF_TURN`` that it encodes as a
    single special token (one id standing for no text)."""
    ids = set()
    eos = getattr(tokenizer, "eos_id", None)
    if isinstance(eos, int) and eos >= 0:
        ids.add(eos)
    table = getattr(tokenizer, "token_bytes", None)
    for text in END_OF_TURN:
        enc = tokenizer.encode(text)
        if len(enc) == 1 and (table is None or table[enc[0]] == b""):
            ids.add(enc[0])
    return frozenset(ids)


class Chat:
    """A conversation: ``reply(text)`` streams the assistant's answer to a user message and
    keeps both; ``reset()`` forgets them (a system message stays). ``sampling``: keyword
    arguments of :func:`looplm.generate.iter_tokens` (temperature, top_k, top_p, min_p,
    repetition_penalty, seed)."""

    def __init__(self, model: LoopLM, tokenizer: Any, *, system: str | None = None,
                 max_new_tokens: int = 256, stop: Sequence[str] = (), **sampling: Any) -> None:
        if not callable(getattr(tokenizer, "apply_chat_template", None)) or not getattr(
                tokenizer, "chat_template", None):
            raise ConfigError("this checkpoint's tokenizer has no chat template (an imported model has its "
                              "own); use `looplm generate` for a plain prompt")
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.stop = list(stop)
        self.sampling = sampling
        self.ends = end_of_turn_ids(tokenizer)
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> list[int]:
        """The conversation so far, rendered for the assistant's next turn, as ids; the oldest
        exchanges are dropped while it leaves fewer than ``max_new_tokens`` of the context."""
        limit = self.model.config.max_seq_len - self.max_new_tokens
        while True:
            text = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
            ids = self.tokenizer.encode(text)
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(ids) <= limit or len(self.messages) - first <= 1:
                break
            del self.messages[first:first + 2]  # the oldest user message and its answer
        if len(ids) > limit:
            raise ConfigError(f"the message takes {len(ids)} tokens with the template; the model's context "
                              f"({self.model.config.max_seq_len}) leaves room for {limit} with "
                              f"max_new_tokens={self.max_new_tokens}: shorten it")
        return ids

    def reply(self, text: str) -> Iterator[str]:
        """Stream the answer to ``text`` in pieces; it joins the conversation when complete
        (or when the caller stops iterating)."""
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self.prompt_ids()
            pieces = stream_text(self.model, self.tokenizer, [ids], max_new_tokens=self.max_new_tokens,
                                 stop=self.stop, end_ids=self.ends, **self.sampling)
        except Exception:
            self.messages.pop()
            raise
        return self._collect(pieces)

    def _collect(self, pieces: Iterator[list[str]]) -> Iterator[str]:
        answer: list[str] = []
        try:
            for (piece,) in pieces:
                if piece:
                    answer.append(piece)
                    yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(answer)})
