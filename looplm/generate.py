"""Text generation: a prefill, then step-by-step decoding with the model's state.

The prompt goes through the model in forwards of at most ``prefill_chunk(model)`` tokens (more for
larger weights), each continuing the state of the one before (one forward for models whose routers
decide over the whole sequence), so a long prompt's activations never exceed one chunk's; each new
token then costs one ``T = 1`` forward that reads and updates the state, so a fixed-state model
decodes in constant time and memory per token. Prompts of different lengths share a batch through left
padding with ``mask`` False on the pads (the model's positions skip them).

``generate_ids`` works on token ids; ``generate`` adds the tokenizer, stop strings and
streaming. Sampling: greedy (``temperature=0``), temperature, top-k, top-p (Holtzman et al.
2020), min-p (Nguyen et al. 2024) and CTRL's repetition penalty (Keskar et al. 2019), all drawn
from one seeded ``torch.Generator`` so a seed reproduces a run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Generator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, Protocol, TypedDict, overload

import torch
from typing_extensions import Unpack

from looplm.errors import LoopLMError
from looplm.memory import release_free_memory
from looplm.model import LoopLM, LoopOutput
from looplm.quant import QuantEmbedding, QuantLinear
from looplm.quant import state as qstate
from looplm.routers import causal_routing
from looplm.state import ModelState

Decoder = Callable[..., Generator[torch.Tensor, None, None]]  # iter_tokens or one with its arguments


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


# ---------------------------------------------------------------- sampling


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, min_p: float | None = None,
                   repetition_penalty: float = 1.0) -> None:
    """Raise ValueError naming a sampling argument out of range."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if min_p is not None and (isinstance(min_p, bool) or not isinstance(min_p, (int, float))
                              or not 0 <= min_p <= 1):
        raise ValueError(f"min_p must be in [0, 1] or None, got {min_p!r}")
    if (isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, (int, float))
            or not 0 < repetition_penalty < float("inf")):
        raise ValueError(f"repetition_penalty must be a number > 0 (1 = none), got {repetition_penalty!r}")


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019): ``logits [B, V]`` of the tokens marked in
    ``seen [B, V]`` (bool: in the prompt or already generated) are divided by ``penalty`` where
    positive and multiplied by it where negative, so ``penalty > 1`` makes repeats less likely."""
    if penalty == 1:
        return logits
    logits = logits.float()
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def penalize_counts(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
                    ) -> torch.Tensor:
    """OpenAI's presence and frequency penalties: ``logits [B, V]`` minus ``frequency`` times
    each token's count in ``counts [B, V]`` (how often it was generated so far) and minus
    ``presence`` where that count is above zero; positive values make repeats less likely."""
    return logits.float() - frequency * counts - presence * (counts > 0)


def keep_mask(scores: torch.Tensor, *, top_k: int | None = None, top_p: float | None = None,
              min_p: float | None = None) -> torch.Tensor:
    """Tokens that stay candidates, ``[B, V]`` bool, for ``scores [B, V]`` (logits after the
    temperature), the filters applied in this order:

    - ``top_k``: the k largest scores (ties at the k-th all stay);
    - ``top_p`` (nucleus sampling, Holtzman et al. 2020): of those, the smallest set, in
      descending probability, whose mass reaches ``top_p`` (a token stays when the mass ranked
      above it is below ``top_p``);
    - ``min_p`` (Nguyen et al. 2024): tokens whose probability is at least ``min_p`` times the
      most likely token's.

    The most likely token always stays.
    """
    keep = torch.ones_like(scores, dtype=torch.bool)
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        keep &= scores >= kth
    if top_p is not None and top_p < 1:
        sorted_scores, order = scores.masked_fill(~keep, float("-inf")).sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
        keep &= torch.zeros_like(keep).scatter(-1, order, before < top_p)
    if min_p is not None and min_p > 0:
        top = scores.max(dim=-1, keepdim=True).values
        keep &= scores - top >= math.log(min_p)
    return keep


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, min_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from ``logits [B, V]``; returns ``[B]`` long.

    ``temperature=0`` is greedy (argmax; the filters do not change it). Otherwise the logits
    are divided by the temperature, cut to the candidates of :func:`keep_mask`, and one token
    is drawn from their renormalised probabilities. Non-finite logits (broken weights) raise
    LoopLMError.
    """
    check_sampling(temperature, top_k, top_p, min_p)
    if not bool(torch.isfinite(logits).all()):
        raise LoopLMError("the model produced NaN or infinite logits; its weights are broken "
                          "(a diverged or corrupted checkpoint): check them with looplm eval")
    if temperature == 0:  # max's first maximum, as argmax's, in under half its time on the CPU here
        return logits.max(dim=-1).indices
    scores = logits.float() / temperature
    scores = scores.masked_fill(~keep_mask(scores, top_k=top_k, top_p=top_p, min_p=min_p), float("-inf"))
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


