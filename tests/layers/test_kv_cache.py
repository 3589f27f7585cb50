"""``looplm.layers.kv_cache``: appending reuses a buffer, never changes an existing state, and a
second continuation of the same state gets a buffer of its own."""

from __future__ import annotations

import torch

from looplm.layers.kv_cache import append
from looplm.layers.mixers import Attention, KVState
from looplm.model import LoopConfig, LoopLM


def _kv(T: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(2, T, 1, 4, generator=g), torch.randn(2, T, 1, 4, generator=g)
    return k, v, torch.ones(2, T, dtype=torch.bool), torch.arange(T).expand(2, T) + seed


def _equal(state: KVState, parts: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip((state.k, state.v, state.key_mask, state.pos), parts))


def test_append_reuses_the_buffer_and_keeps_old_states():
    s0 = Attention(4, 1).init_state(2)
    a = _kv(3, 0)
    s1 = append(s0, *a, torch.full((2,), 3))
    b = _kv(1, 10)
    s2 = append(s1, *b, torch.full((2,), 4))
    assert s2.k.data_ptr() == s1.k.data_ptr()  # written into the same buffer, no copy
    assert _equal(s1, list(a))  # the older state still sees only its own tokens
    assert _equal(s2, [torch.cat((x, y), 1) for x, y in zip(a, b)])
    assert s2.nbytes() - s1.nbytes() == 2 * (2 * 4 * 4 + 1 + 8)  # one token per row, not the reserve
    c = _kv(1, 20)  # a second continuation of s1: its own buffer, s2 untouched
    s2b = append(s1, *c, torch.full((2,), 4))
    assert s2b.k.data_ptr() != s1.k.data_ptr()
    assert _equal(s2, [torch.cat((x, y), 1) for x, y in zip(a, b)])
    assert _equal(s2b, [torch.cat((x, y), 1) for x, y in zip(a, c)])


def test_append_grows_past_the_reserve():
    s = Attention(4, 1).init_state(2)
    parts: list[list[torch.Tensor]] = []
    for t in range(300):  # more than the first reserve of 256 slots
        kv = _kv(1, t)
        parts.append(list(kv))
        s = append(s, *kv, torch.full((2,), t + 1))
    assert s.k.shape[1] == 300
    assert _equal(s, [torch.cat(p, 1) for p in zip(*parts)])


def test_append_under_autograd_is_differentiable():
    s = Attention(4, 1).init_state(2)
    k, v, m, p = _kv(2, 0)
    k.requires_grad_()
    out = append(s, k, v, m, p, torch.full((2,), 2))
    out.k.sum().backward()
    assert torch.equal(k.grad, torch.ones_like(k))


def test_two_continuations_of_one_prefix_decode_as_separate_runs():
    torch.manual_seed(0)
    m = LoopLM(LoopConfig(vocab_size=64, d_model=32, n_heads=2, n_core=2)).eval()
    prefix, a, b = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 3)), torch.randint(0, 64, (1, 3))
    with torch.no_grad():
        shared = m(prefix, use_cache=True).state
        outs = {}
        for name, cont in (("a", a), ("b", b), ("a_again", a)):  # alternate branches of one state
            state, logits = shared, []
            for t in range(cont.shape[1]):
                out = m(cont[:, t:t + 1], state=state)
                state, logits = out.state, logits + [out.logits]
            outs[name] = torch.cat(logits, 1)
        for name, cont in (("a", a), ("b", b)):
            full = m(torch.cat((prefix, cont), 1)).logits[:, 5:]
            torch.testing.assert_close(outs[name], full, rtol=1e-5, atol=1e-5)
    assert torch.equal(outs["a"], outs["a_again"])
