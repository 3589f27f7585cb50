"""Text generation: one prefill forward, then step-by-step decoding with the model's state.

The prompt goes through one forward (chunkwise forms, ``use_cache=True``); each new token then
costs one ``T = 1`` forward that reads and updates the state, so a fixed-state model decodes in
constant time and memory per token. Prompts of different lengths share a batch through left
padding with ``mask`` False on the pads (the model's positions skip them).

``generate_ids`` works on token ids; ``generate`` adds the tokenizer, stop strings and
streaming. Sampling: greedy (``temperature=0``), temperature, top-k, top-p (Holtzman et al.
2020), all drawn from one seeded ``torch.Generator`` so a seed reproduces a run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from looplm.quant import state as qstate


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


# ---------------------------------------------------------------- sampling


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming a sampling argument out of range."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from ``logits [B, V]``; returns ``[B]`` long.

    ``temperature=0`` is greedy (argmax; top-k/top-p do not change it). Otherwise the logits
    are divided by the temperature, cut to the ``top_k`` largest, then to the smallest set of
    tokens whose probability reaches ``top_p`` (the most likely token always stays).
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------- streaming text


class TextStream:
    """Turns one row's tokens into text pieces: only complete UTF-8, stop strings cut.

    A token may end inside a multi-byte character: text is held back until the decode of the
    pending tokens no longer ends in U+FFFD. Text that could be the start of a stop string is
    held back too, so a stop string split across tokens is still found; the output ends right
    before the first stop string. Decoding re-reads only the last few tokens (the previous
    piece's tokens give the context a tokenizer may need, e.g. for leading spaces).
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window
        self.read = 0  # tokens before this index have been turned into text
        self.pending = ""  # decoded text not yet emitted (a possible stop-string start)
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that is now final ("" if none)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or len(text) <= len(before):
            return ""
        self.pending += text[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        return self._release()

    def finish(self) -> str:
        """The rest of the text at the end of generation (stop strings still apply)."""
        if self.stopped:
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.pending += text[len(before):]
        self.prefix = self.read = len(self.ids)
        out = self._release(final=True)
        self.stopped = True
        return out

    def _release(self, final: bool = False) -> str:
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return out
        hold = 0 if final else max((_overlap(self.pending, s) for s in self.stop), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


# ---------------------------------------------------------------- decoding loop


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _has_attention(config: Any) -> bool:
    n = config.n_prelude + config.n_core + config.n_coda
    return any(config.layer_mixer(i) == "attention" for i in range(n))


def _as_rows(input_ids: torch.Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        rows = input_ids.tolist()
    else:
        rows = [list(map(int, row)) for row in input_ids]
    if not rows:
        raise ValueError("input_ids is empty: give at least one prompt")
    return rows


def check_prompts(model: torch.nn.Module, rows: list[list[int]], max_new_tokens: int) -> None:
    """Raise ValueError for an empty prompt, bad ids, a bad ``max_new_tokens``, or (attention
    models, whose positions are bounded) a prompt plus new tokens beyond ``max_seq_len``."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    config = model.config
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} is empty: give at least one token (or one character)")
        if min(row) < 0 or max(row) >= config.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {config.vocab_size})")
    longest = max(len(r) for r in rows)
    if _has_attention(config) and longest + max_new_tokens > config.max_seq_len:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
            f"max_seq_len={config.max_seq_len}: shorten the prompt or lower max_new_tokens")


def left_pad(rows: list[list[int]], device: torch.device | str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths -> ``ids [B, T]`` (pads are token 0) and ``mask [B, T]``
    (False on the pads, which come first)."""
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, T - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, T - len(row):] = True
    return ids.to(device), mask.to(device)


@contextmanager
def decoding_mode(model: torch.nn.Module) -> Iterator[None]:
    """For the duration: ``eval()`` mode, and an expert-choice recursion router switched to its
    causal ``threshold`` rule (top-k over the sequence needs future tokens, which decoding
    cannot see; the prefill uses the same rule so its routing matches the steps')."""
    router = getattr(model, "router", None)
    selection = getattr(router, "selection", None)
    was_training = model.training
    model.eval()
    if selection is not None:
        router.selection = "threshold"
    try:
        yield
    finally:
        model.train(was_training)
        if selection is not None:
            router.selection = selection


@torch.no_grad()
def iter_tokens(model: torch.nn.Module, input_ids: torch.Tensor | Sequence[Sequence[int]], *,
                max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, seed: int | None = None,
                state_format: str | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, ``[B]`` long, ``max_new_tokens`` times.

    Stop iterating early to stop decoding (the model is in ``decoding_mode`` until the
    iterator is exhausted or closed). Rows the caller considers finished keep being decoded
    (their tokens can be ignored); the batch is padded on the left. ``state_format`` (``int8``
    | ``fp8_e4m3``) holds the decoding state in that format between steps
    (:mod:`looplm.quant.state`: fixed-size mixer states and KV caches, a scale per row).
    """
    rows = _as_rows(input_ids)
    check_sampling(temperature, top_k, top_p)
    check_prompts(model, rows, max_new_tokens)
    store, load = _state_codec(state_format)
    if max_new_tokens == 0:
        return
    device = _device(model)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    ids, mask = left_pad(rows, device)
    with decoding_mode(model):
        out = model(ids, mask=None if bool(mask.all()) else mask, use_cache=True)
        for step in range(max_new_tokens):
            token = sample_next(out.logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p,
                                generator=generator)
            stored = store(out.state)
            yield token
            if step + 1 < max_new_tokens:
                out = model(token[:, None], state=load(stored), use_cache=True)


def _state_codec(state_format: str | None) -> tuple[Any, Any]:
    """(store, load) functions for the decoding state between steps: identity for float."""
    if state_format is None:
        return (lambda state: state), (lambda state: state)
    if state_format not in qstate.STATE_FORMATS:
        raise ValueError(f"state_format must be None or one of {', '.join(qstate.STATE_FORMATS)}, "
                         f"got {state_format!r}")
    return (lambda state: qstate.compress_state(state, state_format)), qstate.decompress_state


def generate_ids(model: torch.nn.Module, input_ids: torch.Tensor | Sequence[Sequence[int]], *,
                 max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None,
                 eos_id: int | None = None, state_format: str | None = None) -> list[list[int]]:
    """New token ids for each prompt row (at most ``max_new_tokens``; a row ends after
    ``eos_id``, which is kept)."""
    rows = _as_rows(input_ids)
    new: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    for token in iter_tokens(model, rows, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, seed=seed, state_format=state_format):
        for i, t in enumerate(token.tolist()):
            if not done[i]:
                new[i].append(t)
                done[i] = t == eos_id
        if all(done):
            break
    return new


def generate(model: torch.nn.Module, tokenizer: Tokenizer, prompts: str | list[str], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, stop: Sequence[str] | None = None,
             stream: bool = False,
             state_format: str | None = None) -> str | list[str] | Iterator[str] | Iterator[list[str]]:
    """Generate text after each prompt.

    Returns the new text (``str`` for a ``str`` prompt, else one string per prompt), ending
    before the first stop string, at the tokenizer's end-of-text token (``eos_id``, if it has
    one) or after ``max_new_tokens``. With ``stream=True`` returns an iterator instead: of text
    pieces (``str`` prompt) or of one piece per prompt at each step ("" when a row has none).
    """
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if not texts:
        raise ValueError("prompts is empty: give at least one prompt")
    if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) for s in stop)):
        raise TypeError(f"stop must be a list of strings, got {stop!r}")
    rows = [tokenizer.encode(t) for t in texts]
    for i, (text, row) in enumerate(zip(texts, rows)):
        if not text or not row:
            raise ValueError(f"prompt {i} is empty: give at least one character")
    check_sampling(temperature, top_k, top_p)
    check_prompts(model, rows, max_new_tokens)  # fail now, not at the first next()
    pieces = _stream(model, tokenizer, rows, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_k=top_k, top_p=top_p, seed=seed, stop=list(stop or ()),
                     state_format=state_format)
    if stream:
        return (p[0] for p in pieces if p[0]) if single else pieces
    out = ["".join(col) for col in zip(*pieces)]  # _stream yields at least one step
    return out[0] if single else out


def _stream(model: torch.nn.Module, tokenizer: Tokenizer, rows: list[list[int]], *, stop: list[str],
            **sampling: Any) -> Iterator[list[str]]:
    eos_id = getattr(tokenizer, "eos_id", None)
    streams = [TextStream(tokenizer, stop) for _ in rows]
    for token in iter_tokens(model, rows, **sampling):
        step = []
        for s, t in zip(streams, token.tolist()):
            if s.stopped:
                step.append("")
            elif t == eos_id:
                step.append(s.finish())
            else:
                step.append(s.push(t))
        yield step
        if all(s.stopped for s in streams):
            return
    yield [s.finish() for s in streams]