def _device(model: LoopLM) -> torch.device:
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


def check_prompts(model: LoopLM, rows: list[list[int]], max_new_tokens: int) -> None:
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
def decoding_mode(model: LoopLM) -> Iterator[None]:
    """For the duration: ``eval()`` mode, and every expert-choice router (MoR's, MoD's) switched
    to its causal ``threshold`` rule (top-k over the sequence needs future tokens, which decoding
    cannot see; the prefill uses the same rule so its routing matches the steps')."""
    was_training = model.training
    model.eval()
    try:
        with causal_routing(model):
            yield
    finally:
        model.train(was_training)


# Prompt tokens per forward of a chunked prefill, per stored byte of a weight (see prefill_chunk).
PREFILL_TOKENS_PER_BYTE = 256
MIN_PREFILL_CHUNK = 128


def weight_bytes_per_parameter(model: LoopLM) -> float:
    """Stored bytes per weight of ``model``: float parameters at their element size, int8 / int4 /
    fp8 matrices (``QuantLinear``, ``QuantEmbedding``) at their parts' bytes (codes, scales,
    offsets) over their ``rows × cols``."""
    stored = weights = 0
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            weights += m.rows * m.cols
            stored += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
    for p in model.parameters():
        weights += p.numel()
        stored += p.numel() * p.element_size()
    return stored / max(weights, 1)


def prefill_chunk(model: LoopLM) -> int:
    """Prompt tokens per forward of ``model``'s chunked prefill: :data:`PREFILL_TOKENS_PER_BYTE` times
    its weights' stored bytes per parameter, rounded down to a power of two, at least
    :data:`MIN_PREFILL_CHUNK` (float32 1024, bfloat16 512, int8 256, int4 128).

    Why it scales with the weights' bytes: every chunk reads every weight again (from memory: the
    weights are far larger than the caches; int8 / int4 matrices are dequantised again into bfloat16
    tiles), which one forward over the prompt does once; that costs a chunk about the time of
    streaming the weights' bytes, so it is a share ∝ bytes per parameter / chunk of the chunk's
    arithmetic. What a chunk adds to the peak memory, its activations, grows with the chunk, and the
    peak's budget (weights + cache + a share of the weights) with the weights' bytes. A chunk
    proportional to bytes per parameter keeps both shares the same in every format
    (docs/mechanisms.md §4.5)."""
    per = PREFILL_TOKENS_PER_BYTE * weight_bytes_per_parameter(model)
    return max(MIN_PREFILL_CHUNK, 1 << int(math.log2(max(per, 1))))


def chunks_exact(model: LoopLM) -> bool:
    """Whether a prompt prefilled in chunks gives what one forward over it gives: no router that
    decides over the sequence (Mixture-of-Recursions' depth router, Mixture-of-Depths' layer
    routers), so every layer sees each token with the state its predecessors left (attention's
    cache, a fixed-state mixer's state, token-choice MoE's per-token routing)."""
    return model.router is None and not len(model.mod_routers)


def prefill(model: LoopLM, ids: torch.Tensor, mask: torch.Tensor | None = None,
            state: ModelState | None = None, chunk: int | None = None) -> LoopOutput:
    """The prompt ``ids [B, T]`` (``mask [B, T]``: False on left padding) through the model after
    ``state`` (None: a new one); returns the output with the logits of the last position only
    (``[B, V]``) and the state after the prompt. Where :func:`chunks_exact`, in forwards of at most
    ``chunk`` tokens (default :func:`prefill_chunk`), each continuing the previous one's state:
    activations (a layer's FFN hidden ``[B, chunk, 2·d_ffn]``, attention scores ``[B, H, chunk, S]``)
    are then bounded by the chunk, not the prompt, so the peak memory of a long prompt is its cache
    plus one chunk's work (and the memory the allocator keeps of it). Call under
    :func:`decoding_mode` and without autograd."""
    T = ids.shape[1]
    step = T
    if chunks_exact(model):  # a prompt that fits the smallest chunk needs no look at the weights
        step = chunk or (prefill_chunk(model) if T > MIN_PREFILL_CHUNK else T)
    out = None
    for start in range(0, T, step):
        part = slice(start, min(start + step, T))
        m = None if mask is None else mask[:, part]
        last = torch.zeros(ids.shape[0], part.stop - start, dtype=torch.bool, device=ids.device)
        last[:, -1] = part.stop == T  # the head only where the next token is read: the last chunk's end
        state = state if out is None else out.state
        out = model(ids[:, part], state=state, mask=m, use_cache=True, logits_at=last)
    assert out is not None
    return out


