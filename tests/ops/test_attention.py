"""Softmax attention and RoPE against explicit references."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import looplm.ops.attention as attention_module
from looplm.ops.attention import apply_rope, attention, rope, rope_cos_sin
from looplm.ops.linear import bf16_products
from tests.amx import needs_amx


def reference(q, k, v, allowed):
    """Explicit softmax with grouped heads repeated; ``allowed [B, T, S]``; empty rows -> 0."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.nan_to_num(s.softmax(-1))
    return torch.einsum("bhts,bshd->bthd", p, v)


@given(B=st.integers(1, 2), T=st.integers(1, 9), extra=st.integers(0, 6), hkv=st.sampled_from([1, 2]),
       rep=st.sampled_from([1, 3]), seed=st.integers(0, 1000))
def test_gqa_matches_reference_with_cache_and_mask(B, T, extra, hkv, rep, seed):
    g = torch.Generator().manual_seed(seed)
    S, H, D = T + extra, hkv * rep, 8
    q = torch.randn(B, T, H, D, generator=g)
    k = torch.randn(B, S, hkv, D, generator=g)
    v = torch.randn(B, S, hkv, 5, generator=g)
    out = attention(q, k, v)  # queries are the last T keys
    causal = torch.arange(S)[None, :] <= torch.arange(extra, S)[:, None]
    torch.testing.assert_close(out, reference(q, k, v, causal.expand(B, T, S)), atol=1e-5, rtol=1e-5)
    key_mask = torch.rand(B, S, generator=g) > 0.4
    q_pos = torch.randint(0, S, (B, T), generator=g)
    k_pos = torch.arange(S).expand(B, S)
    out = attention(q, k, v, q_pos=q_pos, k_pos=k_pos, key_mask=key_mask)
    allowed = (k_pos[:, None, :] <= q_pos[:, :, None]) & key_mask[:, None, :]
    torch.testing.assert_close(out, reference(q, k, v, allowed), atol=1e-5, rtol=1e-5)
    window = 1 + seed % 4  # sliding window: only the last `window` positions
    out = attention(q, k, v, q_pos=q_pos, k_pos=k_pos, key_mask=key_mask, window=window)
    allowed = allowed & (k_pos[:, None, :] > q_pos[:, :, None] - window)
    torch.testing.assert_close(out, reference(q, k, v, allowed), atol=1e-5, rtol=1e-5)


@given(T=st.integers(2, 12), before=st.integers(1, 40), hkv=st.sampled_from([1, 3]),
       rep=st.sampled_from([1, 3]), bf16=st.booleans(), seed=st.integers(0, 1000))
def test_chunk_after_a_cache_matches_reference_without_a_mask(T, before, hkv, rep, bf16, seed):
    """A prefill chunk's T queries after ``before`` cached keys: the prefix call and the square causal
    call merged by their log-sum-exps equal the masked softmax; with autograd recording, the masked
    path (same values)."""
    g = torch.Generator().manual_seed(seed)
    S, H, D = T + before, hkv * rep, 16
    dtype = torch.bfloat16 if bf16 else torch.float32
    q = torch.randn(2, T, H, D, generator=g).to(dtype)
    k, v = (torch.randn(2, S, hkv, D, generator=g).to(dtype) for _ in range(2))
    calls = []
    split = attention_module._after_prefix
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_module, "_after_prefix", lambda *a: calls.append(1) or split(*a))
        out = attention(q, k, v)
        assert len(calls) == 1 and out.dtype == dtype
        tracked = attention(q.clone().requires_grad_(), k, v)
        assert len(calls) == 1  # autograd records: the masked path
    causal = torch.arange(S)[None, :] <= torch.arange(before, S)[:, None]
    want = reference(q.double(), k.double(), v.double(), causal.expand(2, T, S))
    tol = 2e-2 if bf16 else 1e-5
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(tracked.double(), want, atol=tol, rtol=tol)


def test_non_causal_and_gradients():
    q, k, v = (torch.randn(2, 4, 4, 8, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, causal=False)
    ref = reference(q, k, v, torch.ones(2, 4, 4, dtype=torch.bool))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_bad_heads_raise():
    q = torch.randn(1, 2, 3, 8)
    k = torch.randn(1, 2, 2, 8)
    try:
        attention(q, k, k)
    except ValueError as e:
        assert "multiple" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_rope_relative_and_norm_preserving():
    """Scores depend only on position differences; rotation keeps norms."""
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16)
    def score(pq, pk):
        return (rope(q, torch.tensor([[pq]])) * rope(k, torch.tensor([[pk]]))).sum()
    torch.testing.assert_close(score(7, 3), score(104, 100), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(7, 3), score(7, 5))
    x = torch.randn(2, 5, 3, 16)
    cos, sin = rope_cos_sin(torch.arange(5), 16)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rope(x, torch.zeros(2, 5, dtype=torch.long)), x)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("tile", [1, 1 << 19])
def test_apply_rope_matches_formula_and_its_gradient(per_row, tile, monkeypatch):
    monkeypatch.setattr(attention_module, "_TILE", tile)  # 1: one batch row per tile
    x = torch.randn(3, 5, 2, 8, dtype=torch.float64, requires_grad=True)
    pos = torch.randint(0, 50, (3, 5)) if per_row else torch.arange(5)
    cos, sin = rope_cos_sin(pos, 8, dtype=torch.float64)
    x1, x2 = x.chunk(2, dim=-1)
    want = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    torch.testing.assert_close(apply_rope(x, cos, sin), want)
    gy = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(apply_rope(x, cos, sin), x, gy)[0],
                               torch.autograd.grad(want, x, gy)[0])


