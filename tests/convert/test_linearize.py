"""Linearisation (Liger): the mapped weights are the attention's, the exact-softmax hook gives the
original model back, decoding a linearised model equals its forward, bad sources raise."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from looplm.convert.linearize import linearize
from looplm.errors import ConfigError
from looplm.layers.liger import LinearizedAttention
from tests.model.util import model, tokens


def gqa_model(**kw):
    return model(n_heads=4, n_kv_heads=2, **kw)


def exact(m, on=True):
    for mod in m.modules():
        if isinstance(mod, LinearizedAttention):
            mod.exact_softmax = on


@settings(max_examples=8, deadline=None)
@given(recurrence=st.sampled_from(["gla", "gated_deltanet"]), keep=st.sampled_from([0, 2, 3]),
       window=st.sampled_from([0, 12]))
def test_exact_softmax_hook_reproduces_the_original_logits(recurrence, keep, window):
    """With the recurrence replaced by causal softmax (and a window covering the sequence, whose
    average with it is then the same attention), the linearised model is the original one."""
    src = gqa_model()
    lin = linearize(src, recurrence, keep_attention_every=keep, window=window).eval()
    x = tokens(length=12)
    exact(lin)
    torch.testing.assert_close(lin(x).logits, src(x).logits, atol=1e-5, rtol=1e-5)
    exact(lin, False)  # the recurrence itself is a different function
    assert not torch.allclose(lin(x).logits, src(x).logits, atol=1e-3)


def test_mapped_weights_are_the_originals_and_nothing_is_added():
    src = gqa_model()
    lin = linearize(src, "gla", keep_attention_every=2, window=4)
    a, b = src.state_dict(), lin.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    kinds = [type(layer.mixer).__name__ for layer in (*lin.prelude, *lin.core, *lin.coda)]
    assert kinds == ["LigerGLA", "Attention", "LigerGLA", "Attention"]
    assert lin.config.window == 4 and lin.core[0].mixer.n_kv_heads == 2


@pytest.mark.parametrize("mixer,window,norm", [("liger_gla", 0, False), ("liger_gla", 3, False),
                                             ("liger_gla", 0, True), ("liger_gla", 3, True),
                                             ("liger_gated_deltanet", 5, False)])
def test_decoding_a_linearised_model_equals_its_forward_with_bounded_state(mixer, window, norm):
    m = gqa_model(mixer=mixer, window=window, liger_norm=norm)
    x = tokens(length=12)
    full = m(x).logits
    state, steps, sizes = None, [], []
    for t in range(x.shape[1]):
        out = m(x[:, t:t + 1], state=state, use_cache=True)
        state = out.state
        steps.append(out.logits)
        sizes.append(state.nbytes())
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert len(set(sizes[window:])) == 1  # fixed once the window is full


def test_linearize_normalises_gla_unless_asked_not_to():
    src = gqa_model()
    assert linearize(src, "gla").config.liger_norm
    assert not linearize(src, "gla", normalize=False).config.liger_norm
    assert not linearize(src, "gated_deltanet").config.liger_norm  # L2-normalised keys: bounded already
    with pytest.raises(ConfigError, match="liger_norm"):
        gqa_model(mixer="liger_gated_deltanet", liger_norm=True)


@settings(max_examples=10, deadline=None)
@given(length=st.integers(1, 300), seed=st.integers(0, 100))
def test_the_normalised_read_out_is_a_weighted_mean_of_the_values(length, seed):
    """q S / q z weighs the values with positive weights summing to 1: the same value at every
    position is read back exactly at every position and any context length, and outputs stay inside
    the values' range; the unnormalised read-out q S grows with the context."""
    torch.manual_seed(seed)
    layer = LinearizedAttention(16, 2, head_dim=8, normalize=True)
    plain = LinearizedAttention(16, 2, head_dim=8)
    q = torch.randn(1, length, 2, 8)
    k = 3 * torch.randn(1, length, 2, 8)
    v = torch.randn(8).expand(1, length, 2, 8)
    o, _ = layer._recur(q, k, v, None, None, False)
    torch.testing.assert_close(o, v, rtol=1e-4, atol=1e-5)
    w = torch.randn(1, length, 2, 8)
    o, _ = layer._recur(q, k, w, None, None, False)
    assert bool((o.amax(1) <= w.amax(1) + 1e-4).all()) and bool((o.amin(1) >= w.amin(1) - 1e-4).all())
    ones = torch.ones(1, length, 2, 8)
    grown, _ = plain._recur(q, 4 * torch.ones(1, length, 2, 8), ones, None, None, False)
    assert grown[0, -1].mean() >= min(length, 50) * 0.9 / 8  # keys with no decay: the sum keeps growing


def test_bad_sources_raise_one_clear_error():
    with pytest.raises(ConfigError, match="no attention layer"):
        linearize(model(mixer="gated_deltanet"), "gla")
    with pytest.raises(ConfigError, match="hybrid"):
        linearize(model(mixer="gla", attn_every=2), "gla")
    with pytest.raises(ConfigError, match="--mixer"):
        linearize(model(), "mamba")