@torch.no_grad()
def iter_tokens(model: LoopLM, input_ids: torch.Tensor | Sequence[Sequence[int]], *,
                max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, min_p: float | None = None, repetition_penalty: float = 1.0,
                seed: int | None = None, state_format: str | None = None
                ) -> Generator[torch.Tensor, None, None]:
    """Yield the next token of every row, ``[B]`` long, ``max_new_tokens`` times.

    Stop iterating early to stop decoding (the model is in ``decoding_mode`` until the
    iterator is exhausted or closed). Rows the caller considers finished keep being decoded
    (their tokens can be ignored); the batch is padded on the left. ``repetition_penalty``
    applies to each row's own prompt and generated tokens (never its padding).
    ``state_format`` (``int8`` | ``fp8_e4m3``) holds the decoding state in that format between
    steps (:mod:`looplm.quant.state`: fixed-size mixer states and KV caches, a scale per row; the
    caches stay quantised throughout, the prompt's included).
    """
    rows = _as_rows(input_ids)
    check_sampling(temperature, top_k, top_p, min_p, repetition_penalty)
    check_prompts(model, rows, max_new_tokens)
    store, load = _state_codec(state_format)
    if max_new_tokens == 0:
        return
    try:
        yield from _decode(model, rows, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                           seed, store, load)
    finally:  # the generation's cache and temporaries are freed by now
        release_free_memory()


def _decode(model: LoopLM, rows: list[list[int]], max_new_tokens: int, temperature: float, top_k: int | None,
            top_p: float | None, min_p: float | None, repetition_penalty: float, seed: int | None,
            store: Any, load: Any) -> Generator[torch.Tensor, None, None]:
    """:func:`iter_tokens` after its checks."""
    device = _device(model)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    ids, mask = left_pad(rows, device)
    seen = None
    if repetition_penalty != 1:
        seen = torch.zeros(len(rows), model.config.vocab_size, dtype=torch.bool, device=device)
        for i, row in enumerate(rows):  # each row's own tokens, not its padding
            seen[i, torch.tensor(row, device=device)] = True
    with decoding_mode(model):
        # a quantised state from the first token on: the prompt's cache is never held in float;
        # every cache sized for the whole generation before the prefill, never copied to grow
        first = load(store(model.init_state(len(rows)))).reserve(ids.shape[1] + max_new_tokens)
        out = prefill(model, ids, None if bool(mask.all()) else mask, first)
        for step in range(max_new_tokens):
            logits = out.logits if out.logits.dim() == 2 else out.logits[:, -1]
            if seen is not None:
                logits = penalize_repeats(logits, seen, repetition_penalty)
            token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                generator=generator)
            if seen is not None:
                seen[torch.arange(len(rows), device=device), token] = True
            stored = store(out.state)
            yield token
            if step + 1 < max_new_tokens:
                out = model(token[:, None], state=load(stored), use_cache=True)


def _ids(ids: int | Collection[int] | None) -> frozenset[int]:
    if ids is None:
        return frozenset()
    return frozenset([int(ids)] if isinstance(ids, int) else map(int, ids))


def _state_codec(state_format: str | None) -> tuple[Any, Any]:
    """(store, load) functions for the decoding state between steps: identity for float."""
    if state_format is None:
        return (lambda state: state), (lambda state: state)
    if state_format not in qstate.STATE_FORMATS:
        raise ValueError(f"state_format must be None or one of {', '.join(qstate.STATE_FORMATS)}, "
                         f"got {state_format!r}")
    return (lambda state: qstate.compress_state(state, state_format)), qstate.decompress_state


def generate_ids(model: LoopLM, input_ids: torch.Tensor | Sequence[Sequence[int]], *,
                 max_new_tokens: int, eos_id: int | Sequence[int] | None = None,
                 **sampling: Any) -> list[list[int]]:
    """New token ids for each prompt row (at most ``max_new_tokens``; a row ends after
    ``eos_id`` (one id or several), which is kept). ``sampling``: the keyword arguments of
    :func:`iter_tokens` (temperature, top_k, top_p, min_p, repetition_penalty, seed,
    state_format)."""
    rows = _as_rows(input_ids)
    ends = _ids(eos_id)
    new: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    for token in iter_tokens(model, rows, max_new_tokens=max_new_tokens, **sampling):
        for i, t in enumerate(token.tolist()):
            if not done[i]:
                new[i].append(t)
                done[i] = t in ends
        if all(done):
            break
    return new


class GenerateOptions(TypedDict, total=False):
    """The keyword options of :func:`generate` besides ``max_new_tokens`` and ``stream``."""

    temperature: float
    top_k: int | None
    top_p: float | None
    min_p: float | None
    repetition_penalty: float
    seed: int | None
    stop: Sequence[str] | None
    state_format: str | None
    decoder: Decoder | None


