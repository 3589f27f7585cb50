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


@pytest.mark.parametrize("mixer,window", [("liger_gla", 0), ("liger_gla", 3), ("liger_gated_deltanet", 5)])
def test_decoding_a_linearised_model_equals_its_forward_with_bounded_state(mixer, window):
    m = gqa_model(mixer=mixer, window=window)
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


def test_bad_sources_raise_one_clear_error():
    with pytest.raises(ConfigError, match="no attention layer"):
        linearize(model(mixer="gated_deltanet"), "gla")
    with pytest.raises(ConfigError, match="hybrid"):
        linearize(model(mixer="gla", attn_every=2), "gla")
    with pytest.raises(ConfigError, match="--mixer"):
        linearize(model(), "mamba")
