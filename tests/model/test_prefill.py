"""Chunked prefill: a prompt prefilled in chunks gives the logits and tokens of one forward over it;
caches preallocated for a whole generation are written in place, never copied."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from looplm.generate import (
    MIN_PREFILL_CHUNK,
    chunks_exact,
    decoding_mode,
    generate_ids,
    prefill,
    prefill_chunk,
)
from looplm.layers import kv_cache, mixers
from looplm.model import LoopConfig, LoopLM
from looplm.quant.ptq import quantize_model
from looplm.quant.state import compress_state, decompress_state

BASE = dict(vocab_size=97, d_model=32, n_heads=4, n_kv_heads=2, n_core=3, init_std=0.2)
CHUNKED = {
    "attention": dict(mixer="attention"),
    "gated_deltanet": dict(mixer="gated_deltanet", chunk_size=16),
    "hybrid": dict(mixer="gated_deltanet", attn_every=2, n_prelude=1, n_coda=1, chunk_size=16),
    "moe": dict(mixer="attention", ffn="moe", n_experts=4, top_k=2),
}
ONE_SHOT = {
    "mor_expert_choice": dict(mixer="attention", n_recursions=2, router="expert_choice"),
    "mod": dict(mixer="attention", layer_router="mod", mod_capacity=0.5),
}


def make(config: dict) -> LoopLM:
    torch.manual_seed(0)
    return LoopLM(LoopConfig(**{**BASE, **config})).eval()


def one_shot(model: LoopLM, ids: torch.Tensor, mask: torch.Tensor | None = None):
    last = torch.zeros(ids.shape, dtype=torch.bool)
    last[:, -1] = True
    return model(ids, mask=mask, use_cache=True, logits_at=last)


@pytest.mark.parametrize("name", CHUNKED)
@settings(max_examples=6, deadline=None)
@given(T=st.integers(1, 70), chunk=st.integers(1, 33))
def test_chunked_prefill_equals_one_forward(name, T, chunk):
    model = make(CHUNKED[name])
    assert chunks_exact(model)
    ids = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad(), decoding_mode(model):
        want = one_shot(model, ids)
        got = prefill(model, ids, chunk=chunk)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.state.positions, want.state.positions)
        step = ids[:, :1]  # the next step reads the chunked prefill's state as the one-shot one's
        torch.testing.assert_close(model(step, state=got.state).logits, model(step, state=want.state).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", CHUNKED)
def test_chunked_prefill_with_left_padding(name):
    model = make(CHUNKED[name])
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :23] = False  # the second row's first chunk and a half are padding
    with torch.no_grad(), decoding_mode(model):
        want = one_shot(model, ids, mask)
        got = prefill(model, ids, mask, chunk=16)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ONE_SHOT)
def test_sequence_routed_models_prefill_in_one_forward(name, monkeypatch):
    model = make(ONE_SHOT[name])
    assert not chunks_exact(model)
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda ids, **kw: calls.append(ids.shape[1]) or forward(ids, **kw))
    with torch.no_grad(), decoding_mode(model):
        prefill(model, torch.randint(0, 97, (1, 50)), chunk=8)
    assert calls == [50]


@pytest.mark.parametrize("name", [*CHUNKED, *ONE_SHOT])
def test_generation_is_unchanged_by_the_chunk(name, monkeypatch):
    model = make({**CHUNKED, **ONE_SHOT}[name])
    rows = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(2)).tolist()
    monkeypatch.setattr("looplm.generate.MIN_PREFILL_CHUNK", 1)
    monkeypatch.setattr("looplm.generate.prefill_chunk", lambda model: 10_000)
    want = generate_ids(model, rows, max_new_tokens=6)
    monkeypatch.setattr("looplm.generate.prefill_chunk", lambda model: 7)
    assert generate_ids(model, rows, max_new_tokens=6) == want


@pytest.mark.parametrize("fmt, group, chunk", [(None, None, 1024), ("bfloat16", None, 512),
                                               ("int8", None, 256), ("int8", 32, 256), ("int4", 32, 128)])
def test_the_chunk_scales_with_the_weights_bytes(fmt, group, chunk, monkeypatch):
    """Chunks of 256 tokens per stored byte of a weight (rounded down to a power of two): a long
    prompt goes through the model in forwards of that many tokens."""
    model = make(dict(mixer="attention", d_model=64, max_seq_len=2048))
    if fmt == "bfloat16":
        model.to(torch.bfloat16)
    elif fmt is not None:
        quantize_model(model, fmt, group_size=group, keep_embeddings=False, keep_head=False)
    assert prefill_chunk(model) == chunk
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda ids, **kw: calls.append(ids.shape[1]) or forward(ids, **kw))
    with torch.no_grad(), decoding_mode(model):
        prefill(model, torch.randint(0, 97, (1, chunk + 5)))
        prefill(model, torch.randint(0, 97, (1, MIN_PREFILL_CHUNK)))
    assert calls == [chunk, 5, MIN_PREFILL_CHUNK]


def test_reserved_caches_share_one_block_and_are_never_copied():
    model = make(CHUNKED["attention"])
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad(), decoding_mode(model):
        state = model.init_state(2).reserve(30 + 4)
        blocks = {s.k.untyped_storage().data_ptr() for s in state.layers.values()}
        assert len(blocks) == 1  # every layer's keys, values, masks and positions: one allocation
        out = prefill(model, ids, state=state, chunk=8)
        ptrs = {key: s.k.data_ptr() for key, s in out.state.layers.items()}
        for _ in range(4):
            out = model(out.logits.reshape(2, -1).argmax(-1)[:, None], state=out.state, use_cache=True)
        assert {key: s.k.data_ptr() for key, s in out.state.layers.items()} == ptrs
        assert all(s.k.untyped_storage().data_ptr() in blocks for s in out.state.layers.values())
        want = one_shot(model, ids)
        torch.testing.assert_close(prefill(model, ids, state=model.init_state(2).reserve(30), chunk=8).logits,
                                   want.logits, rtol=1e-4, atol=1e-4)


def test_preallocate_takes_only_empty_caches_of_one_shape():
    model = make(CHUNKED["attention"])
    states = list(model.init_state(1).layers.values())
    with pytest.raises(ValueError, match="empty caches of one type"):
        kv_cache.preallocate([states[0], make(dict(n_kv_heads=4)).init_state(1).layers["core.0.0"]], 8)
    full = kv_cache.append(states[0], *[torch.zeros(1, 1, 2, 8)] * 2, torch.ones(1, 1, dtype=torch.bool),
                           torch.zeros(1, 1, dtype=torch.long), states[0].seen + 1)
    with pytest.raises(ValueError, match="empty caches"):
        kv_cache.preallocate([full], 8)


def test_the_head_runs_only_at_the_last_chunk():
    model = make(dict(mixer="attention", tie_embeddings=False))
    calls = []
    model.head.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad(), decoding_mode(model):
        out = prefill(model, ids, chunk=8)  # chunks of 8, 8, 4
        assert calls == [2] and out.logits.shape == (2, 97)
        none = model(ids[:, :3], use_cache=True, logits_at=torch.zeros(2, 3, dtype=torch.bool))
    assert calls == [2] and none.logits.shape == (0, 97)


@pytest.mark.parametrize("state_format", [None, "int8"])
def test_a_chunk_after_a_cache_attends_by_index_as_by_position(state_format, monkeypatch):
    """A chunk's queries at the end of an unmasked cache attend without positions or a mask (float
    cache, and an int8 one read in float): the same logits and state as the position-masked path."""
    model = make(dict(mixer="attention", n_heads=4, n_kv_heads=1))
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))

    def run():
        state = model.init_state(2)
        if state_format:
            state = decompress_state(compress_state(state, state_format))
        return prefill(model, ids, state=state.reserve(40), chunk=16)

    calls = []
    ends = mixers.ends_cache
    with torch.no_grad(), decoding_mode(model):
        monkeypatch.setattr(mixers, "ends_cache", lambda *a: calls.append(1) or ends(*a))
        got = run()
        assert calls
        monkeypatch.setattr(mixers, "ends_cache", lambda *a: False)
        want = run()
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)


def test_ends_cache_only_for_queries_that_end_an_unmasked_cache_in_order():
    pos, kpos, keep = torch.arange(16, 32)[None], torch.arange(32)[None], torch.ones(1, 32, dtype=torch.bool)
    assert mixers.ends_cache(pos, kpos, keep)
    assert not mixers.ends_cache(pos[:, -1:], kpos, keep)  # one query: the decoding step's own path
    assert not mixers.ends_cache(pos, kpos, keep.index_fill(1, torch.tensor([3]), False))  # a masked slot
    assert not mixers.ends_cache(pos - 1, kpos, keep)  # not the cache's last slots
    assert not mixers.ends_cache(pos, kpos.index_fill(1, torch.tensor([2]), 40), keep)  # a slot after them
    assert not mixers.ends_cache(pos.flip(1), kpos.index_copy(1, torch.arange(16, 32), pos.flip(1)), keep)
