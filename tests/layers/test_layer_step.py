"""``looplm.layers.layer_step``: the C++ decoding step of a fixed-state layer equals the Python
layer for every fixed-state mixer, runs only where it applies, is decided once per layer (and
again after a module swap or dtype change), and rejects bad inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from looplm.errors import ConfigError
from looplm.layers import layer_step as layer_step_module
from looplm.layers.layer import Layer
from looplm.layers.layer_step import describe, layer_step
from looplm.model import LoopConfig, LoopLM
from looplm.ops import cpp_ext
from looplm.quant.state import quantize_cache
from tests.decoding import kernel_and_python_steps
from tests.threads import torch_threads

needs_kernel = pytest.mark.skipif(not cpp_ext.available(), reason="no C++ kernel built here")


def _make_layer(mixer="gated_deltanet", ffn="dense", d=32, heads=2, conv=4, d_ffn=None, seed=0) -> Layer:
    torch.manual_seed(seed)
    c = LoopConfig(vocab_size=64, d_model=d, n_heads=heads, n_core=1, mixer=mixer, ffn=ffn,
                   conv_size=conv, d_ffn=d_ffn)
    layer = Layer(c, mixer).eval()
    with torch.no_grad():  # non-trivial norms, gates and biases
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def _state(layer: Layer, batch: int, seed: int = 1):
    """A non-zero state, as after a prefill."""
    gen = torch.Generator().manual_seed(seed)
    s = layer.mixer.init_state(batch)
    s.conv.copy_(torch.randn(s.conv.shape, generator=gen))
    s.ssm.copy_(0.3 * torch.randn(s.ssm.shape, generator=gen))
    return s


def _step_inputs():
    """A gated DeltaNet layer, a non-zero state and one token, batch 2."""
    layer = _make_layer()
    return layer, _state(layer, 2), torch.randn(2, 1, 32)


def _python(layer, x, s, positions=None):
    with cpp_ext.kernels("ops"):
        return layer(x, s, positions=positions)


def _both(layer, x, s, threads, positions=None):
    """(the kernel's step, the Python layer's step) of ``layer`` on ``threads`` torch threads."""
    with torch_threads(threads):
        with torch.no_grad():
            return layer_step(layer, x, s, None, None, positions), _python(layer, x, s, positions)


FIXED = ["gated_deltanet", "deltanet", "linear", "retention", "simple_gla", "gla"]


@needs_kernel
@pytest.mark.parametrize("mixer", FIXED)
def test_every_fixed_state_mixer_takes_the_kernel(mixer):
    layer = _make_layer(mixer)
    s = _state(layer, 2)
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        fused = layer_step(layer, x, s, None, None)
        want_h, want_s, _ = _python(layer, x, s)
    assert fused is not None
    torch.testing.assert_close(fused[0], want_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1].ssm, want_s.ssm, rtol=1e-5, atol=1e-5)


@needs_kernel
@given(mixer=st.sampled_from(FIXED), ffn=st.sampled_from(["dense", "none"]),
       heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([8, 16, 24]), conv=st.integers(1, 4),
       batch=st.integers(1, 4), d_ffn=st.sampled_from([32, 96]), threads=st.sampled_from([1, 2]))
def test_kernel_equals_python_layer(mixer, ffn, heads, head_dim, conv, batch, d_ffn, threads):
    layer = _make_layer(mixer, ffn, d=heads * head_dim, heads=heads, conv=conv, d_ffn=d_ffn)
    s = _state(layer, batch)
    x = torch.randn(batch, 1, heads * head_dim)
    fused, (want_h, want_s, _) = _both(layer, x, s, threads)
    assert fused is not None
    h, new, _ = fused
    torch.testing.assert_close(h, want_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new.conv, want_s.conv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new.ssm, want_s.ssm, rtol=1e-5, atol=1e-5)
    assert h.shape == x.shape and new.ssm.shape == s.ssm.shape


@needs_kernel
def test_state_is_not_modified_and_layer_uses_the_kernel():
    layer = _make_layer()
    s = _state(layer, 2)
    conv, ssm = s.conv.clone(), s.ssm.clone()
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        h, new, aux = layer(x, s)
        again = layer_step(layer, x, s, None, None)
    assert torch.equal(s.conv, conv) and torch.equal(s.ssm, ssm)
    assert torch.equal(h, again[0])  # Layer.forward took the kernel's path
    assert aux == {"tokens": 2}


MODELS = {name: {"mixer": name} for name in [*FIXED, "attention"]}
MODELS["attention_gqa_tied"] = {"mixer": "attention", "n_kv_heads": 1, "tie_embeddings": True}
MODELS["hybrid"] = {"mixer": "gla", "attn_every": 2}
MODELS["gated_deltanet_moe"] = {"mixer": "gated_deltanet", "ffn": "moe", "n_experts": 4, "top_k": 2,
                                "shared_expert": True}


@needs_kernel
@pytest.mark.parametrize("name", MODELS)
def test_model_decoding_equals_full_forward_and_python_steps(name):
    torch.manual_seed(0)
    m = LoopLM(LoopConfig(vocab_size=64, d_model=32, n_heads=2, n_core=2, **MODELS[name])).eval()
    ids = torch.randint(0, 64, (3, 10))
    with torch.no_grad():
        full = m(ids).logits
    for t, out, ref in kernel_and_python_steps(m, ids, 4):
        torch.testing.assert_close(out.logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-5, atol=1e-6)
        assert out.stats.keys() == ref.stats.keys()
        for key, value in ref.stats.items():  # FLOPs, reach, and an MoE's load and losses
            assert out.stats[key] == pytest.approx(value, rel=1e-5), key


@needs_kernel
def test_falls_back_where_it_does_not_apply():
    layer, s, x = _step_inputs()
    with torch.no_grad():
        assert layer_step(layer, x, s, torch.ones(2, 1, dtype=torch.bool), None) is None  # a mask
        assert layer_step(layer, torch.randn(2, 3, 32), s, None, None) is None  # a prefill
        assert layer_step(layer, x, None, None, None) is None  # training path, no state
        assert layer_step(layer, x.double(), s, None, None) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer_step(layer, x, s, None, None) is None
        with cpp_ext.kernels("ops"):
            assert layer_step(layer, x, s, None, None) is None
    assert layer_step(layer, x, s, None, None) is None  # autograd records: the Python layer
    with torch.no_grad():
        attn = _make_layer("attention")
        assert layer_step(attn, x, s, None, None) is None  # a state of the wrong kind
        holed = attn(torch.randn(2, 3, 32), attn.mixer.init_state(2),
                     mask=torch.tensor([[True, False, True], [True, True, True]]))[1]
        assert layer_step(attn, x, holed, None, None) is None  # a masked slot between seen ones
        moe_pp = Layer(LoopConfig(vocab_size=64, d_model=32, n_heads=2, mixer="gated_deltanet", ffn="moe",
                                  n_experts=2, top_k=1, zero_experts=3), "gated_deltanet").eval()
        assert layer_step(moe_pp, x, _state(moe_pp, 2), None, None) is None  # MoE++ experts
        quantised = _make_layer()
        quantised.mixer.qkv = nn.Linear(32, quantised.mixer.qkv.out_features, bias=False)  # not ours
        assert layer_step(quantised, x, _state(quantised, 2), None, None) is None


@needs_kernel
def test_decided_once_not_per_step(monkeypatch):
    """eval() decides; steps then reuse the decision instead of checking the layer's parts again."""
    layer = _make_layer()
    calls = []
    real = layer_step_module.eligible
    monkeypatch.setattr(layer_step_module, "eligible", lambda b: calls.append(1) or real(b))
    layer.eval()
    assert len(calls) == 1
    s = _state(layer, 2)
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        for _ in range(3):
            assert layer_step(layer, x, s, None, None) is not None
    assert len(calls) == 1
    assert describe(layer) == "C++ layer step: delta_layer_step"


