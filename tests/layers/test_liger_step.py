"""The C++ decoding step of a linearised (Liger GLA, sliding window) layer equals the Python
layer: rows of different lengths, windows shorter and longer than the context, grouped heads,
with or without a dense FFN, int4 projections; it runs only where it applies. Models of such layers
(alone or with attention layers) take the whole-stack step, with the same outputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from looplm import model as model_module
from looplm.layers.layer_step import describe, layer_step, stack_step
from looplm.layers.liger import trim_window
from looplm.model import LoopConfig, LoopLM
from looplm.ops import cpp_ext
from looplm.quant.ptq import quantize_model
from looplm.state import cat_states
from tests.decoding import kernel_and_python_steps
from tests.threads import torch_threads

needs_kernel = pytest.mark.skipif(not cpp_ext.available(), reason="no C++ kernel built here")


def _model(window: int, kv_heads: int = 1, ffn: str = "dense", seed: int = 0, **over) -> LoopLM:
    torch.manual_seed(seed)
    config = LoopConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=kv_heads, n_core=2,
                        mixer="liger_gla", window=window, ffn=ffn, **over)
    return LoopLM(config).eval()


@needs_kernel
@given(window=st.integers(1, 12), kv_heads=st.sampled_from([1, 2, 4]), ffn=st.sampled_from(["dense", "none"]),
       lengths=st.lists(st.integers(1, 20), min_size=1, max_size=4), threads=st.sampled_from([1, 2]),
       norm=st.booleans())
@settings(max_examples=25, deadline=None)
def test_kernel_steps_equal_python_steps(window, kv_heads, ffn, lengths, threads, norm):
    """Rows prefilled alone (different lengths: their window caches differ) and joined, then decoded
    with the C++ step and with the Python layer: the same logits and states (plain or normalised
    read-out)."""
    model = _model(window, kv_heads, ffn, liger_norm=norm)
    for out, ref in _joined_steps(model, window, lengths, threads):
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
        for key, s in ref.state.layers.items():
            mine = out.state.layers[key]
            assert mine.window.k.shape[1] < 2 * window + 1  # trimmed once twice the window
            _assert_same_linearised_state(mine, s, window)


def _joined_steps(model, window: int, lengths: list[int], threads: int):
    """Rows of ``lengths`` tokens prefilled alone and joined, then ``2 + 2 window`` tokens decoded:
    yields (the kernel step's output, the Python step's output) on ``threads`` threads."""
    gen = torch.Generator().manual_seed(len(lengths))
    rows = [torch.randint(0, 64, (1, n), generator=gen) for n in lengths]
    with torch.no_grad():
        state = cat_states([model(r, state=model.init_state(1), use_cache=True).state for r in rows])
    ids = torch.randint(0, 64, (len(rows), 2 + 2 * window), generator=gen)
    with torch_threads(threads):
        for _, out, ref in kernel_and_python_steps(model, ids, 1, state):
            yield out, ref


def _assert_same_linearised_state(mine, want, window: int) -> None:
    """The same recurrent state, and the same keys inside the window (the Python layer's cache)
    in the kernel's (which may hold up to twice the window)."""
    torch.testing.assert_close(mine.ssm, want.ssm, rtol=1e-5, atol=1e-6)
    held = trim_window(mine.window, window)
    assert torch.equal(held.pos, want.window.pos) and torch.equal(held.key_mask, want.window.key_mask)
    torch.testing.assert_close(held.k, want.window.k, rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("norm", [False, True])
def test_steps_equal_the_full_forward_and_take_the_kernel(norm):
    model = _model(window=3, kv_heads=2, liger_norm=norm)
    layer = model.core[0]
    assert describe(layer) == "C++ layer step: liger_gla_step + attn_step_out"
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        state = model(ids[:, :5], use_cache=True).state
        x = torch.randn(2, 1, 32)
        assert layer_step(layer, x, state.layers[next(iter(state.layers))], None, None) is not None
    for t, out, _ in kernel_and_python_steps(model, ids, 5):
        torch.testing.assert_close(out.logits[:, 0], full[:, t], rtol=1e-4, atol=1e-5)


@needs_kernel
def test_int4_projections_take_the_kernel_and_equal_python():
    model = _model(window=4, kv_heads=1)
    quantize_model(model, "int4", group_size=32)
    assert "liger_gla_step" in describe(model.core[0])
    ids = torch.randint(0, 64, (2, 10))
    for _, out, ref in kernel_and_python_steps(model, ids, 4):
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_runs_only_where_it_applies():
    """No window (no cache for attn_step_out), the gated delta rule's recurrence, a mask and the
    exact-softmax test hook run the Python layer."""
    for model in (_model(window=0), LoopLM(LoopConfig(vocab_size=64, d_model=32, n_heads=4, n_core=1,
                                                      mixer="liger_gated_deltanet", window=3)).eval()):
        assert describe(model.core[0]) == "Python layer (C++ ops where they apply)"
    model = _model(window=3)
    layer = model.core[0]
    s = layer.mixer.init_state(2)
    with torch.no_grad():
        assert layer_step(layer, torch.randn(2, 1, 32), s, torch.ones(2, 1, dtype=torch.bool), None) is None
        layer.mixer.exact_softmax = True  # the test hook: the Python layer refuses a state
        assert layer_step(layer, torch.randn(2, 1, 32), s, None, None) is None


@needs_kernel
def test_bad_shapes_are_rejected_by_the_kernel():
    rope, pos = torch.ones(4), torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="liger_gla_step"):
        torch.ops.looplm.liger_gla_step(torch.zeros(1, 5, 8), torch.zeros(1, 4, 8, 8), 4, 1, 16.0, rope, pos)
    with pytest.raises(RuntimeError, match="liger_gla_step"):
        torch.ops.looplm.liger_gla_step(torch.zeros(1, 6, 8), torch.zeros(1, 4, 8, 7), 4, 1, 16.0, rope, pos)
    with pytest.raises(RuntimeError, match="liger_gla_step"):  # D + 1 is the normalised state, D + 2 nothing
        torch.ops.looplm.liger_gla_step(torch.zeros(1, 6, 8), torch.zeros(1, 4, 8, 10), 4, 1, 16.0, rope, pos)


def _spy(monkeypatch) -> list[bool]:
    """Records the outcome of each stack_step call of one token per row made with the layer steps on
    (True: it ran the kernel; the Python reference steps run with them off, prompts of several
    tokens are not decoding steps)."""
    calls: list[bool] = []

    def spy(*args):
        out = stack_step(*args)
        if cpp_ext.layer_steps() and args[1].shape[1] == 1:
            calls.append(out is not None)
        return out

    monkeypatch.setattr(model_module, "stack_step", spy)
    return calls


@needs_kernel
@pytest.mark.parametrize("attn_every", [0, 2])
@given(window=st.integers(1, 8), lengths=st.lists(st.integers(1, 16), min_size=1, max_size=3),
       threads=st.sampled_from([1, 2]), norm=st.booleans())
@settings(max_examples=12, deadline=None)
def test_whole_stack_step_equals_python_steps(attn_every, window, lengths, threads, norm):
    """A linearised model (attn_every=2: every second layer attention) decodes in one call per token:
    the same logits, recurrent states, keys inside the windows and FLOPs as the Python layers."""
    with pytest.MonkeyPatch.context() as patch:  # hypothesis reruns the body: a patch per run
        calls = _spy(patch)
        model = _model(window, kv_heads=2, attn_every=attn_every, liger_norm=norm)
        for out, ref in _joined_steps(model, window, lengths, threads):
            torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
            assert out.stats["flops"] == pytest.approx(ref.stats["flops"], rel=1e-6)
            for key, s in ref.state.layers.items():
                mine = out.state.layers[key]
                if hasattr(s, "ssm"):
                    _assert_same_linearised_state(mine, s, window)
                else:  # an attention layer's cache
                    torch.testing.assert_close(mine.k, s.k, rtol=1e-5, atol=1e-6)
        assert calls and all(calls)  # every kernel step was the whole stack's


@needs_kernel
@pytest.mark.parametrize("norm", [False, True])
def test_whole_stack_steps_equal_the_full_forward(monkeypatch, norm):
    calls = _spy(monkeypatch)
    model = _model(window=3, kv_heads=2, attn_every=2, liger_norm=norm)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
    for t, out, _ in kernel_and_python_steps(model, ids, 5):
        torch.testing.assert_close(out.logits[:, 0], full[:, t], rtol=1e-4, atol=1e-5)
    assert calls and all(calls)


@needs_kernel
def test_exact_softmax_hook_is_not_stepped_by_the_kernels():
    """The test hook puts exact softmax in place of the recurrence on the training path only: a
    decoding step with it set is refused (by the Python layer), never computed by the kernels."""
    model = _model(window=3)
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        state = model(ids, use_cache=True).state
        for layer in model.core:
            layer.mixer.exact_softmax = True
        with pytest.raises(ValueError, match="exact_softmax"):
            model(ids[:, -1:], state=state)
