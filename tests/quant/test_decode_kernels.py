"""Quantised models decode in the C++ layer step: an attention layer's step with int8 / int4
projections and FFN equals the Python layer's, and a model with every linear and the tied
embedding/head quantised decodes step by step as its Python steps and close to its full forward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from looplm.generate import generate_ids
from looplm.layers.layer import Layer
from looplm.layers.layer_step import eligible, layer_step
from looplm.model import LoopConfig, LoopLM
from looplm.ops import cpp_ext
from looplm.quant.linear import QuantEmbedding, QuantLinear
from looplm.quant.ptq import quantize_model
from tests.decoding import kernel_and_python_steps
from tests.threads import torch_threads

needs_kernel = pytest.mark.skipif(not cpp_ext.available(), reason="no C++ kernel built here")

FORMATS = [("int8", None), ("int8", 32), ("int8", 64), ("int4", 32), ("int4", 64)]


def _config(**kw) -> LoopConfig:
    base = dict(vocab_size=96, d_model=64, n_heads=4, n_kv_heads=2, n_core=2, d_ffn=128)
    return LoopConfig(**{**base, **kw})


@needs_kernel
@settings(max_examples=20, deadline=None)
@given(fmt=st.sampled_from(FORMATS), kv_heads=st.sampled_from([1, 2, 4]), cached=st.integers(0, 20),
       batch=st.integers(1, 3), threads=st.sampled_from([1, 2]))
def test_quantised_attention_layer_step_equals_python_layer(fmt, kv_heads, cached, batch, threads):
    torch.manual_seed(cached + 7 * batch)
    layer = Layer(_config(n_kv_heads=kv_heads, n_core=1), "attention").eval()
    quantize_model(layer, fmt[0], group_size=fmt[1])
    assert isinstance(layer.ffn.w_in, QuantLinear) and eligible(layer)
    with torch.no_grad():
        s = layer.mixer.init_state(batch)
        if cached:
            prompt_pos = torch.arange(cached).expand(batch, cached)
            s = layer(torch.randn(batch, cached, 64), s, positions=prompt_pos)[1]
        x, pos = torch.randn(batch, 1, 64), torch.full((batch, 1), cached)
        with torch_threads(threads):
            fused = layer_step(layer, x, s, None, None, pos)
            with cpp_ext.kernels("ops"):
                want_h, want_s, _ = layer(x, s, positions=pos)
    assert fused is not None
    torch.testing.assert_close(fused[0], want_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1].k, want_s.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1].v, want_s.v, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("fmt", FORMATS)
def test_fully_quantised_model_decodes_like_its_python_steps_and_full_forward(fmt):
    torch.manual_seed(0)
    m = LoopLM(_config()).eval()
    quantize_model(m, fmt[0], group_size=fmt[1], keep_embeddings=False, keep_head=False)
    assert isinstance(m.embed, QuantEmbedding) and m.head is None
    assert all(eligible(b) for b in m.core)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        full = m(ids).logits
    for t, out, ref in kernel_and_python_steps(m, ids, 4):
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
        # the full forward multiplies float activations: the steps differ by int8 rounding only
        err = (out.logits[:, 0] - full[:, t]).abs().max()
        assert err <= 0.03 * full[:, t].abs().max(), (t, float(err))


@needs_kernel
def test_quantised_tied_head_runs_only_at_the_last_prompt_position():
    torch.manual_seed(1)
    m = LoopLM(_config()).eval()
    quantize_model(m, "int4", group_size=32, keep_embeddings=False, keep_head=False)
    calls = []
    head = m.embed.as_head
    m.embed.as_head = lambda h: calls.append(h.shape) or head(h)
    new = generate_ids(m, [[1, 2, 3, 4, 5]], max_new_tokens=3)
    assert len(new[0]) == 3
    assert calls == [torch.Size([1, 64])] + [torch.Size([1, 1, 64])] * 2


@needs_kernel
def test_the_cached_kernel_plan_follows_module_swaps():
    """The attention step caches its checked weight arguments on the layer; quantising the layer
    afterwards (new modules, new tensors) must be seen at the next step."""
    torch.manual_seed(3)
    layer = Layer(_config(n_core=1), "attention").eval()
    s = layer.mixer.init_state(1)
    x, pos = torch.randn(1, 1, 64), torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        float_h = layer_step(layer, x, s, None, None, pos)[0]
        quantize_model(layer, "int4", group_size=32)
        quant_h = layer_step(layer, x, s, None, None, pos)[0]
        with cpp_ext.kernels("ops"):
            want = layer(x, s, positions=pos)[0]
    torch.testing.assert_close(quant_h, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(quant_h, float_h, rtol=1e-5, atol=1e-5)
