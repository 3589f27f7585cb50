"""Step-by-step decoding equals one full forward; decoding state sizes."""

from __future__ import annotations

import pytest
import torch

from looplm.layers.mixers import MIXERS as REGISTRY
from looplm.layers.mixers import RecurrentState
from tests.model.util import model, tokens

MIXERS = list(REGISTRY)
ROUTERS = [  # (router, selection, replay the full forward's depth while decoding)
    ("none", "topk", False),
    ("expert_choice", "topk", True),
    ("expert_choice", "threshold", False),
    ("token_choice", "topk", False),
]


def mor(router: str, selection: str = "topk", **kw):
    n = 1 if router == "none" else 3
    return model(router=router, selection=selection, n_recursions=n, **kw)


def decode(m, x, depth=None, state=None):
    """Feed x one token at a time; returns (logits [B,T,V], state bytes after each step)."""
    logits, sizes = [], []
    for t in range(x.shape[1]):
        d = None if depth is None else depth[:, t : t + 1]
        out = m(x[:, t : t + 1], state=state, use_cache=True, depth=d)
        state = out.state
        logits.append(out.logits)
        sizes.append(state.nbytes())
    return torch.cat(logits, 1), sizes


@pytest.mark.parametrize("ffn", ["dense", "moe", "none"])
@pytest.mark.parametrize("router,selection,replay", ROUTERS)
@pytest.mark.parametrize("mixer", MIXERS)
def test_decode_equals_forward(mixer, router, selection, replay, ffn):
    m = mor(router, selection, mixer=mixer, ffn=ffn, n_experts=3, top_k=2)
    x = tokens()
    full = m(x)
    got, sizes = decode(m, x, full.depth if replay else None)
    torch.testing.assert_close(got, full.logits, atol=1e-5, rtol=1e-5)
    if mixer != "attention":  # fixed-state: constant from the first token on
        assert len(set(sizes)) == 1


@pytest.mark.parametrize("router,selection", [("none", "topk"), ("expert_choice", "threshold"),
                                              ("token_choice", "topk")])
@pytest.mark.parametrize("mixer", ["attention", "gated_deltanet"])
def test_prefill_then_decode(mixer, router, selection):
    m = mor(router, selection, mixer=mixer, attn_every=2)
    x = tokens(length=13)
    full = m(x).logits
    pre = m(x[:, :7], use_cache=True)
    rest, _ = decode(m, x[:, 7:], state=pre.state)
    torch.testing.assert_close(torch.cat((pre.logits, rest), 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_sharing", [False, True])
def test_attention_state_grows_only_with_cached_tokens(kv_sharing):
    """Bytes grow by (K+V) · cached tokens; with MoR each recursion caches only its active tokens."""
    m = mor("expert_choice", "threshold", kv_sharing=kv_sharing, n_prelude=0, n_coda=0)
    x = tokens(batch=1, length=10)
    state = m.init_state(1)
    per_token = 2 * 32 * 4 + 1 + 8  # k and v (d=32 floats each) + key_mask + position
    for t in range(10):
        before = state.nbytes()
        out = m(x[:, t : t + 1], state=state)
        ran = int(out.depth.item())  # recursions this token took; its keys are cached at each
        cached = min(ran, 1) if kv_sharing else ran
        assert out.state.nbytes() - before == len(m.core) * cached * per_token
        state = out.state


def test_hybrid_state_grows_only_in_attention_layers():
    m = model(mixer="deltanet", attn_every=2)  # 4 layers, 2 of them attention
    x = tokens(batch=1, length=6)
    _, sizes = decode(m, x)
    steps = {b - a for a, b in zip(sizes, sizes[1:])}
    assert steps == {2 * (2 * 32 * 4 + 1 + 8)}


def test_fixed_state_bytes_independent_of_length():
    m = mor("expert_choice", "threshold", mixer="gla")
    _, short = decode(m, tokens(length=3))
    _, long = decode(m, tokens(length=20))
    assert short[-1] == long[-1]
    assert all(isinstance(s, RecurrentState) for s in m(tokens(), use_cache=True).state.layers.values())


def test_state_is_not_modified():
    m = mor("token_choice", mixer="attention")
    x = tokens(length=6)
    pre = m(x[:, :5], use_cache=True).state
    a = m(x[:, 5:], state=pre).logits
    b = m(x[:, 5:], state=pre).logits
    assert torch.equal(a, b)
    assert int(pre.positions[0]) == 5


@pytest.mark.parametrize("mixer", ["attention", "deltanet"])
@pytest.mark.parametrize("router,selection", [("none", "topk"), ("expert_choice", "threshold"),
                                              ("token_choice", "topk")])
def test_left_padding_is_as_if_absent(mixer, router, selection):
    """A row padded on the left (mask False) gives the logits of the unpadded row."""
    m = mor(router, selection, mixer=mixer)
    x = tokens(batch=1, length=9)
    alone = m(x).logits
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), x), 1)
    mask = torch.arange(12)[None] >= 3
    out = m(padded, mask=mask, use_cache=True)
    torch.testing.assert_close(out.logits[:, 3:], alone, atol=1e-5, rtol=1e-5)
    assert int(out.state.positions[0]) == 9
    nxt = tokens(batch=1, length=1, seed=5)
    ref = m(torch.cat((x, nxt), 1)).logits[:, -1:]
    torch.testing.assert_close(m(nxt, state=out.state).logits, ref, atol=1e-5, rtol=1e-5)