@needs_kernel
def test_decided_again_after_a_module_swap_or_dtype_change():
    layer, s, x = _step_inputs()
    with torch.no_grad():
        assert layer_step(layer, x, s, None, None) is not None
        layer.double()  # parameters keep their identity, their dtype changes
        assert layer_step(layer, x, s, None, None) is None
        assert describe(layer) == "Python layer (C++ ops where they apply)"
        layer.float()
        assert layer_step(layer, x, s, None, None) is not None
        # a module swapped after eval()
        layer.ffn.w_in = nn.Linear(32, layer.ffn.w_in.out_features, bias=False)
        assert layer_step(layer, x, s, None, None) is None


def test_one_switch_for_every_kernel_user():
    layer, s, x = _step_inputs()
    with cpp_ext.kernels("torch"), torch.no_grad():
        assert not cpp_ext.available() and not cpp_ext.layer_steps()
        assert layer_step(layer, x, s, None, None) is None
        assert describe(layer) == "PyTorch forms (C++ kernels off or not built)"
        with cpp_ext.kernels("ops"):  # the innermost layer wins
            assert cpp_ext.available() == cpp_ext._built() and not cpp_ext.layer_steps()
            assert layer_step(layer, x, s, None, None) is None
            with cpp_ext.kernels("cpp"):
                assert cpp_ext.layer_steps() == cpp_ext._built()
    with pytest.raises(ConfigError, match="cpp, ops, torch"):
        with cpp_ext.kernels("cuda"):
            pass


