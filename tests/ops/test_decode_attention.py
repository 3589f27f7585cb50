"""The C++ decoding attention (``attn_step_out``'s split-K ``attend``) against softmax attention in torch,
for float32 and int8 caches, head dimensions on its AVX-512 chunk kernel (multiples of 64) and off it,
query groups of 1 to 8 heads per key head, and caches padded at the front."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from looplm.ops import cpp_ext
from looplm.ops.kv_quant import quantize_rows
from tests.threads import torch_threads

needs_kernel = pytest.mark.skipif(not cpp_ext.available(), reason="no C++ kernel built here")


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """q [B, H, D], k, v [B, S, Hkv, D] float -> [B, H, D]: row b attends to slots starts[b]: only."""
    B, H, D = q.shape
    group = H // k.shape[2]
    out = torch.empty_like(q)
    for b in range(B):
        kb = k[b, starts[b]:].double().repeat_interleave(group, 1)  # [S', H, D]
        vb = v[b, starts[b]:].double().repeat_interleave(group, 1)
        w = torch.einsum("hd,shd->hs", q[b].double(), kb) / math.sqrt(D)
        out[b] = torch.einsum("hs,shd->hd", w.softmax(-1), vb).float()
    return out


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(D=st.sampled_from([16, 64, 128]), kv_heads=st.sampled_from([1, 2, 3]),
       group=st.sampled_from([1, 2, 3, 4, 5, 8]), S=st.sampled_from([1, 3, 4, 17, 63, 64, 65, 130, 300]),
       batch=st.integers(1, 2), int8=st.booleans(),
       pad=st.integers(0, 70), threads=st.sampled_from([1, 2]))
def test_decoding_attention_equals_softmax_attention(D, kv_heads, group, S, batch, int8, pad, threads):
    torch.manual_seed(D + S + 7 * group)
    H = kv_heads * group
    q = torch.randn(batch, H, D)
    k, v = torch.randn(batch, S, kv_heads, D) * 2, torch.randn(batch, S, kv_heads, D)
    starts = [0] + [min(pad, S - 1)] * (batch - 1)  # the second row padded at the front
    scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    if int8:  # the kernel reads the codes; the reference their dequantised values
        (kq, ks), (vq, vs) = quantize_rows(k, torch.int8), quantize_rows(v, torch.int8)
        k, v, scales = kq.float() * ks, vq.float() * vs, (ks, vs)
        kc, vc = kq, vq
    else:
        kc, vc = k, v
    eye = torch.eye(H * D)
    with torch_threads(threads):
        out = torch.ops.looplm.attn_step_out(torch.zeros(batch, H * D), q, kc, vc, [eye], None, [], [], 1e-6,
                                             torch.tensor(starts), *scales)
    torch.testing.assert_close(out.view(batch, H, D), _reference(q, k, v, starts), rtol=1e-4, atol=1e-5)
