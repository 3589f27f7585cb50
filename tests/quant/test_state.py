"""State quantisation: per-row bounds, compress/decompress of real decoding states, quality."""

import pytest
import torch

from looplm.model import LoopConfig, LoopLM
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
