"""The engine without HTTP: batched decoding equals decoding alone, per-request seeded sampling,
finish reasons, cancellation and the queue limit."""

import threading

import pytest
import torch

pytest.importorskip("prometheus_client")

from looplm.generate import generate_ids, iter_tokens  # noqa: E402
from looplm.layers.mixer_states import KVState, QuantKVState  # noqa: E402
from looplm.ops.qlinear import bf16_rows  # noqa: E402
from looplm.serve.engine import Engine, QueueFullError, SamplingParams  # noqa: E402
from looplm.serve.metrics import parse_metrics  # noqa: E402
from looplm.speculative import Drafter  # noqa: E402
from tests.serve.util import CONFIGS, run_requests, tiny_model, tokenizer  # noqa: E402

PROMPTS = [list(range(1 + i, 1 + i + n)) for i, n in enumerate([3, 17, 40, 9, 26])]


@pytest.fixture
def engine_for():
    engines = []

    def make(model, eos=True, **kw):
        eng = Engine(model, tokenizer(eos), **kw)
        eng.start()
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng.stop()


def test_run_until_idle_serves_in_the_calling_thread_as_the_scheduler_thread_does(engine_for):
    """The same requests served by run_until_idle (no scheduler thread) get the scheduler thread's
    tokens, every request ends, and run_until_idle refuses to run beside a started thread."""
    model = tiny_model("attention")
    sp = SamplingParams(max_tokens=7, temperature=0)
    threaded = run_requests(engine_for(model, max_batch=3, prefill_chunk=16), [(p, sp) for p in PROMPTS])
    eng = Engine(model, tokenizer(True), max_batch=3, prefill_chunk=16)
    ended = []
    reqs = [eng.submit(p, sp, lambda ev: ended.append(ev) if ev.finish_reason else None) for p in PROMPTS]
    eng.run_until_idle()
    assert [r.tokens for r in reqs] == threaded and len(ended) == len(PROMPTS)
    eng.start()
    try:
        with pytest.raises(RuntimeError, match="scheduler thread"):
            eng.run_until_idle()
    finally:
        eng.stop()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_greedy_equals_alone(name, engine_for):
    """Requests that join the batch at different steps (prompts read in forwards of at most 16
    tokens, a decoding step after each) get the tokens each gets alone, and those of generate_ids."""
    model = tiny_model(name)
    eng = engine_for(model, max_batch=8, prefill_chunk=16, max_stall=0)
    sp = SamplingParams(max_tokens=10, temperature=0)
    batched = run_requests(eng, [(p, sp) for p in PROMPTS])
    alone = [run_requests(eng, [(p, sp)])[0] for p in PROMPTS]
    assert batched == alone
    assert alone == [generate_ids(model, [p], max_new_tokens=10)[0] for p in PROMPTS]
    assert all(len(t) == 10 for t in batched)


def test_seeded_sampling_does_not_depend_on_the_batch(engine_for):
    eng = engine_for(tiny_model("hybrid"), max_batch=8, prefill_chunk=8, max_stall=0)
    mine = (PROMPTS[1], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7))
    alone = run_requests(eng, [mine])[0]
    others = [(p, SamplingParams(max_tokens=6 + i, temperature=0.8, seed=i)) for i, p in enumerate(PROMPTS)]
    together = run_requests(eng, others[:2] + [mine] + others[2:])[2]
    assert together == alone
    other_seed = run_requests(eng, [(mine[0], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9,
                                                             seed=8))])[0]
    assert other_seed != alone  # the seed matters (12 draws from ~259 tokens)


