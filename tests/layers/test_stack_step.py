"""The whole stack's decoding step in one C++ call (``stack_step``) against the layers' Python steps."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import looplm.model as model_module
from looplm.layers.layer_step import stack_plan, stack_step
from looplm.layers.mixer_states import QuantKVState
from looplm.model import LoopConfig, LoopLM
from looplm.ops import cpp_ext
from looplm.quant.ptq import quantize_model
from looplm.quant.state import compress_state, decompress_state
from looplm.state import cat_states
from tests.decoding import kernel_and_python_steps
from tests.threads import torch_threads

needs_kernel = pytest.mark.skipif(not cpp_ext.available(), reason="no C++ kernel built here")


def _model(fmt: str | None, **kw) -> LoopLM:
    base = dict(vocab_size=96, d_model=64, n_heads=4, n_kv_heads=2, n_core=2, d_ffn=128)
    m = LoopLM(LoopConfig(**{**base, **kw})).eval()
    if fmt is not None:
        group = 32 if fmt == "int4" else None
        quantize_model(m, fmt, group_size=group, keep_embeddings=False, keep_head=False)
    return m


def _spy(monkeypatch) -> list[bool]:
    """Records each stack_step call's outcome (True: it ran the kernel)."""
    calls: list[bool] = []

    def spy(*args):
        out = stack_step(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(model_module, "stack_step", spy)
    return calls


@needs_kernel
@settings(max_examples=12, deadline=None)
@given(fmt=st.sampled_from([None, "int8", "int4"]), layout=st.sampled_from([(0, 2, 1, 0), (1, 1, 2, 1)]),
       kv_heads=st.sampled_from([1, 2, 4]), batch=st.integers(1, 3), prompt=st.integers(1, 9),
       threads=st.sampled_from([1, 2]))
def test_stack_step_equals_the_python_layers(fmt, layout, kv_heads, batch, prompt, threads):
    torch.manual_seed(prompt + 5 * batch)
    prelude, core, recursions, coda = layout
    m = _model(fmt, n_prelude=prelude, n_core=core, n_recursions=recursions, n_coda=coda, n_kv_heads=kv_heads)
    ids = torch.randint(0, 96, (batch, prompt + 4))
    with torch_threads(threads):
        for _, out, want in kernel_and_python_steps(m, ids, prompt):
            fused, ref = out.state, want.state
            torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-5)
            assert out.stats["flops"] == pytest.approx(want.stats["flops"])
            assert set(fused.layers) == set(ref.layers)
            for key, s in fused.layers.items():
                r = ref.layers[key]
                torch.testing.assert_close(s.k, r.k, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(s.v, r.v, rtol=1e-5, atol=1e-5)
                assert torch.equal(s.key_mask, r.key_mask) and torch.equal(s.pos, r.pos)
                assert torch.equal(s.seen, r.seen)
            assert torch.equal(fused.positions, ref.positions)


@needs_kernel
def test_stack_step_runs_on_decoding_and_leaves_older_states_intact(monkeypatch):
    calls = _spy(monkeypatch)
    torch.manual_seed(0)
    m = _model("int4")
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        base = m(ids[:, :6], use_cache=True).state
        a = m(ids[:, 6:7], state=base)
        b = m(ids[:, 7:8], state=base)  # a second continuation of the same prefix
        a_again = m(ids[:, 6:7], state=base)
        with cpp_ext.kernels("ops"):
            want_b = m(ids[:, 7:8], state=base)
    assert calls == [True, True, True, True, False]  # the prefill of 6 tokens in one row too; the last one
    # inside cpp_ext.kernels("ops")
    torch.testing.assert_close(a.logits, a_again.logits, rtol=0, atol=0)
    torch.testing.assert_close(b.logits, want_b.logits, rtol=1e-5, atol=1e-5)
    assert all(s.k.shape[1] == 6 for s in base.layers.values())


@needs_kernel
@settings(max_examples=12, deadline=None)
@given(fmt=st.sampled_from([None, "int8", "int4"]), kv_heads=st.sampled_from([1, 2, 4]),
       prompt=st.sampled_from([1, 7, 300]), tokens=st.integers(2, 6), threads=st.sampled_from([1, 2]))
def test_a_few_tokens_of_one_row_equal_the_python_layers(fmt, kv_heads, prompt, tokens, threads):
    """A forward of T > 1 tokens of one row over a cache (speculative decoding's verification) runs
    the whole stack in one call (``attn_stack_verify``), causal among the T tokens: logits, caches
    and FLOPs equal the Python layers'; the state it started from is left as it was. Quantised
    weights: both paths quantise each projection's input to int8, and their float sums (attention,
    norms) differ by ~1e-7, which can move one activation code by a step at a rounding tie: ~1e-3
    in the logits, far below what a wrong mask or cache slot gives."""
    torch.manual_seed(prompt + tokens)
    m = _model(fmt, n_kv_heads=kv_heads, max_seq_len=512)
    ids = torch.randint(0, 96, (2, prompt + tokens))
    with pytest.MonkeyPatch.context() as patch, torch.no_grad(), torch_threads(threads):
        calls = _spy(patch)
        with cpp_ext.kernels("ops"):
            base = m(ids[:1, :prompt], use_cache=True).state
        calls.clear()
        at = torch.ones(1, tokens, dtype=torch.bool)
        out = m(ids[:1, prompt:], state=base, logits_at=at)
        again = m(ids[:1, prompt:], state=base, logits_at=at)
        with cpp_ext.kernels("ops"):
            want = m(ids[:1, prompt:], state=base, logits_at=at)
    assert calls == [True, True, False]
    tol = 1e-5 if fmt is None else 1e-2
    torch.testing.assert_close(out.logits, want.logits, rtol=tol, atol=tol)
    torch.testing.assert_close(again.logits, out.logits, rtol=0, atol=0)
    assert out.stats["flops"] == pytest.approx(want.stats["flops"])
    for key, s in out.state.layers.items():
        r, b = want.state.layers[key], base.layers[key]
        torch.testing.assert_close(s.k, r.k, rtol=tol, atol=tol)
        torch.testing.assert_close(s.v, r.v, rtol=tol, atol=tol)
        assert torch.equal(s.key_mask, r.key_mask) and torch.equal(s.pos, r.pos)
        assert torch.equal(s.seen, r.seen) and b.k.shape[1] == prompt
    assert torch.equal(out.state.positions, want.state.positions)


@needs_kernel
@settings(max_examples=10, deadline=None)
@given(fmt=st.sampled_from([None, "int8"]), lengths=st.lists(st.integers(1, 140), min_size=2, max_size=4),
       cache=st.sampled_from(["float", "int8"]), threads=st.sampled_from([1, 2]))
def test_caches_of_different_lengths_take_the_stack_step(fmt, lengths, cache, threads):
    """Rows whose caches have different lengths, joined with unused slots in front
    (``cat_states``), decode in the one-call step, each row's logits and new cache slot equal to
    its own step alone (up to 140 slots: across the kernel's 64-key chunks)."""
    torch.manual_seed(len(lengths) + sum(lengths))
    m = _model(fmt)
    prompts = [torch.randint(0, 96, (1, n)) for n in lengths]
    nxt = torch.randint(0, 96, (len(lengths), 1))
    with torch.no_grad(), torch_threads(threads), pytest.MonkeyPatch.context() as patch:
        calls = _spy(patch)
        alone = [m(p, use_cache=True).state for p in prompts]
        if cache == "int8":
            alone = [decompress_state(compress_state(s, "int8")) for s in alone]
        out = m(nxt, state=cat_states(alone))
        assert calls[0]
        for i, s in enumerate(alone):
            want = m(nxt[i:i + 1], state=s)
            torch.testing.assert_close(out.logits[i:i + 1], want.logits, rtol=1e-4, atol=1e-4)
            for key, got in out.state.layers.items():
                ref = want.state.layers[key]
                torch.testing.assert_close(got.k[i, -1].float(), ref.k[0, -1].float(), rtol=1e-4, atol=1.01)
                assert bool(got.key_mask[i, -1]) and int(got.pos[i, -1]) == lengths[i]
        calls.clear()
        m(nxt, state=out.state)  # the step's states carry their layout on
        assert calls == [True]


@needs_kernel
def test_masked_caches_and_non_attention_stacks_fall_back(monkeypatch):
    calls = _spy(monkeypatch)
    torch.manual_seed(1)
    m = _model(None)
    ids = torch.randint(0, 96, (2, 6))
    mask = torch.tensor([[True, False, True, True, False, True], [True] * 6])
    with torch.no_grad():
        state = m(ids, mask=mask, use_cache=True).state  # row 0's masked slots lie between seen ones
        out = m(ids[:, :1], state=state)
        with cpp_ext.kernels("ops"):
            want = m(ids[:, :1], state=state)
    assert calls == [False, False]  # the second inside cpp_ext.kernels("ops")
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-5)
    calls.clear()
    delta = _model(None, mixer="gated_deltanet")
    with torch.no_grad():
        delta(ids[:, :1], state=delta(ids, use_cache=True).state)
    assert calls == [False]


