"""``looplm.layers.kv_cache``: appending reuses a buffer, never changes an existing state, and a
second continuation of the same state gets a buffer of its own."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from looplm.layers.kv_cache import append, append_rows
from looplm.layers.mixer_states import QuantKVState
from looplm.layers.mixers import Attention, KVState
from looplm.model import LoopConfig, LoopLM
from looplm.ops.kv_quant import quantize_rows
from looplm.quant.state import quantize_cache


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


class _Allocations(TorchDispatchMode):
    """Records the bytes of every tensor an op returns that shares no storage with its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {a.untyped_storage().data_ptr() for a in pytree.tree_leaves((args, kwargs))
                 if isinstance(a, torch.Tensor)}
        self.sizes += [t.numel() * t.element_size() for t in pytree.tree_leaves(out)
                       if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given]
        return out


def test_appending_a_token_to_a_quantised_cache_touches_only_its_rows():
    s = quantize_cache(Attention(16, 2).init_state(2))  # 2 heads of 8
    g = torch.Generator().manual_seed(0)
    m, p = torch.ones(2, 200, dtype=torch.bool), torch.arange(200).expand(2, 200)
    s = append_rows(s, torch.randn(2, 200, 2, 8, generator=g), torch.randn(2, 200, 2, 8, generator=g), m, p,
                    torch.full((2,), 200))
    stored = [t.clone() for t in (s.k, s.v, s.k_scale, s.v_scale)]
    assert s._buffer.capacity > s.k.shape[1]  # room for the next token: no growth in this step
    new = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    with _Allocations() as spy:
        s2 = append_rows(s, *new, torch.ones(2, 1, dtype=torch.bool), torch.full((2, 1), 200),
                         torch.full((2,), 201))
    assert isinstance(s2, QuantKVState) and s2.k.dtype == torch.int8 and s2.k.shape[1] == 201
    assert s2.k.data_ptr() == s.k.data_ptr() and s2.k_scale.data_ptr() == s.k_scale.data_ptr()
    for old, now in zip(stored, (s2.k, s2.v, s2.k_scale, s2.v_scale)):
        assert torch.equal(now[:, :200], old)  # the stored rows are neither copied nor re-quantised
    codes, scale = quantize_rows(new[0], torch.int8)
    assert torch.equal(s2.k[:, 200:], codes) and torch.equal(s2.k_scale[:, 200:], scale)
    one_token = 2 * 2 * 8 * 4  # one token's float keys, all rows and heads
    assert max(spy.sizes) <= one_token  # nothing of the size of the stored context is made
