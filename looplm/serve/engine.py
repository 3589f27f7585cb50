"""The serving engine: one scheduler thread owns the model and decodes every request in one batch.

Iteration-level scheduling (continuous batching, as in Orca, Yu et al. 2022): an iteration runs
one decoding step (``T = 1``) for every running request together and one prefill forward over at
most ``prefill_chunk`` prompt tokens of the admitted requests (chunked prefill, Agrawal et al.
2023, so that running streams keep flowing while long prompts are read). A prefill forward is
``[B, T]`` without padding: ``T`` is what the oldest admitted prompt has left (at most the chunk),
and the next prompts with at least ``T`` tokens left read ``T`` tokens beside it (FIFO; short
prompts share a forward). A request whose prompt is read samples its first token and joins the
batch at the next step; a finished or cancelled request leaves it at the next step.

The policy between the two: prefill first, but running streams wait at most ``max_stall`` seconds
(0.5) for prefill forwards between two decoding steps. Every new request's first token waits for
the prefills ahead of it, and a decoding step costs every waiting prompt its time; decoding only
when the running rows have waited ``max_stall`` leaves fewer, fuller steps during a burst of
arrivals (less work in all, earlier first tokens for the last prompts of a burst) at a bounded
inter-token gap. ``max_stall=0``: a decoding step after every prefill forward (the smallest gaps,
the latest first tokens in a burst); a large value: prefill until no prompt is left.

Each request owns a row of the batch's decoding state (:class:`looplm.serve.batch.BatchState`):
a fixed-state layer's state row, an attention layer's cache in a row of storage allocated once,
every row ending at the same slot (caches of different lengths have unused, masked slots in front,
which the whole-stack step skips, so every row decodes exactly as it would alone). A request
joins by copying its own prefilled state into a free row and leaves by moving the last row into
its place; no join or leave copies the other rows' caches, and steps append in place. Sampling
draws from one ``torch.Generator`` per request, so a seeded request gives the same tokens
whatever else is in the batch.

Self-speculative decoding (``draft``, e.g. ``ngram:4``; :mod:`looplm.speculative`): while one
greedy request runs alone (nothing waiting or prefilling; no penalties, no logprobs), each
iteration drafts up to ``gamma`` tokens and verifies them in one forward over the request's own
state, emitting the accepted tokens and the model's next one (the greedy output is unchanged).
When another request arrives, the tokens emitted but not yet in the state are read in one
forward and the request's state returns to the batch.

The API layer talks to the engine through :meth:`Engine.submit` (from any thread; events come
back through the request's ``emit`` callback, called on the engine thread) and
:meth:`Engine.cancel`.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from looplm.errors import LoopLMError
from looplm.generate import (
    TextStream,
    check_prompts,
    check_sampling,
    decoding_mode,
    penalize_counts,
    sample_next,
)
from looplm.layers.mixer_states import KVState
from looplm.model import LoopLM
from looplm.ops.linear import BF16_NEEDS, bf16_products
from looplm.ops.qlinear import bf16_rows
from looplm.quant.state import quantize_caches
from looplm.serve.batch import BatchState
from looplm.serve.metrics import ServeMetrics
from looplm.speculative import build_drafter, check_gamma, commit_pending, greedy_sampler, keep_hidden, verify
from looplm.state import ModelState, cat_states, select_rows


class QueueFullError(LoopLMError):
    """Too many requests are waiting; the client should retry later."""


@dataclass
class SamplingParams:
    """What one request asks for: at most ``max_tokens`` new tokens, ``temperature`` (0 = greedy),
    ``top_p``, ``min_p``, OpenAI's ``presence_penalty`` and ``frequency_penalty`` (on the tokens
    generated so far), ``stop`` strings (the text ends before the first), ``seed`` of its
    generator; ``logprobs``: report each token's log-probability and that many top alternatives
    (None: none); ``ignore_eos``: the end-of-text token does not end it (load tests)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: Sequence[str] = ()
    seed: int | None = None
    logprobs: int | None = None
    ignore_eos: bool = False


