"""Self-speculative decoding: a cheap draft from the same checkpoint proposes up to ``gamma``
tokens, the full model scores them all in one forward over its state, and the longest agreeing
prefix plus one token of the model's own is emitted (Leviathan et al. 2023; Chen et al. 2023).

Drafts (``--draft SPEC``): ``layers:K`` the first K layers + the final norm and output head
(early exit); ``recursions:R`` a recursive model run with R < n_recursions passes of its core;
``ngram:N`` prompt lookup (the tokens that followed the latest earlier occurrence of the last
n <= N tokens of the context, longest n first; Saxena 2023); ``heads:PATH`` trained heads of
:mod:`looplm.draft_heads` (an exit head at layer K, or Medusa heads, Cai et al. 2024). Drafts
joined by ``+`` (``ngram:3+heads:PATH``) take turns: the first that proposes anything drafts.

Acceptance: greedy keeps a draft token while it equals the model's argmax, so the output is the
plain greedy output. Sampling accepts a draft token ``x ~ q`` with probability
``min(1, p(x)/q(x))`` and on rejection draws from ``max(0, p − q)`` renormalised; a
deterministic draft (n-gram, greedy draft) has ``q`` one-hot at ``x``. Every emitted token is
then distributed as the model's ``p`` (after temperature and the top-k/top-p/min-p filters).

Rollback: the verification forward runs from the state before the draft. When the draft is cut
short, an attention-only state is truncated to the accepted tokens (``kv_cache.truncate``); a
state with fixed-size layers is kept at the earlier point and the accepted tokens are fed
again in front of the next verification (at most ``LAG`` tokens, then one forward commits
them), so the state always equals that of running exactly the accepted tokens.

One prompt at a time (batch 1); no repetition penalty and no compressed state.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from looplm.draft_heads import MedusaHeads, fewer_recursions, load_heads, truncated_model
from looplm.errors import ConfigError
from looplm.generate import _as_rows, check_prompts, check_sampling, decoding_mode, keep_mask, sample_next
from looplm.layers import kv_cache
from looplm.layers.mixer_states import KVState
from looplm.model import LoopLM
from looplm.state import ModelState

DRAFT_KINDS = ("layers", "recursions", "ngram", "heads")
LAG = 16  # accepted tokens a fixed-state model may hold back before one forward commits them


@dataclass
class SpecStats:
    """Counts of speculative runs (they add up over runs): verification forwards, draft tokens
    proposed and accepted, tokens they emitted, seconds spent producing those tokens (the
    prompt's forward and first token are not counted)."""

    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def line(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        per = self.tokens / self.rounds if self.rounds else 0.0
        return (f"speculative: {self.tokens} tokens, acceptance {self.acceptance:.1%} "
                f"({self.accepted}/{self.proposed}), {per:.2f} tokens per forward, {rate:.1f} tokens/s")


class _Sampler:
    """The model's sampling rule as probabilities: ``temperature == 0`` is greedy."""

    def __init__(self, temperature: float, top_k: int | None, top_p: float | None, min_p: float | None,
                 generator: torch.Generator | None) -> None:
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        self.generator = generator

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [N, V]`` -> the sampling distribution ``[N, V]`` (float32)."""
        scores = logits.float() / self.temperature
        keep = keep_mask(scores, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)
        return scores.masked_fill(~keep, float("-inf")).softmax(-1)

    def draw(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """One draft token from ``logits [V]`` and its distribution (None when greedy)."""
        if self.greedy:
            return int(logits.argmax()), None
        q = self.probs(logits[None])[0]
        return int(torch.multinomial(q, 1, generator=self.generator)), q

    def pick(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))


def greedy_sampler() -> _Sampler:
    """The sampler of greedy decoding (a draft token is kept while it is the model's argmax)."""
    return _Sampler(0.0, None, None, None, None)


# ---------------------------------------------------------------- drafts


class Drafter:
    """Proposes draft tokens. ``start`` after the prompt's first sampled token, ``propose`` up
    to ``g`` tokens (and their draft distributions, None = deterministic), ``update`` with the
    number accepted and the model's own next token. ``hidden``: whether it reads the model's
    final hidden state (``observe`` gets the row that predicted the newest token)."""

    hidden = False

    def start(self, prompt: list[int], first: int) -> None:
        pass

    def propose(self, context: list[int], g: int, sampler: _Sampler
                ) -> tuple[list[int], list[torch.Tensor | None]]:
        raise NotImplementedError

    def update(self, accepted: int, token: int) -> None:
        pass

    def skip(self, new: list[int]) -> None:
        """Another drafter drafted this round; ``new``: the tokens emitted (accepted, the model's)."""

    def observe(self, hidden: torch.Tensor) -> None:
        pass


class ModelDrafter(Drafter):
    """A smaller model sharing the checkpoint's modules, decoded step by step on its own state;
    the state after each draft step is kept, so a rejection rolls back by picking one."""

    def __init__(self, draft: LoopLM) -> None:
        self.draft = draft
        self.state: ModelState | None = None
        self.pending: list[int] = []
        self.steps: list[ModelState] = []
        self.tokens: list[int] = []

    def start(self, prompt: list[int], first: int) -> None:
        self.state, self.pending = None, [*prompt, first]

    def propose(self, context, g, sampler):
        ids, state = self.pending, self.state
        self.steps, self.tokens = [], []
        qs: list[torch.Tensor | None] = []
        device = self.draft.norm.weight.device
        for _ in range(g):
            last = torch.zeros(1, len(ids), dtype=torch.bool, device=device)
            last[0, -1] = True
            out = self.draft(torch.tensor([ids], device=device), state=state, use_cache=True, logits_at=last)
            state = out.state
            token, q = sampler.draw(out.logits[-1])
            self.steps.append(state)
            self.tokens.append(token)
            qs.append(q)
            ids = [token]
        return list(self.tokens), qs

    def update(self, accepted, token):
        if not self.steps:
            self.pending = [*self.pending, token]
            return
        i = min(accepted, len(self.steps) - 1)  # steps[i] has read the pending tokens and i drafts
        self.state, self.pending = self.steps[i], [*self.tokens[i:accepted], token]
        self.steps = []

    def skip(self, new):
        self.steps, self.pending = [], [*self.pending, *new]


class NgramDrafter(Drafter):
    """Prompt lookup: for n = N..1, the latest earlier occurrence of the context's last n tokens;
    its continuation is the draft (nothing when no n-gram recurs)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def propose(self, context, g, sampler):
        L = len(context)
        for n in range(min(self.n, L - 1), 0, -1):
            tail = context[L - n:]
            for j in range(L - n - 1, -1, -1):
                if context[j:j + n] == tail:
                    draft = context[j + n:j + n + g]
                    return draft, [None] * len(draft)
        return [], []


class MedusaDrafter(Drafter):
    """Medusa heads on the model's final hidden state at the newest token's predicting row."""

    hidden = True

    def __init__(self, model: LoopLM, heads: MedusaHeads) -> None:
        self.model, self.heads = model, heads
        self.h: torch.Tensor | None = None

    def start(self, prompt, first):
        self.h = None  # a hidden state of an earlier text would draft nonsense

    def observe(self, hidden):
        self.h = hidden

    def propose(self, context, g, sampler):
        if self.h is None or g == 0:
            return [], []
        vocab = self.heads.vocab
        logits = self.heads.logits(self.heads(self.h[None])[0, :g])  # [g, n] over the shortlist
        if sampler.greedy:
            return vocab[logits.argmax(-1)].tolist(), [None] * len(logits)
        full = logits.new_full((len(logits), self.model.config.vocab_size), float("-inf"))
        full[:, vocab] = logits
        drawn = [sampler.draw(row) for row in full]
        return [t for t, _ in drawn], [q for _, q in drawn]


class CombinedDrafter(Drafter):
    """Drafters in turn: the first one that proposes anything drafts this round (e.g. prompt
    lookup where the context repeats itself, trained heads elsewhere); the others are told the
    emitted tokens."""

    def __init__(self, drafters: list[Drafter]) -> None:
        self.drafters = drafters
        self.hidden = any(d.hidden for d in drafters)
        self.used: Drafter | None = None
        self.drafts: list[int] = []

    def start(self, prompt, first):
        for d in self.drafters:
            d.start(prompt, first)

    def propose(self, context, g, sampler):
        self.used, self.drafts = None, []
        for d in self.drafters:
            drafts, qs = d.propose(context, g, sampler)
            if drafts:
                self.used, self.drafts = d, drafts
                return drafts, qs
        return [], []

    def update(self, accepted, token):
        for d in self.drafters:
            if self.used is None or d is self.used:
                d.update(accepted, token)
            else:
                d.skip([*self.drafts[:accepted], token])
        self.used, self.drafts = None, []

    def observe(self, hidden):
        for d in self.drafters:
            d.observe(hidden)


def parse_draft(spec: str) -> tuple[str, str]:
    """``KIND:VALUE`` -> (kind, value); ConfigError naming the flag for anything else."""
    kind, sep, value = spec.partition(":")
    if not sep or kind not in DRAFT_KINDS or not value:
        raise ConfigError(f"--draft {spec!r} must be KIND:VALUE with KIND one of {', '.join(DRAFT_KINDS)} "
                          "(layers:K, recursions:R, ngram:N, heads:PATH)")
    return kind, value


def _count(kind: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--draft {kind}:{value}: {value!r} is not an integer") from None


def build_drafter(model: LoopLM, spec: str) -> Drafter:
    """The drafter of ``--draft SPEC`` for ``model`` (one ConfigError per bad spec); drafts joined
    by ``+`` make a :class:`CombinedDrafter`."""
    if "+" in spec:
        return CombinedDrafter([build_drafter(model, part) for part in spec.split("+")])
    kind, value = parse_draft(spec)
    c = model.config
    n_layers = c.n_prelude + c.n_core + c.n_coda
    if kind == "heads":
        heads = load_heads(value, model)
        if isinstance(heads, MedusaHeads):
            return MedusaDrafter(model, heads)
        return ModelDrafter(truncated_model(model, heads.layers, heads))
    count = _count(kind, value)
    if kind == "ngram":
        if count < 1:
            raise ConfigError(f"--draft ngram:{count}: N must be at least 1")
        return NgramDrafter(count)
    if kind == "layers":
        if c.n_recursions != 1:
            raise ConfigError(f"--draft layers:{count} needs a non-recursive model; this one has "
                              f"n_recursions={c.n_recursions}: use --draft recursions:R")
        if not 1 <= count < n_layers:
            raise ConfigError(f"--draft layers:{count}: K must be in 1..{n_layers - 1} "
                              f"(the model has {n_layers} layers)")
        return ModelDrafter(truncated_model(model, count))
    if c.n_recursions < 2:
        raise ConfigError(f"--draft recursions:{count} needs a recursive model (n_recursions >= 2); "
                          "this one has 1: use --draft layers:K")
    if not 1 <= count < c.n_recursions:
        raise ConfigError(f"--draft recursions:{count}: R must be in 1..{c.n_recursions - 1} "
                          f"(the model has n_recursions={c.n_recursions})")
    return ModelDrafter(fewer_recursions(model, count))


# ---------------------------------------------------------------- verification


def _accept(logits: torch.Tensor, drafts: list[int], qs: list[torch.Tensor | None],
            sampler: _Sampler) -> tuple[int, int]:
    """(draft tokens accepted, the model's next token) from the verification ``logits [g+1, V]``."""
    if sampler.greedy:
        best = logits.argmax(-1).tolist()
        n = 0
        while n < len(drafts) and drafts[n] == best[n]:
            n += 1
        return n, best[n]
    p = sampler.probs(logits)
    for i, (x, q) in enumerate(zip(drafts, qs)):
        ratio = float(p[i, x]) if q is None else min(1.0, float(p[i, x] / q[x]))
        if sampler.uniform() < ratio:
            continue
        if q is None:
            residual = p[i].clone()
            residual[x] = 0
        else:
            residual = (p[i] - q).clamp(min=0)
        if not float(residual.sum()) > 0:  # p == q up to rounding: every draft is accepted
            residual = p[i]
        return i, sampler.pick(residual / residual.sum())
    return len(drafts), sampler.pick(p[len(drafts)])


def truncate_state(state: ModelState, length: int) -> ModelState:
    """An attention-only state (batch 1) cut back to its first ``length`` tokens."""
    layers = {}
    for key, s in state.layers.items():
        keep = int((s.pos[0] < length).sum())  # one row: slots are in position order
        layers[key] = kv_cache.truncate(s, keep)
    return ModelState(torch.full_like(state.positions, length), layers)


def verify(model: LoopLM, state: ModelState, pending: list[int], drafts: list[int],
           qs: list[torch.Tensor | None], sampler: _Sampler, fixed: bool,
           hidden: dict[str, torch.Tensor] | None = None
           ) -> tuple[int, int, ModelState, list[int], torch.Tensor | None]:
    """One verification forward of ``pending + drafts`` from ``state`` (batch 1; ``pending``: the
    tokens emitted but not yet in the state, at least the newest one). Returns (drafts accepted n,
    the model's next token, the new state, the new pending tokens, and the final hidden state
    ``[d]`` that predicted the next token when ``hidden`` is the dict a hook on the model's final
    norm fills under ``"h"``, else None). The new state holds exactly the accepted tokens but the newest,
    or, for a ``fixed``-state model after a rejection, stays ``state`` with the accepted tokens
    added to ``pending`` (committed by one forward once more than ``LAG`` wait)."""
    device = state.positions.device
    ids = torch.tensor([pending + drafts], device=device)
    at = torch.zeros(ids.shape, dtype=torch.bool, device=device)
    at[0, len(pending) - 1:] = True
    out = model(ids, state=state, logits_at=at)
    if not bool(torch.isfinite(out.logits).all()):
        sample_next(out.logits)  # raises the broken-weights error
    n, token = _accept(out.logits, drafts, qs, sampler)
    row = None if hidden is None else hidden["h"][0, len(pending) - 1 + n]
    if n == len(drafts):
        return n, token, out.state, [token], row
    if not fixed:
        return n, token, truncate_state(out.state, int(state.positions[0]) + len(pending) + n), [token], row
    pending = pending + drafts[:n] + [token]
    if len(pending) > LAG:
        state, pending = commit_pending(model, state, pending), [token]
    return n, token, state, pending, row


def commit_pending(model: LoopLM, state: ModelState, pending: list[int]) -> ModelState:
    """``state`` (batch 1) after reading every ``pending`` token but the newest (which the next
    forward reads), in one forward without the head."""
    if len(pending) < 2:
        return state
    device = state.positions.device
    none = torch.zeros(1, len(pending) - 1, dtype=torch.bool, device=device)
    return model(torch.tensor([pending[:-1]], device=device), state=state, logits_at=none).state


def keep_hidden(model: LoopLM, hidden: dict[str, torch.Tensor]) -> Any:
    """A forward hook on ``model``'s final norm that keeps its output in ``hidden["h"]`` (what
    :func:`verify` and hidden-state drafters read); remove it with ``.remove()``."""
    return model.norm.register_forward_hook(lambda mod, args, out: hidden.__setitem__("h", out))


def check_gamma(gamma: int) -> None:
    """Raise ValueError unless ``gamma`` is an integer >= 1."""
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma must be an integer >= 1 (draft tokens per verification), got {gamma!r}")


@torch.no_grad()
def iter_speculative(model: LoopLM, input_ids: torch.Tensor | Sequence[Sequence[int]], *,
                     drafter: Drafter, gamma: int = 4, max_new_tokens: int,
                     temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                     min_p: float | None = None, repetition_penalty: float = 1.0, seed: int | None = None,
                     state_format: str | None = None, stats: SpecStats | None = None
                     ) -> Generator[torch.Tensor, None, None]:
    """Yield the next token ``[1]`` long, ``max_new_tokens`` times, as
    :func:`looplm.generate.iter_tokens` does (same arguments), drafting with ``drafter`` and
    verifying up to ``gamma`` tokens per forward. ``stats`` (a SpecStats) is filled in."""
    rows = _as_rows(input_ids)
    if len(rows) != 1:
        raise ValueError(f"speculative decoding takes one prompt at a time, got {len(rows)}")
    check_gamma(gamma)
    check_sampling(temperature, top_k, top_p, min_p, repetition_penalty)
    if repetition_penalty != 1:
        raise ValueError("repetition_penalty is not supported with a draft (speculative decoding)")
    if state_format is not None:
        raise ValueError("state_format is not supported with a draft (speculative decoding)")
    check_prompts(model, rows, max_new_tokens)
    if max_new_tokens == 0:
        return
    stats = SpecStats() if stats is None else stats
    device = model.norm.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    sampler = _Sampler(temperature, top_k, top_p, min_p, generator)
    prompt = rows[0]
    hidden: dict[str, torch.Tensor] = {}
    hook = None
    if drafter.hidden:
        hook = keep_hidden(model, hidden)
    try:
        with decoding_mode(model):
            last = torch.zeros(1, len(prompt), dtype=torch.bool, device=device)
            last[0, -1] = True
            out = model(torch.tensor([prompt], device=device), use_cache=True, logits_at=last)
            token = int(sample_next(out.logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                    min_p=min_p, generator=generator)[0])
            if drafter.hidden:
                drafter.observe(hidden["h"][0, -1])
            state, pending, context = out.state, [token], [*prompt, token]
            fixed = any(not isinstance(s, KVState) for s in state.layers.values())
            drafter.start(prompt, token)
            yield torch.tensor([token], device=device)
            emitted, mark = 1, time.perf_counter()
            while emitted < max_new_tokens:
                g = min(gamma, max_new_tokens - emitted - 1)
                drafts, qs = drafter.propose(context, g, sampler) if g else ([], [])
                drafts, qs = drafts[:g], qs[:g]
                n, token, state, pending, row = verify(model, state, pending, drafts, qs, sampler, fixed,
                                                       hidden if drafter.hidden else None)
                if row is not None:
                    drafter.observe(row)
                new = drafts[:n] + [token]
                drafter.update(n, token)
                context += new
                stats.rounds += 1
                stats.proposed += len(drafts)
                stats.accepted += n
                for t in new:
                    emitted += 1
                    stats.tokens += 1
                    stats.seconds += time.perf_counter() - mark
                    yield torch.tensor([t], device=device)
                    mark = time.perf_counter()
    finally:
        if hook is not None:
            hook.remove()


def speculative_ids(model: LoopLM, prompt: Sequence[int], *, draft: str | Drafter, max_new_tokens: int,
                    eos_id: int | None = None, stats: SpecStats | None = None, **options: Any) -> list[int]:
    """New token ids after one prompt (ends after ``eos_id``, kept); ``draft`` a SPEC or a
    Drafter; ``options``: the keyword arguments of :func:`iter_speculative`."""
    drafter = build_drafter(model, draft) if isinstance(draft, str) else draft
    new: list[int] = []
    for token in iter_speculative(model, [list(prompt)], drafter=drafter, max_new_tokens=max_new_tokens,
                                  stats=stats, **options):
        new.append(int(token))
        if new[-1] == eos_id:
            break
    return new
