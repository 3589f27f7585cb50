"""Mixers: full forward == chunked prefill + step decoding; mask = tokens removed; grads; state sizes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from looplm.errors import ConfigError
from looplm.layers.mixers import MIXERS, Attention, RecurrentState, build_mixer

D_MODEL, HEADS = 16, 2
NAMES = sorted(MIXERS)
FIXED = [n for n in NAMES if n != "attention"]


def make(name, seed=0):
    torch.manual_seed(seed)
    opts = {"chunk_size": 4, "value_dim": 6}  # dk=8, dv=6
    if name == "attention":
        opts = {"n_kv_heads": 1}
    elif name.startswith("liger_"):  # linearised attention: GQA, one with a sliding window of 3
        opts = {"n_kv_heads": 1, "chunk_size": 4, "window": 3 if name == "liger_gla" else 0}
    if name == "mom":
        opts.update(memory=MIXERS["gated_deltanet"].cls, memories=3, top_k=2, shared=True)
    return build_mixer(name, D_MODEL, HEADS, **opts).eval()


def close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def close_states(a, b):
    if isinstance(a, RecurrentState):
        close(a.conv, b.conv)
        close(a.ssm, b.ssm)
    for sa, sb in zip(getattr(a, "memories", []), getattr(b, "memories", [])):
        close_states(sa, sb)


@pytest.mark.parametrize("name", NAMES)
@given(T=st.integers(1, 11), split=st.integers(0, 11), B=st.integers(1, 2))
def test_full_equals_prefill_then_decode(name, T, split, B):
    mixer = make(name)
    x = torch.randn(B, T, D_MODEL)
    with torch.no_grad():
        y_full, none = mixer(x)
        assert none is None
        y_pref, s_full = mixer(x, mixer.init_state(B))
        close(y_pref, y_full)
        split = min(split, T)
        ys, s = [], mixer.init_state(B)
        if split:
            y0, s = mixer(x[:, :split], s)
            ys.append(y0)
        for t in range(split, T):
            yt, s = mixer(x[:, t:t + 1], s)
            ys.append(yt)
        close(torch.cat(ys, 1), y_full)
        close_states(s, s_full)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=12)
@given(T=st.integers(1, 9), split=st.integers(0, 9), seed=st.integers(0, 10_000))
def test_masked_tokens_are_as_if_absent(name, T, split, seed):
    """Prefill with a mask, decode with a mask: active rows match the sequence with the
    masked tokens removed (keeping their true positions); masked rows are zero."""
    mixer = make(name)
    g = torch.Generator().manual_seed(seed)
    B, split = 2, min(split, T)
    x = torch.randn(B, T, D_MODEL, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.4
    pos = torch.arange(T).expand(B, T)
    with torch.no_grad():
        y_train, _ = mixer(x, positions=pos, mask=mask)
        ys, s = [], mixer.init_state(B)
        if split:
            y0, s = mixer(x[:, :split], s, positions=pos[:, :split], mask=mask[:, :split])
            ys.append(y0)
        for t in range(split, T):
            yt, s = mixer(x[:, t:t + 1], s, positions=pos[:, t:t + 1], mask=mask[:, t:t + 1])
            ys.append(yt)
        y = torch.cat(ys, 1)
        close(y_train, y)
        assert (y[~mask] == 0).all()
        nxt = torch.randn(B, 1, D_MODEL, generator=g)
        y_next, s_next = mixer(nxt, s, positions=torch.full((B, 1), T))
        for b in range(B):
            keep = mask[b]
            s_b = mixer.init_state(1)
            if keep.any():
                y_b, s_b = mixer(x[b:b + 1, keep], s_b, positions=pos[b:b + 1, keep])
                close(y[b:b + 1, keep], y_b)
            y_nb, s_b = mixer(nxt[b:b + 1], s_b, positions=torch.full((1, 1), T))
            close(y_next[b:b + 1], y_nb)
            if isinstance(s_b, RecurrentState):
                close(s_next.conv[b:b + 1], s_b.conv)
                close(s_next.ssm[b:b + 1], s_b.ssm)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    mixer = make(name).train()
    x = torch.randn(2, 9, D_MODEL, requires_grad=True)
    y, _ = mixer(x)
    y.square().sum().backward()
    assert x.grad.abs().sum() > 0
    for pname, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", FIXED)
def test_fixed_state_size_is_constant(name):
    mixer = make(name)
    s = mixer.init_state(2)
    size = s.nbytes()
    with torch.no_grad():
        _, s = mixer(torch.randn(2, 7, D_MODEL), s)
        if getattr(mixer, "window", 0):  # a full sliding window from here on
            size = s.nbytes()
        for _ in range(5):
            _, s = mixer(torch.randn(2, 1, D_MODEL), s)
            assert s.nbytes() == size > 0


def test_kv_cache_grows_only_with_cached_tokens():
    mixer = make("attention")
    s = mixer.init_state(1)
    base = s.nbytes()
    with torch.no_grad():
        _, s = mixer(torch.randn(1, 3, D_MODEL), s)
        per_token = (s.nbytes() - base) // 3
        assert per_token > 0
        _, s = mixer(torch.randn(1, 1, D_MODEL), s, mask=torch.tensor([[False]]))
        assert s.nbytes() == base + 3 * per_token
        _, s = mixer(torch.randn(1, 2, D_MODEL), s, mask=torch.tensor([[True, False]]))
        assert s.nbytes() == base + 4 * per_token
        assert s.seen.tolist() == [6]


def test_attention_layer_equals_explicit_gqa_softmax():
    mixer = Attention(D_MODEL, 4, n_kv_heads=2).eval()
    B, T, hd = 2, 6, D_MODEL // 4
    x = torch.randn(B, T, D_MODEL)
    from looplm.ops.attention import rope
    q, k, v = mixer.qkv(x).view(B, T, 8, hd).split((4, 2, 2), dim=2)
    pos = torch.arange(T).expand(B, T)
    q, k = rope(q, pos), rope(k, pos)
    k, v = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
    s = torch.einsum("bthd,bshd->bhts", q, k) / hd ** 0.5
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v).reshape(B, T, -1)
    close(mixer(x)[0], mixer.o_proj(o))


def test_bad_configs_and_inputs():
    with pytest.raises(ConfigError, match="unknown mixer"):
        build_mixer("mamba", 16, 2)
    with pytest.raises(ConfigError, match="divisible"):
        build_mixer("gla", 18, 4)
    with pytest.raises(ConfigError, match="n_kv_heads"):
        build_mixer("attention", 16, 4, n_kv_heads=3)
    with pytest.raises(ConfigError, match="option"):
        build_mixer("deltanet", 16, 2, colour="red")
    mixer = make("gla")
    with pytest.raises(ValueError, match="x must"):
        mixer(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="mask"):
        mixer(torch.randn(2, 3, D_MODEL), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch size"):
        mixer(torch.randn(2, 1, D_MODEL), mixer.init_state(3))
    with pytest.raises(TypeError, match="state must be a RecurrentState"):
        mixer(torch.randn(2, 1, D_MODEL), make("attention").init_state(2))


def test_attention_causal_by_position():
    """Shifted positions give the same output (RoPE is relative); permuting the tokens together
    with their positions permutes the output (causality follows positions, not indices)."""
    mixer = make("attention")
    x = torch.randn(1, 5, D_MODEL)
    with torch.no_grad():
        y = mixer(x)[0]
        torch.testing.assert_close(mixer(x, positions=torch.arange(5)[None] + 7)[0], y, atol=1e-4, rtol=1e-4)
        perm = torch.tensor([3, 0, 4, 1, 2])
        y_perm = mixer(x[:, perm], positions=perm[None])[0]
        torch.testing.assert_close(y_perm[:, perm.argsort()], y, atol=1e-4, rtol=1e-4)