def _moe_layer(mixer, experts, top_k, shared, seed=0) -> Layer:
    torch.manual_seed(seed)
    c = LoopConfig(vocab_size=64, d_model=32, n_heads=2, n_core=1, mixer=mixer, ffn="moe", d_ffn=24,
                   n_experts=experts, top_k=top_k, shared_expert=shared)
    layer = Layer(c, mixer).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


@needs_kernel
@given(mixer=st.sampled_from(["gated_deltanet", "gla"]), experts=st.integers(1, 6), top_k=st.integers(1, 3),
       shared=st.booleans(), renormalize=st.booleans(), batch=st.integers(1, 3),
       threads=st.sampled_from([1, 2]))
def test_moe_kernel_equals_python_moe_with_its_aux(mixer, experts, top_k, shared, renormalize, batch,
                                                   threads):
    top_k = min(top_k, experts)
    layer = _moe_layer(mixer, experts, top_k, shared, seed=experts * 10 + top_k)
    layer.ffn.renormalize = renormalize
    s = _state(layer, batch)
    x = torch.randn(batch, 1, 32)
    fused, (want_h, want_s, want_aux) = _both(layer, x, s, threads)
    assert fused is not None
    h, new, aux = fused
    torch.testing.assert_close(h, want_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new.ssm, want_s.ssm, rtol=1e-5, atol=1e-5)
    for key in ("load", "balance_loss", "z_loss"):
        torch.testing.assert_close(aux[key], want_aux[key].float(), rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("cached", [255, 256, 600])  # the attention pass works in layers of 256 keys
def test_attention_kernel_over_several_chunks_of_keys(cached):
    _check_attention_step(2, cached, 2, "dense", 2)


@needs_kernel
@given(kv_heads=st.sampled_from([1, 2, 4]), cached=st.integers(0, 40), batch=st.integers(1, 6),
       ffn=st.sampled_from(["dense", "none", "moe"]), threads=st.sampled_from([1, 2]))
def test_attention_kernel_equals_python_layer(kv_heads, cached, batch, ffn, threads):
    _check_attention_step(kv_heads, cached, batch, ffn, threads)


@needs_kernel
@pytest.mark.parametrize("cached", [1, 255, 600])
@pytest.mark.parametrize("kv_heads,batch", [(1, 1), (2, 3)])
def test_int8_cache_kernel_equals_python_int8_step(cached, kv_heads, batch):
    """A cache held as int8 codes with per-row scales stays on the kernel, which reads the codes
    (dequantising a layer of rows at a time) and equals the Python layer's quantised read."""
    _check_attention_step(kv_heads, cached, batch, "dense", 1, fmt="int8")


def _check_attention_step(kv_heads: int, cached: int, batch: int, ffn: str, threads: int,
                          fmt: str = "float") -> None:
    """An attention layer's kernel step after a prefill of ``cached`` tokens == the Python layer's
    (from 4 rows on its float32 projections are BLAS matrix products); ``fmt="int8"``: the cache
    held quantised (the new token's rows may round one code apart: projections in another order)."""
    torch.manual_seed(cached)
    c = LoopConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=kv_heads, n_core=1, ffn=ffn, n_experts=3,
                   top_k=2, d_ffn=24)
    layer = Layer(c, "attention").eval()
    with torch.no_grad():
        s = layer.mixer.init_state(batch)
        if cached:  # a cache from a prefill, then one decoding step at the next position
            prompt_pos = torch.arange(cached).expand(batch, cached)
            s = layer(torch.randn(batch, cached, 32), s, positions=prompt_pos)[1]
    if fmt != "float":
        s = quantize_cache(s, fmt)
    x = torch.randn(batch, 1, 32)
    pos = torch.full((batch, 1), cached)
    fused, (want_h, want_s, want_aux) = _both(layer, x, s, threads, pos)
    assert fused is not None
    h, new, aux = fused
    assert type(new) is type(want_s) is type(s)
    if fmt == "float":
        torch.testing.assert_close(h, want_h, rtol=1e-5, atol=1e-5)
        for name in ("k", "v", "key_mask", "pos", "seen"):
            torch.testing.assert_close(getattr(new, name), getattr(want_s, name), rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(h, want_h, rtol=1e-4, atol=1e-4)
        for name in ("k", "v"):  # the stored rows as they were, the new one within a code
            assert torch.equal(getattr(new, name)[:, :cached], getattr(s, name))
            assert (getattr(new, name).int() - getattr(want_s, name).int()).abs().max() <= 1
        for name in ("k_scale", "v_scale", "key_mask", "pos", "seen"):
            torch.testing.assert_close(getattr(new, name), getattr(want_s, name), rtol=1e-5, atol=1e-6)
    assert aux.keys() == {k for k in want_aux if k != "tokens"}


@needs_kernel
@given(pads=st.lists(st.integers(0, 300), min_size=1, max_size=6), kv_heads=st.sampled_from([1, 2]),
       threads=st.sampled_from([1, 2]))
def test_attention_kernel_skips_front_padding(pads, kv_heads, threads):
    """Caches of different lengths joined into one batch (unused slots at the front, as
    ``state.cat_states`` pads them; up to 300 slots, so across layers of 256 keys): the kernel's
    step equals the Python layer's masked one."""
    torch.manual_seed(len(pads))
    c = LoopConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=kv_heads, n_core=1, d_ffn=24,
                   max_seq_len=512)
    layer = Layer(c, "attention").eval()
    T = max(pads) + 3
    mask = torch.arange(T)[None] >= torch.tensor(pads)[:, None]
    with torch.no_grad():
        s = layer(torch.randn(len(pads), T, 32), layer.mixer.init_state(len(pads)), mask=mask)[1]
    fused, (want_h, want_s, _) = _both(layer, torch.randn(len(pads), 1, 32), s, threads)
    assert fused is not None
    torch.testing.assert_close(fused[0], want_h, rtol=1e-5, atol=1e-5)
    for name in ("k", "v", "key_mask", "pos", "seen"):
        torch.testing.assert_close(getattr(fused[1], name), getattr(want_s, name), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_bad_shapes_are_rejected_by_the_kernel():
    layer = _make_layer()
    s = _state(layer, 2)
    mixer = layer.mixer
    common = [mixer.qkv.weight, mixer.conv_weight, mixer.g_proj.weight, mixer.norm.weight,
              mixer.o_proj.weight, None, None, None, 1e-6, 1e-6, 1e-6]
    with pytest.raises(RuntimeError, match="layer_step: conv_state"):
        torch.ops.looplm.delta_layer_step(
            torch.randn(2, 32), s.conv[:1].contiguous(), s.ssm, layer.mixer_norm.weight, *common,
            mixer.beta_proj.weight, mixer.beta_proj.bias, mixer.a_proj.weight, mixer.A_log, mixer.dt_bias)
    with pytest.raises(RuntimeError, match="layer_step: log_gamma"):
        torch.ops.looplm.decay_layer_step(
            torch.randn(2, 32), s.conv, s.ssm, layer.mixer_norm.weight, *common, 0, torch.zeros(5), None,
            None, None, None, 1.0)
    moe = _moe_layer("gated_deltanet", 4, 2, False).ffn
    with pytest.raises(RuntimeError, match="moe_step: top_k"):
        torch.ops.looplm.moe_step(torch.randn(2, 32), torch.ones(32), 1e-6, moe.router.weight, moe.w_in,
                                  moe.w_out, None, None, 5, False)
