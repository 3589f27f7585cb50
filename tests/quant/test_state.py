"""State quantisation: per-row bounds, compress/decompress of real decoding states, quality."""

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from looplm.layers.mixer_states import QuantKVState
from looplm.model import LoopConfig, LoopLM
from looplm.ops import cpp_ext, kv_quant
from looplm.quant.state import (
    compress_state,
    decompress_state,
    dequantize_rows,
    quantize_rows,
    stepwise_loss,
)


def test_int8_rows_within_half_step_and_fp8_rows_relative():
    x = torch.randn(3, 4, 16, 32) * torch.logspace(-2, 2, 32)
    t = quantize_rows(x, "int8")
    assert t.q.dtype == torch.int8 and t.scale.shape == (3, 4, 16, 1)
    assert ((dequantize_rows(t) - x).abs() <= t.scale / 2 * (1 + 1e-5)).all()
    f = quantize_rows(x, "fp8_e4m3")
    err = (dequantize_rows(f) - x).abs()
    assert (err <= torch.maximum(x.abs() * 2.0**-4, f.scale * 2.0**-10) * (1 + 1e-5)).all()
    again = quantize_rows(dequantize_rows(t), "int8")  # stored rows re-quantise to the same codes
    assert torch.equal(again.q, t.q)
    with pytest.raises(ValueError, match="state format"):
        quantize_rows(x, "int4")


def model(mixer: str) -> LoopLM:
    torch.manual_seed(0)
    return LoopLM(LoopConfig(vocab_size=64, d_model=64, n_heads=2, n_core=2, mixer=mixer)).eval()


@pytest.mark.parametrize("mixer", ["gla", "attention"])
def test_compressed_state_is_smaller_and_decodes_close_to_float(mixer):
    m = model(mixer)
    ids = torch.randint(0, 64, (2, 12))
    out = m(ids[:, :8], use_cache=True)
    q = compress_state(out.state, "int8")
    assert q.nbytes() < 0.4 * out.state.nbytes()
    back = decompress_state(q)
    assert set(back.layers) == set(out.state.layers)
    step_f = m(ids[:, 8:9], state=out.state).logits
    step_q = m(ids[:, 8:9], state=back).logits
    assert (step_q - step_f).abs().max() < 0.05 * step_f.abs().max()
    assert not torch.equal(step_q, step_f)


def test_stepwise_loss_with_int8_state_is_close_to_float():
    m = model("gated_deltanet")
    ids = torch.randint(0, 64, (2, 10))
    (lf, bf), (lq, bq) = stepwise_loss(m, ids), stepwise_loss(m, ids, "int8")
    full = m(ids[:, :-1], ids[:, 1:]).loss.item()
    assert lf == pytest.approx(full, rel=1e-4)  # stepwise decoding reproduces the parallel loss
    assert abs(lq - lf) < 0.01 * lf and bq < 0.4 * bf


def quantised_start(m: LoopLM, rows: int, fmt: str = "int8"):
    """An empty decoding state whose attention caches are held quantised from the first token."""
    return decompress_state(compress_state(m.init_state(rows), fmt))


@pytest.mark.parametrize("cfg", [dict(mixer="attention"), dict(mixer="gated_deltanet", attn_every=2)])
def test_int8_cache_steps_equal_one_forward_and_stay_within_int8_of_float(cfg):
    torch.manual_seed(0)
    m = LoopLM(LoopConfig(vocab_size=64, d_model=64, n_heads=2, n_core=2, **cfg)).eval()
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        full = m(ids, state=quantised_start(m, 2))
        state, steps = quantised_start(m, 2), []
        for t in range(ids.shape[1]):
            out = m(ids[:, t:t + 1], state=state)
            steps.append(out.logits)
            state = out.state
        ref = m(ids).logits
    # a token's rows are quantised alone, so the cache holds the same codes however tokens came
    torch.testing.assert_close(torch.cat(steps, 1), full.logits, atol=1e-4, rtol=1e-4)
    # int8 tolerance: rows within half a step of 1/127 of their max; logits move < 2% of their range
    assert (full.logits - ref).abs().max() < 0.02 * ref.abs().max()
    caches = [s for s in state.layers.values() if isinstance(s, QuantKVState)]
    assert caches
    for s in caches:
        assert s.k.dtype == s.v.dtype == torch.int8 and s.k.shape[1] == ids.shape[1]
        assert s.k_scale.dtype == torch.float32 and s.k_scale.shape == (*s.k.shape[:3], 1)


class LargestFloat(TorchDispatchMode):
    """Records the largest floating tensor any op allocates while active (views, e.g. a weight's
    transpose, allocate nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {a.untyped_storage().data_ptr() for a in pytree.tree_leaves((args, kwargs))
                 if isinstance(a, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.is_floating_point()
                    and t.untyped_storage().data_ptr() not in given):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("kernels", ["cpp", "torch"])
def test_an_int8_decoding_step_never_allocates_a_float_cache(monkeypatch, kernels):
    """With the C++ steps (which dequantise 256 rows at a time into a buffer of their own, out of
    this spy's sight) and with PyTorch's chunked read alike."""
    monkeypatch.setattr(kv_quant, "KEY_CHUNK", 64)
    torch.manual_seed(0)
    m = LoopLM(LoopConfig(vocab_size=64, d_model=64, n_heads=2, n_core=2, max_seq_len=1024)).eval()
    S = 768
    with torch.no_grad():
        state = quantised_start(m, 1)
        for _ in range(0, S, 256):
            state = m(torch.randint(0, 64, (1, 256)), state=state).state
        cache = state.layers["core.0.0"]
        float_cache = cache.k.numel() * 4  # the float keys of one layer
        with cpp_ext.kernels(kernels), LargestFloat() as spy:
            m(torch.randint(0, 64, (1, 1)), state=state)
    assert isinstance(cache, QuantKVState) and cache.k.shape[1] == S
    assert spy.largest <= float_cache * 64 / S * 1.5  # one chunk of keys, not the cache