@overload
def generate(model: LoopLM, tokenizer: Tokenizer, prompts: str, *, max_new_tokens: int,
             stream: Literal[False] = False, **options: Unpack[GenerateOptions]) -> str: ...
@overload
def generate(model: LoopLM, tokenizer: Tokenizer, prompts: list[str], *, max_new_tokens: int,
             stream: Literal[False] = False, **options: Unpack[GenerateOptions]) -> list[str]: ...
@overload
def generate(model: LoopLM, tokenizer: Tokenizer, prompts: str, *, max_new_tokens: int,
             stream: Literal[True], **options: Unpack[GenerateOptions]) -> Iterator[str]: ...
@overload
def generate(model: LoopLM, tokenizer: Tokenizer, prompts: list[str], *, max_new_tokens: int,
             stream: Literal[True], **options: Unpack[GenerateOptions]) -> Iterator[list[str]]: ...
def generate(model: LoopLM, tokenizer: Tokenizer, prompts: str | list[str], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, min_p: float | None = None, repetition_penalty: float = 1.0,
             seed: int | None = None, stop: Sequence[str] | None = None, stream: bool = False,
             state_format: str | None = None, decoder: Decoder | None = None
             ) -> str | list[str] | Iterator[str] | Iterator[list[str]]:
    """Generate text after each prompt.

    Returns the new text (``str`` for a ``str`` prompt, else one string per prompt), ending
    before the first stop string, at the tokenizer's end-of-text token (``eos_id``, if it has
    one) or after ``max_new_tokens``. With ``stream=True`` returns an iterator instead: of text
    pieces (``str`` prompt) or of one piece per prompt at each step ("" when a row has none).
    Prompts of different lengths decode as one batch (left-padded). ``decoder``: the token
    iterator (default :func:`iter_tokens`; e.g. a partial of ``speculative.iter_speculative``).
    """
    single = isinstance(prompts, str)
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise ValueError("prompts is empty: give at least one prompt")
    rows = [tokenizer.encode(t) for t in texts]
    for i, (text, row) in enumerate(zip(texts, rows)):
        if not text or not row:
            raise ValueError(f"prompt {i} is empty: give at least one character")
    pieces = stream_text(model, tokenizer, rows, max_new_tokens=max_new_tokens, stop=stop,
                         temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                         repetition_penalty=repetition_penalty, seed=seed, state_format=state_format,
                         decoder=decoder)
    if stream:
        return (p[0] for p in pieces if p[0]) if single else pieces
    out = ["".join(col) for col in zip(*pieces)]  # stream_text yields at least one step
    return out[0] if single else out


def stream_text(model: LoopLM, tokenizer: Tokenizer, rows: list[list[int]], *, max_new_tokens: int,
                stop: Sequence[str] | None = None, end_ids: int | Collection[int] | None = None,
                decoder: Decoder | None = None, **sampling: Any) -> Iterator[list[str]]:
    """Decode token-id prompts ``rows`` as one batch and yield, per step, one text piece per row
    ("" when a row has none or has ended). A row ends before its first stop string or at a
    token of ``end_ids`` (default: the tokenizer's ``eos_id``), which is not printed.
    Arguments are checked before this returns (not at the first ``next()``); ``sampling``: the
    keyword arguments of :func:`iter_tokens`, which ``decoder`` (default :func:`iter_tokens`) is."""
    if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) for s in stop)):
        raise TypeError(f"stop must be a list of strings, got {stop!r}")
    rows = _as_rows(rows)
    check_sampling(sampling.get("temperature", 0.0), sampling.get("top_k"), sampling.get("top_p"),
                   sampling.get("min_p"), sampling.get("repetition_penalty", 1.0))
    check_prompts(model, rows, max_new_tokens)
    ends = _ids(getattr(tokenizer, "eos_id", None) if end_ids is None else end_ids)
    tokens = (decoder or iter_tokens)(model, rows, max_new_tokens=max_new_tokens, **sampling)
    return _pieces(tokenizer, tokens, len(rows), list(stop or ()), ends)


def _pieces(tokenizer: Tokenizer, tokens: Generator[torch.Tensor, None, None], n_rows: int, stop: list[str],
            ends: frozenset[int]) -> Iterator[list[str]]:
    streams = [TextStream(tokenizer, stop) for _ in range(n_rows)]
    for token in tokens:
        step = []
        for s, t in zip(streams, token.tolist()):
            if s.stopped:
                step.append("")
            elif t in ends:
                step.append(s.finish())
            else:
                step.append(s.push(t))
        yield step
        if all(s.stopped for s in streams):
            tokens.close()
            return
    yield [s.finish() for s in streams]