def reference_penalized(model, prompt, n, presence, frequency):
    """Greedy decoding with OpenAI's penalties, one full forward per token (no state)."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        counts = torch.bincount(torch.tensor(ids[len(prompt):], dtype=torch.long), minlength=logits.numel())
        ids.append(int((logits - frequency * counts - presence * (counts > 0)).argmax()))
    return ids[len(prompt):]


def test_penalties_min_p_and_logprobs(engine_for):
    """Penalised greedy decoding equals a full-forward reference (and changes the output);
    min_p=1 keeps only the most likely token, so sampling with it is greedy; logprobs are the
    model's log-softmax at each generated position, their alternatives sorted and led by the
    greedy token."""
    model = tiny_model("attention")
    eng = engine_for(model, eos=False, max_batch=8, prefill_chunk=16)
    pen = [SamplingParams(max_tokens=12, temperature=0, presence_penalty=0.5, frequency_penalty=1.5),
           SamplingParams(max_tokens=12, temperature=0, presence_penalty=2.0)]
    greedy = SamplingParams(max_tokens=12, temperature=0, logprobs=3)
    got = run_requests(eng, [(PROMPTS[0], pen[0]), (PROMPTS[1], pen[1]), (PROMPTS[2], greedy),
                             (PROMPTS[3], SamplingParams(max_tokens=12, temperature=1.3, min_p=1.0, seed=1))])
    assert got[0] == reference_penalized(model, PROMPTS[0], 12, 0.5, 1.5)
    assert got[1] == reference_penalized(model, PROMPTS[1], 12, 2.0, 0.0)
    plain = [generate_ids(model, [p], max_new_tokens=12)[0] for p in PROMPTS[:4]]
    assert got[0] != plain[0] or got[1] != plain[1]
    assert got[2] == plain[2] and got[3] == plain[3]

    reports = []
    req = eng.submit(PROMPTS[2], greedy, lambda ev: reports.append(ev))
    while not req.done:
        threading.Event().wait(0.01)
    entries = [e for ev in reports for e in ev.logprobs]
    with torch.no_grad():
        lp = model(torch.tensor([PROMPTS[2] + req.tokens])).logits[0].log_softmax(-1)
    assert [e.token for e in entries] == req.tokens
    for k, e in enumerate(entries):
        row = lp[len(PROMPTS[2]) - 1 + k]
        assert e.logprob == pytest.approx(float(row[e.token]), abs=1e-4)
        assert [t for t, _ in e.top] == row.topk(3).indices.tolist() and e.top[0] == (e.token, e.logprob)


def test_finish_reasons_and_text(engine_for):
    model = tiny_model("attention")
    eng = engine_for(model, max_batch=4)
    events = []
    done = threading.Event()

    def emit(ev):
        events.append(ev)
        if ev.finish_reason:
            done.set()

    eng.submit(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0), emit)
    assert done.wait(30)
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 5
    assert events[-1].prompt_tokens == len(PROMPTS[0])
    full = "".join(e.text for e in events)
    assert full == tokenizer().decode(generate_ids(model, [PROMPTS[0]], max_new_tokens=5)[0])
    # a stop string that the greedy text contains ends the text right before it
    cut = full[2:4] if len(full) >= 4 else None
    if cut and full.find(cut) == 2:
        events.clear()
        done.clear()
        eng.submit(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0, stop=[cut]), emit)
        assert done.wait(30)
        assert "".join(e.text for e in events) == full[:2] and events[-1].finish_reason == "stop"


@pytest.mark.parametrize("stall", [0.0, 1e9])
def test_prefill_forwards_are_unpadded_and_stall_bounds_the_wait(stall, monkeypatch):
    """Prefill forwards carry no padding (no mask, B T <= prefill_chunk, every prompt token read
    once); with max_stall=0 a decoding step follows every prefill forward once rows run, with a
    large max_stall every prompt is read before the first decoding step."""
    model = tiny_model("attention")
    calls: list[tuple[int, int, bool, bool]] = []  # B, T, a mask given, a prefill (the head at chosen tokens)
    forward = type(model).forward

    def spy(self, ids, *args, **kw):
        calls.append((*ids.shape, kw.get("mask") is not None, kw.get("logits_at") is not None))
        return forward(self, ids, *args, **kw)

    monkeypatch.setattr(type(model), "forward", spy)
    eng = Engine(model, tokenizer(False), max_batch=8, prefill_chunk=16, max_stall=stall)
    sp = SamplingParams(max_tokens=4, temperature=0)
    done = threading.Semaphore(0)
    reqs = [eng.submit(p, sp, lambda ev: ev.finish_reason and done.release()) for p in PROMPTS]
    eng.start()  # every request queued before the scheduler starts
    try:
        for _ in PROMPTS:
            assert done.acquire(timeout=60)
    finally:
        eng.stop()
    assert all(len(r.tokens) == 4 for r in reqs)
    assert not any(masked for _, _, masked, _ in calls)
    reads = [(i, b, t) for i, (b, t, _, prefill) in enumerate(calls) if prefill]
    assert sum(b * t for _, b, t in reads) == sum(map(len, PROMPTS))
    assert all(t <= 16 and (b == 1 or b * t <= 16) for _, b, t in reads)
    steps = [i for i, (*_, prefill) in enumerate(calls) if not prefill]
    if stall:
        assert max(i for i, *_ in reads) < min(steps)
    else:
        later = [i for i, *_ in reads if i > min(steps)]
        assert later and all(i + 1 in steps for i in later[:-1])


def test_bad_requests_raise():
    model = tiny_model("attention")
    eng = Engine(model, tokenizer())
    for prompt, sp in [([], SamplingParams(max_tokens=4)),
                       ([1, 2], SamplingParams(max_tokens=0)),
                       ([1, 2], SamplingParams(max_tokens=4, temperature=-1)),
                       ([1, 999], SamplingParams(max_tokens=4)),
                       ([1] * 250, SamplingParams(max_tokens=10))]:  # beyond max_seq_len=256
        with pytest.raises(ValueError):
            eng.submit(prompt, sp, lambda ev: None)


def test_cancel_frees_the_row_and_queue_limit(engine_for):
    eng = engine_for(tiny_model("gated_deltanet"), eos=False, max_batch=1, max_queue=1)
    first = threading.Event()
    endless = eng.submit(PROMPTS[0], SamplingParams(max_tokens=10**6, temperature=0),
                         lambda ev: first.set())
    assert first.wait(30)
    second = threading.Event()
    waiting = eng.submit(PROMPTS[1], SamplingParams(max_tokens=3, temperature=0),
                         lambda ev: ev.finish_reason and second.set())
    with pytest.raises(QueueFullError):
        eng.submit(PROMPTS[2], SamplingParams(max_tokens=3, temperature=0), lambda ev: None)
    assert not second.wait(0.3)  # the endless request holds the only row
    eng.cancel(endless)
    assert second.wait(30) and len(waiting.tokens) == 3 and endless.done
    out = run_requests(eng, [(PROMPTS[3], SamplingParams(max_tokens=3, temperature=0))])
    assert len(out[0]) == 3 and eng.running == 0
    assert eng.metrics.requests.labels(outcome="cancelled")._value.get() == 1


def test_state_rows_join_and_split_decode_as_alone():
    """cat_states pads caches of different lengths; select_rows drops the rows that left."""
    from looplm.state import cat_states, select_rows

    model = tiny_model("hybrid")
    with torch.no_grad():
        outs = [model(torch.tensor([p]), use_cache=True) for p in PROMPTS[:3]]
        nxt = torch.tensor([[int(o.logits[0, -1].argmax())] for o in outs])
        joined = model(nxt, state=cat_states([o.state for o in outs]), use_cache=True)
        for i, o in enumerate(outs):
            alone = model(nxt[i:i + 1], state=o.state, use_cache=True)
            torch.testing.assert_close(joined.logits[i], alone.logits[0], atol=1e-4, rtol=1e-4)
        kept = select_rows(joined.state, [2, 0])
        step = model(nxt[[2, 0]], state=kept, use_cache=True)
        for row, i in enumerate([2, 0]):
            a1 = model(nxt[i:i + 1], state=outs[i].state, use_cache=True)
            a2 = model(nxt[i:i + 1], state=a1.state, use_cache=True)
            torch.testing.assert_close(step.logits[row], a2.logits[0], atol=1e-4, rtol=1e-4)
        # the longest remaining row sets the cache length: slots only the dropped row used are gone
        attn = [k for k, s in kept.layers.items() if hasattr(s, "key_mask")][0]
        assert kept.layers[attn].k.shape[1] == max(len(PROMPTS[i]) for i in (2, 0)) + 1


def test_select_rows_compacts_padding_inside_a_cache():
    """Two prompts read in two padded chunks leave unused slots inside the shorter one's cache;
    selected alone, it has none and decodes as if it had been read alone."""
    from looplm.generate import left_pad
    from looplm.state import select_rows

    model = tiny_model("attention")
    a, b = PROMPTS[2], PROMPTS[0]  # 40 and 3 tokens
    with torch.no_grad():
        state = model.init_state(2)
        for lo, hi in ((0, 20), (20, 40)):
            ids, mask = left_pad([a[lo:hi], b[lo:hi] or [0]])
            if not b[lo:hi]:
                mask[1] = False
            state = model(ids, state=state, mask=mask, use_cache=True).state
        alone = model(torch.tensor([b]), use_cache=True)
        kept = select_rows(state, [1])
        for kv in kept.layers.values():
            assert bool(kv.key_mask.all()) and kv.k.shape[1] == len(b)
        nxt = torch.tensor([[5]])
        torch.testing.assert_close(model(nxt, state=kept, use_cache=True).logits,
                                   model(nxt, state=alone.state, use_cache=True).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["attention", "hybrid"])
def test_int8_caches_batched_equal_alone_and_stay_int8(name, engine_for):
    """kv_cache="int8": the batch's attention caches are int8 codes (QuantKVState), and requests
    batched get the tokens each gets alone (an attention model: those of ``iter_tokens`` holding its
    state, i.e. its caches, in int8)."""
    model = tiny_model(name)
    eng = engine_for(model, max_batch=8, prefill_chunk=16, max_stall=0, kv_cache="int8")
    sp = SamplingParams(max_tokens=10, temperature=0)
    batched = run_requests(eng, [(p, sp) for p in PROMPTS])
    alone = [run_requests(eng, [(p, sp)])[0] for p in PROMPTS]
    assert batched == alone
    caches = [s for s in eng._init_state().layers.values() if isinstance(s, KVState)]
    assert caches and all(isinstance(s, QuantKVState) for s in caches)
    if name == "attention":
        want = [[int(t) for t in iter_tokens(model, [p], max_new_tokens=10, state_format="int8")]
                for p in PROMPTS]
        assert alone == want
    with pytest.raises(ValueError, match="kv_cache"):
        Engine(model, tokenizer(), kv_cache="int4")


REPEATING = [5, 6, 7, 8, 9] * 6  # a prompt an n-gram draft can copy from


class _Oracle(Drafter):
    """Drafts the known greedy continuation but makes its last draft token wrong: every round
    accepts g - 1 tokens and rejects one (a fixed-state model then holds tokens back)."""

    def __init__(self, prompt, want):
        self.prompt, self.want = prompt, want

    def propose(self, context, g, sampler):
        at = len(context) - len(self.prompt)
        drafts = self.want[at:at + g]
        if drafts:
            drafts[-1] = (drafts[-1] + 1) % 259
        return drafts, [None] * len(drafts)


@pytest.mark.parametrize("name,draft", [("attention", "ngram:3"), ("gated_deltanet", "ngram:3"),
                                        ("hybrid", "ngram:3"), ("mor", "ngram:2"), ("moe", "ngram:2"),
                                        ("attention", "layers:1")])
def test_speculative_alone_and_with_a_request_joining_equals_plain_greedy(name, draft, engine_for):
    """A greedy request alone decodes speculatively (drafts counted in the metrics) with the tokens
    of plain greedy decoding; with drafts that are partly rejected, a second request arriving
    mid-way takes the running one back into the batch (the tokens it held back read in one
    forward), and both keep their plain greedy tokens."""
    model = tiny_model(name)
    want = generate_ids(model, [REPEATING], max_new_tokens=24)[0]
    eng = engine_for(model, max_batch=4, prefill_chunk=16, draft=draft, gamma=3)
    sp = SamplingParams(max_tokens=24, temperature=0)
    assert run_requests(eng, [(REPEATING, sp)]) == [want]
    m = parse_metrics(eng.metrics.render().decode())
    assert 0 <= m["looplm_draft_accepted_total"] <= m["looplm_draft_tokens_total"]
    assert m["looplm_draft_tokens_total"] > 0 or draft.startswith("ngram")  # random weights rarely repeat

    eng.drafter = _Oracle(REPEATING, want)
    other = PROMPTS[2]
    done = threading.Semaphore(0)
    joined: list = []

    def emit(ev):
        if len(first.tokens) >= 9 and not joined:  # the engine thread: the next iteration sees it
            joined.append(eng.submit(other, sp, lambda e: done.release() if e.finish_reason else None))
        if ev.finish_reason is not None:
            done.release()

    before = parse_metrics(eng.metrics.render().decode())["looplm_draft_accepted_total"]
    first = eng.submit(REPEATING, sp, emit)
    assert done.acquire(timeout=60) and done.acquire(timeout=60)
    assert first.tokens == want
    assert joined[0].tokens == generate_ids(model, [other], max_new_tokens=24)[0]
    assert parse_metrics(eng.metrics.render().decode())["looplm_draft_accepted_total"] >= before + 4


def test_speculative_engine_rejects_bad_drafts():
    from looplm.errors import ConfigError

    with pytest.raises(ConfigError, match="ngram"):
        Engine(tiny_model(), tokenizer(True), draft="ngram:0")
    with pytest.raises(ValueError, match="float caches"):
        Engine(tiny_model(), tokenizer(True), draft="ngram:2", kv_cache="int8")
    with pytest.raises(ValueError, match="gamma"):
        Engine(tiny_model(), tokenizer(True), draft="ngram:2", gamma=0)


def _first_logprob(eng: Engine, prompt: list[int]) -> float:
    reports = []
    req = eng.submit(prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=1), reports.append)
    while not req.done:
        threading.Event().wait(0.01)
    return [e for ev in reports for e in ev.logprobs][0].logprob


@pytest.mark.skipif(not bf16_rows(), reason="no AMX bfloat16 tiles on this CPU or build")
def test_bf16_prefill_reads_prompts_in_bfloat16_and_batches_as_alone(engine_for):
    """With bf16_prefill the prompt forwards' products are bfloat16 (the first token's log-probability
    moves by about bfloat16's rounding, not more), batched greedy tokens equal each request's alone."""
    model = tiny_model("attention", d_model=128)
    long_prompts = [list(range(1 + i, 1 + i + n)) for i, n in enumerate([40, 33, 64])]
    exact = _first_logprob(engine_for(model, max_batch=4), long_prompts[0])
    eng = engine_for(model, max_batch=4, prefill_chunk=64, max_stall=0, bf16_prefill=True)
    rounded = _first_logprob(eng, long_prompts[0])
    assert 0 < abs(rounded - exact) < 0.05
    sp = SamplingParams(max_tokens=8, temperature=0)
    assert run_requests(eng, [(p, sp) for p in long_prompts]) == [run_requests(eng, [(p, sp)])[0]
                                                                   for p in long_prompts]


def test_bf16_prefill_without_amx_is_refused(monkeypatch):
    monkeypatch.setattr("looplm.serve.engine.bf16_rows", lambda: 0)
    with pytest.raises(ValueError, match="AMX"):
        Engine(tiny_model("attention"), tokenizer(True), bf16_prefill=True)