@pytest.mark.parametrize("kv_heads", [6, 2])  # 2: grouped heads, repeated for the flash kernels
@pytest.mark.parametrize("T", [5, 11, 16, 17])
def test_causal_query_chunks_match_one_call_with_gradients(T, kv_heads, monkeypatch):
    monkeypatch.setattr(attention_module, "CAUSAL_CHUNK", 4)  # T=11: chunks 4, 4, 3; T=17: one call
    g = torch.Generator().manual_seed(T)
    q = torch.randn(2, T, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, T, kv_heads, 8, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    out = attention(q, k, v)
    want = reference(q, k, v, torch.ones(T, T, dtype=torch.bool).tril().expand(2, T, T))
    torch.testing.assert_close(out, want)
    gy = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for got, exp in zip(torch.autograd.grad(out, (q, k, v), gy), torch.autograd.grad(want, (q, k, v), gy)):
        torch.testing.assert_close(got, exp)


def test_causal_query_chunks_in_bfloat16(monkeypatch):
    monkeypatch.setattr(attention_module, "CAUSAL_CHUNK", 4)
    q, k, v = (torch.randn(1, 11, 2, 8, requires_grad=True) for _ in range(3))
    out = attention(*(t.bfloat16() for t in (q, k, v)))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attention(q, k, v), rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_causal_query_chunks_under_autocast_with_mixed_inputs(monkeypatch):
    """bf16 training: q, k come out of RoPE in float32, v from the projection in bfloat16; the
    chunked path's flash calls do not autocast, so attention casts them as SDPA would."""
    monkeypatch.setattr(attention_module, "CAUSAL_CHUNK", 4)
    q, k, v = (torch.randn(1, 11, 2, 8, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attention(q, k, v), rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.skipif(not attention_module.cpp_ext.available(), reason="no C++ kernel built here")
@pytest.mark.parametrize("per_row", [False, True])
def test_rope_kernel_float32_matches_float64_with_gradients(per_row):
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(3, 7, 5, 8, generator=g, requires_grad=True)
    x = qkv[:, :, :3]  # a strided view, as the mixer's q|k
    pos = torch.randint(0, 50, (3, 7), generator=g) if per_row else torch.arange(7)
    cos, sin = rope_cos_sin(pos, 8)
    out = apply_rope(x, cos, sin)
    c64, s64 = rope_cos_sin(pos, 8, dtype=torch.float64)
    x64 = x.detach().double().requires_grad_()
    x1, x2 = x64.chunk(2, dim=-1)
    want = torch.cat((x1 * c64 - x2 * s64, x2 * c64 + x1 * s64), dim=-1)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    gy = torch.randn(out.shape, generator=g)
    torch.testing.assert_close(torch.autograd.grad(out, x, gy)[0].double(),
                               torch.autograd.grad(want, x64, gy.double())[0], rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # the untracked path runs the same rotation
        torch.testing.assert_close(apply_rope(x, cos, sin), out)


@needs_amx
@given(T=st.integers(2, 300), before=st.sampled_from([0, 0, 5, 130]), hkv=st.sampled_from([1, 3]),
       rep=st.sampled_from([1, 3]), masked=st.booleans(), seed=st.integers(0, 1000))
def test_bf16_products_attend_prompts_in_bfloat16(T, before, hkv, rep, masked, seed):
    """Inside bf16_products, several queries (a prompt, with or without a cache before it, with or
    without positions and a key mask) attend with q, k, v rounded to bfloat16: the result is float32
    and near the exact attention of the rounded operands; one query (a decoding step) and recorded
    ops (training) stay float32."""
    g = torch.Generator().manual_seed(seed)
    S, H = T + before, hkv * rep
    q, k, v = (torch.randn(1, n, h, 64, generator=g) for n, h in ((T, H), (S, hkv), (S, hkv)))
    causal = torch.arange(S)[None, :] <= torch.arange(before, S)[:, None]
    kw = {}
    if masked:
        kw = {"q_pos": torch.arange(before, S)[None], "k_pos": torch.arange(S)[None],
              "key_mask": torch.rand(1, S, generator=g) > 0.2}
        causal = causal & kw["key_mask"][0][None, :]
    want = reference(*(t.bfloat16().double() for t in (q, k, v)), causal[None])
    step_kw = {n: t[:, -1:] if n == "q_pos" else t for n, t in kw.items()}  # the last query alone
    with torch.no_grad(), bf16_products():
        got = attention(q, k, v, **kw)
        step = attention(q[:, -1:], k, v, **step_kw)
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max() < 2e-2
    torch.testing.assert_close(step, attention(q[:, -1:], k, v, **step_kw), rtol=0, atol=0)
    qg = q.clone().requires_grad_()
    with bf16_products():
        trained = attention(qg, k, v, **kw)
    exact = reference(q.double(), k.double(), v.double(), causal[None])
    assert (trained.detach().double() - exact).abs().max() < 1e-5
