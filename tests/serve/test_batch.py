"""The engine's batch state: rows joining and leaving mid-generation decode as each does alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import looplm.model as model_module
from looplm.generate import decoding_mode
from looplm.layers.layer_step import stack_step
from looplm.layers.mixer_states import KVState
from looplm.ops import cpp_ext
from looplm.quant.state import compress_state, decompress_state
from looplm.serve.batch import BatchState
from tests.serve.util import CONFIGS, tiny_model

# a request: (prompt length, step it joins at, decoding steps it stays for)
REQUEST = st.tuples(st.integers(1, 40), st.integers(0, 8), st.integers(1, 10))


def _alone(model, prompt: torch.Tensor, tokens: list[int], int8: bool):
    """The state after ``prompt`` and the logits of each step fed ``tokens`` one at a time, alone."""
    state = model(prompt, use_cache=True).state
    if int8:
        state = decompress_state(compress_state(state, "int8"))
    first, logits, s = state, [], state
    for t in tokens:
        out = model(torch.tensor([[t]]), state=s, use_cache=True)
        logits.append(out.logits[0, -1])
        s = out.state
    return first, logits


@settings(max_examples=8, deadline=None)
@given(name=st.sampled_from(list(CONFIGS)), requests=st.lists(REQUEST, min_size=1, max_size=6),
       order=st.randoms(use_true_random=False), int8=st.booleans(), min_slots=st.sampled_from([1, 256]))
def test_rows_joining_and_leaving_decode_as_alone(name, requests, order, int8, min_slots):
    """A random schedule of joins (a prefilled one-row state added) and leaves (rows freed in any
    order, the last row moving into the freed one), with storage small enough to move and grow
    (``min_slots=1``): every row's logits at every step equal its own decoding alone."""
    int8 = int8 and name == "attention"
    model = tiny_model(name)
    gen = torch.Generator().manual_seed(len(requests))
    jobs = []
    for n, at, steps in requests:
        prompt = torch.randint(3, 259, (1, n), generator=gen)
        tokens = torch.randint(3, 259, (steps,), generator=gen).tolist()
        jobs.append((at, steps, prompt, tokens))
    batch = BatchState(len(jobs), min_slots=min_slots)
    rows: list[list] = []  # per row: [job index, steps done]
    with torch.no_grad(), decoding_mode(model):
        alone = [_alone(model, prompt, tokens, int8) for _, _, prompt, tokens in jobs]
        for t in range(max(at for at, *_ in jobs) + 1 + max(steps for _, steps, *_ in jobs)):
            for j, (at, *_) in enumerate(jobs):
                if at == t:
                    batch.add(alone[j][0])
                    rows.append([j, 0])
            if not rows:
                continue
            tokens = torch.tensor([[jobs[j][3][done]] for j, done in rows])
            batch.reserve(1)
            out = model(tokens, state=batch.state(), use_cache=True)
            batch.update(out.state)
            assert batch.nbytes() == batch.state().nbytes()  # counted from shapes, as the state's
            for i, (j, done) in enumerate(rows):
                torch.testing.assert_close(out.logits[i, -1], alone[j][1][done], rtol=1e-4, atol=1e-4)
                rows[i][1] += 1
            finished = [row for row in rows if row[1] == jobs[row[0]][1]]
            order.shuffle(finished)
            for row in finished:  # in any order: a moved row keeps its state
                i = next(i for i, r in enumerate(rows) if r is row)
                batch.remove(i)
                rows[i] = rows[-1]
                rows.pop()
            assert batch.rows == len(rows)
            assert batch.nbytes() == (batch.state().nbytes() if rows else 0)


def test_a_batch_of_attention_caches_of_different_lengths_takes_the_stack_step(monkeypatch):
    """Rows of different cache lengths in the batch state decode in the one-call stack step."""
    if not cpp_ext.available():
        pytest.skip("no C++ kernel built here")
    calls: list[bool] = []

    def spy(layers, x, states, positions):
        out = stack_step(layers, x, states, positions)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(model_module, "stack_step", spy)
    model = tiny_model("attention")
    batch = BatchState(3)
    with torch.no_grad(), decoding_mode(model):
        for n in (5, 30, 12):
            batch.add(model(torch.randint(3, 259, (1, n)), use_cache=True).state)
        calls.clear()
        for _ in range(3):
            batch.reserve(1)
            batch.update(model(torch.randint(3, 259, (3, 1)), state=batch.state(), use_cache=True).state)
        batch.remove(0)
        batch.reserve(1)
        batch.update(model(torch.randint(3, 259, (2, 1)), state=batch.state(), use_cache=True).state)
    assert calls == [True] * 4
    assert all(type(s) is not KVState or s.k.shape[1] == 34 for s in batch.state().layers.values())


def test_unused_storage_never_reaches_the_logits():
    """Storage is uninitialised: with every slot of it NaN before rows join (as recycled memory may
    hold), rows of different lengths, a leave and steps through the Python layers' masked
    attention still give each row's logits alone."""
    model = tiny_model("hybrid")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 259, (1, n), generator=gen) for n in (20, 3, 9)]
    tokens = torch.randint(3, 259, (3, 4), generator=gen)
    with torch.no_grad(), decoding_mode(model), cpp_ext.kernels("torch"):
        alone = [_alone(model, p, tokens[i].tolist(), False) for i, p in enumerate(prompts)]
        batch = BatchState(3, min_slots=8)
        batch.add(alone[0][0])
        for cache in batch._caches.values():
            for part in cache.parts:
                if part.is_floating_point():
                    part[1:] = float("nan")
                    part[:, cache.end:] = float("nan")
        batch.add(alone[1][0])
        batch.add(alone[2][0])
        rows = [0, 1, 2]
        for step in range(4):
            if step == 2:
                batch.remove(0)
                rows = [2, 1]
            batch.reserve(1)
            out = model(tokens[rows, step:step + 1], state=batch.state(), use_cache=True)
            batch.update(out.state)
            for i, j in enumerate(rows):
                torch.testing.assert_close(out.logits[i, -1], alone[j][1][step], rtol=1e-4, atol=1e-4)


def test_bad_use_is_refused():
    model = tiny_model("attention")
    batch = BatchState(1)
    with pytest.raises(RuntimeError, match="no rows"):
        batch.state()
    with pytest.raises(ValueError, match="one-row"):
        batch.add(model.init_state(2))
    batch.add(model.init_state(1))
    with pytest.raises(ValueError, match="full"):
        batch.add(model.init_state(1))
    with pytest.raises(IndexError, match="row 1"):
        batch.remove(1)
    with pytest.raises(ValueError, match="max_rows"):
        BatchState(0)
