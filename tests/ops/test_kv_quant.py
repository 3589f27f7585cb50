"""Quantised rows and attention over a quantised cache against the float attention."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from looplm.ops.attention import attention
from looplm.ops.kv_quant import code_dtype, dequantize_rows, quantize_rows, quantized_attention


@given(B=st.integers(1, 2), T=st.integers(1, 7), S=st.integers(0, 13), hkv=st.sampled_from([1, 2]),
       rep=st.sampled_from([1, 3]), key_chunk=st.integers(1, 6), query_chunk=st.integers(1, 4),
       fmt=st.sampled_from(["int8", "fp8_e4m3"]), seed=st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_chunked_read_equals_float_attention_of_the_dequantised_cache(B, T, S, hkv, rep, key_chunk,
                                                                       query_chunk, fmt, seed):
    g = torch.Generator().manual_seed(seed)
    H, D = hkv * rep, 8
    q = torch.randn(B, T, H, D, generator=g)
    (k, ks), (v, vs) = (quantize_rows(torch.randn(B, S, hkv, D, generator=g) * 3, code_dtype(fmt))
                        for _ in range(2))
    q_pos = torch.randint(0, 12, (B, T), generator=g)
    k_pos = torch.randint(0, 12, (B, S), generator=g)
    key_mask = torch.rand(B, S, generator=g) < 0.8
    got = quantized_attention(q, k, ks, v, vs, q_pos=q_pos, k_pos=k_pos, key_mask=key_mask,
                              key_chunk=key_chunk, query_chunk=query_chunk)
    ref = attention(q, dequantize_rows(k, ks), dequantize_rows(v, vs), q_pos=q_pos, k_pos=k_pos,
                    key_mask=key_mask)
    assert got.shape == (B, T, H, D)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_rows_are_int8_codes_within_half_a_step():
    x = torch.randn(2, 5, 3, 16) * torch.logspace(-3, 3, 16)
    codes, scale = quantize_rows(x, torch.int8)
    assert codes.dtype == torch.int8 and scale.shape == (2, 5, 3, 1) and scale.dtype == torch.float32
    assert ((dequantize_rows(codes, scale) - x).abs() <= scale / 2 * (1 + 1e-5)).all()


def test_bad_cache_shapes_are_one_clear_error():
    q = torch.randn(1, 1, 2, 8)
    k, ks = quantize_rows(torch.randn(1, 4, 1, 8), torch.int8)
    pos = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="k_scale, v_scale"):
        quantized_attention(q, k, ks[..., 0], k, ks, q_pos=pos[:, :1], k_pos=pos, key_mask=pos.bool())
    with pytest.raises(ValueError, match="state format"):
        code_dtype("int4")