@dataclass
class TokenLogprob:
    """One generated token's log-probability under the model (before temperature, penalties and
    filters) and the ``top`` most likely tokens' ``(id, logprob)``, most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What the engine reports to a request: new ``text`` (may be ""), and at the end
    ``finish_reason`` (``stop`` | ``length`` | ``error``) with the token counts; ``logprobs``: the
    tokens accepted since the last event (when the request asked for them)."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(eq=False)
class Request:
    """One request's engine-side state (created by :meth:`Engine.submit`)."""

    id: int
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], object]  # what it returns is ignored
    stream: TextStream
    generator: torch.Generator | None
    arrived: float = field(default_factory=time.perf_counter)
    state: ModelState | None = None  # the request's own rows while its prompt is read
    read: int = 0  # prompt tokens read so far
    tokens: list[int] = field(default_factory=list)  # generated so far
    generated: int = 0
    last_token: int = 0
    first_token_at: float | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet reported
    cancelled: bool = False
    done: bool = False

    @property
    def budget(self) -> int:
        """Tokens it may hold in the state: prompt + new tokens."""
        return len(self.prompt) + self.params.max_tokens



def _prefilled(req: Request) -> ModelState:
    """The state of a request whose prompt has been read (set by the prefill step)."""
    if req.state is None:
        raise RuntimeError("a request joined the batch before its prompt was read")
    return req.state


@dataclass(eq=False)
class _Solo:
    """A greedy request decoding alone, speculatively: its own one-row ``state``, the tokens
    emitted but not yet in it (``pending``, the newest last), and its text so far (``context``)."""

    req: Request
    state: ModelState
    pending: list[int]
    context: list[int]
    fixed: bool  # the state has fixed-size layers (rolled back by holding tokens in pending)
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)
    hook: Any = None