@needs_kernel
@pytest.mark.parametrize("kv_heads,batch,prompt", [(1, 1, 3), (2, 2, 300)])  # 300: over 256-key blocks
def test_int8_caches_take_the_stack_step_and_equal_python_int8_steps(monkeypatch, kv_heads, batch, prompt):
    """Caches held as int8 (QuantKVState) stay in the one-call step: it quantises each new key and
    value row as ``kv_quant.quantize_rows`` does (a code may differ by one where the projections'
    sums round differently) and reads the codes; the logits equal the Python int8 steps'."""
    calls = _spy(monkeypatch)
    torch.manual_seed(prompt)
    m = _model(None, n_kv_heads=kv_heads, max_seq_len=512)
    ids = torch.randint(0, 96, (batch, prompt + 4))
    start = decompress_state(compress_state(m.init_state(batch)))
    for _, out, want in kernel_and_python_steps(m, ids, prompt, start):
        torch.testing.assert_close(out.logits, want.logits, rtol=1e-4, atol=1e-4)
        for key, s in out.state.layers.items():
            r = want.state.layers[key]
            assert type(s) is type(r) is QuantKVState and s.k.dtype == torch.int8
            assert (s.k.int() - r.k.int()).abs().max() <= 1 and (s.v.int() - r.v.int()).abs().max() <= 1
            torch.testing.assert_close(s.k_scale, r.k_scale, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(s.v_scale, r.v_scale, rtol=1e-5, atol=1e-7)
            assert torch.equal(s.key_mask, r.key_mask) and torch.equal(s.pos, r.pos)
            assert torch.equal(s.seen, r.seen)
    assert calls.count(True) == 4  # each of the 4 steps ran the kernel (the Python int8 steps: not)


@needs_kernel
@pytest.mark.parametrize("kw", [{}, {"n_prelude": 1, "n_recursions": 2, "n_coda": 1}, {"layer_router": "mod"},
                                {"mixer": "gated_deltanet"}, {"ffn": "moe", "n_experts": 4, "top_k": 2},
                                {"ffn": "moe", "n_experts": 4, "top_k": 2, "moe_router": "recurrent"},
                                {"n_recursions": 2, "router": "expert_choice"}])
def test_what_info_reports_is_what_a_decoding_step_runs(kw, monkeypatch):
    """``LoopLM.stack_layers`` + ``stack_plan`` (what ``looplm info`` prints) say the whole-stack
    step runs exactly when a decoding step of one token per row on unmasked caches calls it."""
    calls = _spy(monkeypatch)
    torch.manual_seed(0)
    m = _model(None, **kw)
    stack = m.stack_layers()
    predicted = stack is not None and stack_plan(stack[1]) is not None
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        m(ids[:, -1:], state=m(ids[:, :5], use_cache=True).state)
    assert any(calls) == predicted
    assert predicted == (not kw or "n_prelude" in kw)  # attention with dense FFNs, no routing