class Engine:
    """Serves ``model`` (a LoopLM) with ``tokenizer``: ``max_batch`` requests decode together,
    at most ``max_queue`` wait (more: :class:`QueueFullError`), the running and prefilling
    requests together hold at most ``max_tokens_in_flight`` prompt + new tokens (None: no limit),
    at most ``prefill_chunk`` prompt tokens are read per prefill forward (several prompts),
    running streams wait at most ``max_stall`` seconds for prefill forwards between two steps, and
    ``kv_cache="int8"`` holds every attention cache as int8 codes with a scale per cached row
    (:mod:`looplm.quant.state`; the decoding attention reads a quarter of the bytes), and ``draft``
    (a ``--draft`` SPEC) decodes a greedy request that runs alone speculatively, ``gamma`` draft
    tokens per verification. ``bf16_prefill``: prompt forwards multiply float32 weights and attend
    in bfloat16 on AMX tiles (:func:`looplm.ops.linear.bf16_products`; decoding steps stay float32;
    ValueError where the CPU has no AMX bf16 tiles)."""

    def __init__(self, model: LoopLM, tokenizer: Any, *, max_batch: int = 16, max_queue: int = 256,
                 max_tokens_in_flight: int | None = None, prefill_chunk: int = 512, max_stall: float = 0.5,
                 kv_cache: str | None = None, draft: str | None = None, gamma: int = 4,
                 bf16_prefill: bool = False, metrics: ServeMetrics | None = None) -> None:
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1 or not max_stall >= 0:
            raise ValueError("max_batch and prefill_chunk must be >= 1, max_queue and max_stall >= 0")
        if kv_cache not in (None, "float", "int8"):
            raise ValueError(f"kv_cache must be float or int8, got {kv_cache!r}")
        self.kv_cache = None if kv_cache == "float" else kv_cache
        if draft is not None and self.kv_cache is not None:
            raise ValueError("a draft (speculative decoding) needs float caches, not kv_cache=int8")
        if bf16_prefill and bf16_rows() == 0:
            raise ValueError(f"bf16 prefill needs {BF16_NEEDS}")
        self.bf16_prefill = bf16_prefill
        check_gamma(gamma)
        self.drafter = None if draft is None else build_drafter(model, draft)  # ConfigError if bad
        self.gamma = gamma
        self._solo: _Solo | None = None
        self.model = model
        self.tokenizer = tokenizer
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_tokens_in_flight = max_tokens_in_flight
        self.prefill_chunk = prefill_chunk
        self.max_stall = max_stall
        self._stepped = 0.0  # when the running rows last got a token
        self.metrics = metrics or ServeMetrics()
        self.device = next(model.parameters()).device
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._prefilling: list[Request] = []
        self._rows: list[Request] = []  # the running batch, in state row order
        self._batch = BatchState(max_batch)
        self._thread: threading.Thread | None = None
        self._stop = False

    # ------------------------------------------------------------ public, any thread

    def start(self) -> None:
        """Start the scheduler thread (idempotent)."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="looplm-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the scheduler thread; requests still in flight end with an error event."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _init_state(self) -> ModelState:
        """A request's empty decoding state: its attention caches in ``kv_cache``'s format."""
        state = self.model.init_state(1)
        return state if self.kv_cache is None else quantize_caches(state, self.kv_cache)

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise ValueError for a request that can never be served (empty prompt, bad ids,
        bad sampling values, prompt + max_tokens beyond the model's context or the in-flight
        limit)."""
        check_sampling(params.temperature, None, params.top_p, params.min_p)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(params, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        if params.logprobs is not None and not 0 <= params.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20] or None, got {params.logprobs!r}")
        if isinstance(params.max_tokens, bool) or not isinstance(params.max_tokens, int) \
                or params.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {params.max_tokens!r}")
        check_prompts(self.model, [prompt], params.max_tokens)
        limit = self.max_tokens_in_flight
        if limit is not None and len(prompt) + params.max_tokens > limit:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_tokens={params.max_tokens} exceeds "
                             f"the server's max_tokens_in_flight={limit}")

    def submit(self, prompt: list[int], params: SamplingParams, emit: Callable[[Event], object]) -> Request:
        """Queue a request; ``emit`` receives its events on the engine thread. Raises ValueError
        (see :meth:`check`) or QueueFullError."""
        self.check(prompt, params)
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.device)
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed)
        req = Request(next(self._ids), list(prompt), params, emit, TextStream(self.tokenizer, params.stop),
                      generator)
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                self.metrics.rejected.inc()
                raise QueueFullError(f"{len(self._waiting)} requests are waiting (the limit): retry later")
            self._waiting.append(req)
            self.metrics.queue.set(len(self._waiting))
            self._cond.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Drop ``req`` (a client went away): its rows are freed at the next step."""
        with self._cond:
            req.cancelled = True
            self._cond.notify()

    @property
    def running(self) -> int:
        """Requests decoding in the batch (a finished one no longer counts, even before its row is freed)."""
        return sum(not r.done for r in list(self._rows))

    # ------------------------------------------------------------ engine thread

    def run_until_idle(self) -> None:
        """Serve in the calling thread until nothing is waiting, prefilling or running (the
        scheduler thread must not be started). The same iterations as the scheduler thread's; for
        batch jobs and benchmarks whose thread already ran torch's parallel operations: libgomp
        keeps a thread pool per thread that ran a parallel region, and when the pools outnumber
        the cores it stops spin-waiting between regions, which costs a step of 16 rows ~20% here."""
        if self._thread is not None:
            raise RuntimeError("run_until_idle: the scheduler thread is running")
        with torch.no_grad(), decoding_mode(self.model):
            while True:
                with self._cond:
                    if not (self._waiting or self._prefilling or self._rows):
                        return
                    self._admit()
                self._serve_once()

    def _loop(self) -> None:
        with torch.no_grad(), decoding_mode(self.model):
            while True:
                with self._cond:
                    while not self._stop and not (self._waiting or self._prefilling or self._rows):
                        self._cond.wait()
                    if self._stop:
                        break
                    self._admit()
                self._serve_once()
            for req in list(self._waiting) + self._prefilling + self._rows:
                self._finish(req, "", "error", error="the server is shutting down")

    def _serve_once(self) -> None:
        """One iteration (a decoding step and/or a prefill forward) and the metrics' report."""
        try:
            self._iteration()
        except Exception as err:  # a model failure ends the requests in flight, not the server
            for req in self._rows + self._prefilling:
                self._finish(req, "", "error", error=f"{type(err).__name__}: {err}")
            self._rows, self._prefilling, self._batch = [], [], BatchState(self.max_batch)
            self._end_solo()
        self._report()

    def _admit(self) -> None:
        """Move waiting requests into prefill while the batch and the token budget allow."""
        for req in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(req)
            self._drop(req)
        in_flight = sum(r.budget for r in self._rows + self._prefilling)
        while self._waiting and len(self._rows) + len(self._prefilling) < self.max_batch:
            req = self._waiting[0]
            if self.max_tokens_in_flight is not None and in_flight + req.budget > self.max_tokens_in_flight:
                break
            self._waiting.popleft()
            in_flight += req.budget
            self._prefilling.append(req)
        self.metrics.queue.set(len(self._waiting))

    def _iteration(self) -> None:
        if self._solo is not None and (self._prefilling or self._waiting):
            self._leave_solo()
        for req in [r for r in self._prefilling if r.cancelled]:
            self._prefilling.remove(req)
            self._drop(req)
        if self._rows and (not self._prefilling or time.perf_counter() - self._stepped >= self.max_stall):
            self._decode_step()
        if self._prefilling:
            self._prefill()

    def _decode_step(self) -> None:
        """One token for every running request; finished and cancelled ones leave the batch."""
        if self._solo is None and self._may_go_solo():
            self._enter_solo()
        if self._solo is not None:
            self._solo_step()
            return
        t0 = time.perf_counter()
        tokens = torch.tensor([[r.last_token] for r in self._rows], dtype=torch.long, device=self.device)
        self._batch.reserve(1)
        out = self.model(tokens, state=self._batch.state(), use_cache=True)
        self._batch.update(out.state)
        nxt = self._sample(out.logits[:, -1], self._rows)
        self.metrics.batch_size.observe(len(self._rows))
        done = [i for i, (req, tok) in enumerate(zip(self._rows, nxt)) if self._accept(req, tok)]
        self.metrics.step_seconds.observe(time.perf_counter() - t0)
        for i in reversed(done):  # the last row moves into the freed one
            self._batch.remove(i)
            self._rows[i] = self._rows[-1]
            self._rows.pop()
        self._stepped = time.perf_counter()

    def _may_go_solo(self) -> bool:
        """Whether the one running request may decode speculatively now."""
        if self.drafter is None or len(self._rows) != 1 or self._prefilling or self._waiting:
            return False
        p = self._rows[0].params
        return (p.temperature == 0 and not p.presence_penalty and not p.frequency_penalty
                and p.logprobs is None and not self._rows[0].cancelled)

    def _enter_solo(self) -> None:
        """Take the running request's row out of the batch as a state of its own."""
        assert self.drafter is not None
        req = self._rows[0]
        state = select_rows(self._batch.state(), [0])
        self._batch.remove(0)
        fixed = any(not isinstance(s, KVState) for s in state.layers.values())
        solo = _Solo(req, state, [req.last_token], [*req.prompt, *req.tokens], fixed)
        if self.drafter.hidden:
            solo.hook = keep_hidden(self.model, solo.hidden)
        self.drafter.start(solo.context[:-1], solo.context[-1])
        self._solo = solo

    def _end_solo(self) -> _Solo | None:
        """Stop decoding speculatively (the draft's hook removed); the solo state it held."""
        solo, self._solo = self._solo, None
        if solo is not None and solo.hook is not None:
            solo.hook.remove()
        return solo

    def _leave_solo(self) -> None:
        """The solo request's pending tokens read (the newest stays for the next step), its state
        back in the batch."""
        solo = self._end_solo()
        if solo is not None and not solo.req.done:
            self._batch.add(commit_pending(self.model, solo.state, solo.pending))

    def _solo_step(self) -> None:
        """Draft up to ``gamma`` tokens, verify them in one forward, emit what was accepted."""
        solo, drafter = self._solo, self.drafter
        assert solo is not None and drafter is not None
        req = solo.req
        t0 = time.perf_counter()
        g = min(self.gamma, req.params.max_tokens - req.generated - 1)
        drafts, qs = drafter.propose(solo.context, g, greedy_sampler()) if g > 0 else ([], [])
        drafts, qs = drafts[:g], qs[:g]
        n, token, solo.state, solo.pending, row = verify(
            self.model, solo.state, solo.pending, drafts, qs, greedy_sampler(), solo.fixed,
            solo.hidden if drafter.hidden else None)
        if row is not None:
            drafter.observe(row)
        drafter.update(n, token)
        new = drafts[:n] + [token]
        solo.context += new
        self.metrics.draft_tokens.inc(len(drafts))
        self.metrics.draft_accepted.inc(n)
        self.metrics.batch_size.observe(1)
        self.metrics.step_seconds.observe(time.perf_counter() - t0)
        if any(self._accept(req, t) for t in new):  # stops at the first token that ends it
            self._end_solo()
            self._rows.pop()
        self._stepped = time.perf_counter()

    def _prefill(self) -> None:
        """Read the next prompt tokens of the admitted requests in one forward of ``[B, T]``
        tokens, no padding: ``T`` is what the oldest request has left (at most ``prefill_chunk``),
        and the next requests with at least ``T`` tokens left (oldest first) read ``T`` tokens
        beside it, ``B T <= prefill_chunk``; a request whose prompt is now read samples its first
        token and joins the batch."""
        head = self._prefilling[0]
        T = min(len(head.prompt) - head.read, self.prefill_chunk)
        group = [req for req in self._prefilling if len(req.prompt) - req.read >= T]
        group = group[:max(1, self.prefill_chunk // T)]
        ids = torch.tensor([req.prompt[req.read:req.read + T] for req in group], dtype=torch.long)
        for req in group:
            req.read += T
        at = torch.zeros(len(group), T, dtype=torch.bool)
        at[:, -1] = torch.tensor([req.read == len(req.prompt) for req in group])  # head only there
        state = cat_states([self._init_state() if req.state is None else req.state for req in group])
        with bf16_products(self.bf16_prefill):
            out = self.model(ids.to(self.device), state=state, use_cache=True, logits_at=at.to(self.device))
        for i, req in enumerate(group):  # each request keeps its own row, padding slots dropped
            req.state = out.state if len(group) == 1 else select_rows(out.state, [i])
        done = [req for req in group if req.read == len(req.prompt)]
        if not done:
            return
        joining = []
        for req, token in zip(done, self._sample(out.logits, done)):
            self._prefilling.remove(req)
            self.metrics.prompt_tokens.inc(len(req.prompt))
            if not self._accept(req, token):
                joining.append(req)
        if joining and not self._rows:
            self._stepped = time.perf_counter()
        for req in joining:
            self._batch.add(_prefilled(req))
            self._rows.append(req)
        for req in done:
            req.state = None

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        """One token per row of ``logits [B, V]``, each from its request's own generator after
        its penalties; the token's log-probability kept for requests that asked for it."""
        chosen = logits.max(-1).indices.tolist()  # argmax's first maximum, in half argmax's time here
        for i, req in enumerate(reqs):
            p = req.params
            if p.temperature > 0 or p.presence_penalty or p.frequency_penalty:
                row = logits[i:i + 1]
                if (p.presence_penalty or p.frequency_penalty) and req.tokens:
                    counts = torch.bincount(torch.tensor(req.tokens), minlength=row.shape[-1])
                    row = penalize_counts(row, counts.to(row.device)[None], p.presence_penalty,
                                          p.frequency_penalty)
                chosen[i] = int(sample_next(row, temperature=p.temperature, top_p=p.top_p, min_p=p.min_p,
                                            generator=req.generator)[0])
            if p.logprobs is not None:
                lp = logits[i].float().log_softmax(-1)
                top = lp.topk(p.logprobs) if p.logprobs else None
                req.logprobs.append(TokenLogprob(chosen[i], float(lp[chosen[i]]), [] if top is None else
                                                 list(zip(top.indices.tolist(), top.values.tolist()))))
        return chosen

    def _accept(self, req: Request, token: int) -> bool:
        """Take ``req``'s next token; report its text; True when the request is done (end of
        text, a stop string, max_tokens, or cancelled)."""
        if req.cancelled:
            self._drop(req)
            return True
        now = time.perf_counter()
        if req.first_token_at is None:
            req.first_token_at = now
            self.metrics.ttft.observe(now - req.arrived)
        req.generated += 1
        req.tokens.append(token)
        req.last_token = token
        self.metrics.generated_tokens.inc()
        if token == self.eos_id and not req.params.ignore_eos:
            req.logprobs = req.logprobs[:-1]  # the end-of-text token is not part of the text
            self._finish(req, req.stream.finish(), "stop")
            return True
        text = req.stream.push(token)
        if req.stream.stopped:
            self._finish(req, text, "stop")
            return True
        if req.generated >= req.params.max_tokens:
            self._finish(req, text + req.stream.finish(), "length")
            return True
        self._emit(req, Event(text))
        return False

    def _emit(self, req: Request, event: Event) -> None:
        event.logprobs, req.logprobs = req.logprobs, []
        try:
            req.emit(event)
        except Exception:  # a broken listener ends only its own request
            req.cancelled = True

    def _finish(self, req: Request, text: str, reason: str, error: str | None = None) -> None:
        req.done = True
        self.metrics.requests.labels(outcome=reason).inc()
        self.metrics.latency.observe(time.perf_counter() - req.arrived)
        self._emit(req, Event(text, reason, len(req.prompt), req.generated, error))

    def _drop(self, req: Request) -> None:
        req.done = True
        self.metrics.requests.labels(outcome="cancelled").inc()

    def _report(self) -> None:
        self.metrics.running.set(len(self._rows))
        self.metrics.prefilling.set(len(self._prefilling))
        solo = self._solo
        self.metrics.state_bytes.set(self._batch.nbytes() if solo is None else solo.state.nbytes())
