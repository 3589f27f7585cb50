"""Rows quantised with one scale each, and softmax attention over a cache stored that way.

``quantize_rows``: ``x [..., D]`` -> codes ``[..., D]`` (int8 with ``s = max|row|/127``, so
``|x - x̂| ≤ s/2``; or FP8 E4M3 with ``s = max|row|/448``, relative error ≤ 2^-4) and a float32
scale ``[..., 1]`` per row (KIVI, Liu 2024 and KVQuant, Hooper 2024 keep caches this way; here
one row is one token's key or value vector of one head, so appending a token never touches
the rows already stored).

``quantized_attention`` reads such a cache directly: keys and values are cast to float one
chunk of ``key_chunk`` slots at a time, a key's scale multiplies its scores and a value's
scale its softmax weights, and the chunks are combined by the running-maximum softmax of
FlashAttention (Dao 2022). Temporary float memory is O(query_chunk x key_chunk) per head, never
the size of the cache.
"""

from __future__ import annotations

import torch

__all__ = ["KEY_CHUNK", "QUERY_CHUNK", "code_dtype", "dequantize_rows", "quantize_rows",
           "quantized_attention"]

KEY_CHUNK = 2048
QUERY_CHUNK = 256
_CODE_DTYPES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}


def code_dtype(fmt: str) -> torch.dtype:
    """The codes' dtype of a row format (``int8`` | ``fp8_e4m3``)."""
    if fmt not in _CODE_DTYPES:
        raise ValueError(f"state format {fmt!r} is not one of {', '.join(_CODE_DTYPES)}")
    return _CODE_DTYPES[fmt]


def quantize_rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` -> (codes ``[..., D]`` of ``dtype`` (int8 | float8_e4m3fn), scale ``[..., 1]``
    float32); ``codes * scale`` approximates ``x``."""
    top = 127.0 if dtype == torch.int8 else torch.finfo(dtype).max
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / top).clamp(min=torch.finfo(torch.float32).tiny)
    y = xf / scale
    codes = y.round().clamp(-127, 127).to(torch.int8) if dtype == torch.int8 else y.clamp(-top, top).to(dtype)
    return codes, scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes [..., D] * scale [..., 1]`` as ``dtype``."""
    return (codes.float() * scale).to(dtype)


def quantized_attention(q: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor, v: torch.Tensor,
                        v_scale: torch.Tensor, *, q_pos: torch.Tensor, k_pos: torch.Tensor,
                        key_mask: torch.Tensor, scale: float | None = None, key_chunk: int | None = None,
                        query_chunk: int | None = None) -> torch.Tensor:
    """Softmax attention of ``q [B, T, H, D]`` over a quantised cache: codes ``k [B, S, Hkv, D]``,
    ``v [B, S, Hkv, Dv]``, scales ``k_scale, v_scale [B, S, Hkv, 1]``; -> ``[B, T, H, Dv]`` in
    q's dtype. Query t sees key s iff ``k_pos[b, s] <= q_pos[b, t]`` and ``key_mask[b, s]``; a
    query that sees no key returns zeros. Chunks default to ``KEY_CHUNK`` and ``QUERY_CHUNK``.
    Equals :func:`looplm.ops.attention.attention` of the dequantised keys and values (up to
    float rounding)."""
    B, T, H, D = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if k.shape[:3] != v.shape[:3] or k.shape[0] != B or k.shape[-1] != D or H % Hkv:
        raise ValueError(f"k, v must be [B, S, Hkv, D] with Hkv dividing H, matching q {tuple(q.shape)}; got "
                         f"k {tuple(k.shape)} v {tuple(v.shape)}")
    if k_scale.shape != (*k.shape[:3], 1) or v_scale.shape != (*v.shape[:3], 1):
        raise ValueError(f"k_scale, v_scale must be [B, S, Hkv, 1], got {tuple(k_scale.shape)}, "
                         f"{tuple(v_scale.shape)}")
    key_chunk, query_chunk = key_chunk or KEY_CHUNK, query_chunk or QUERY_CHUNK
    G = H // Hkv
    sm = scale if scale is not None else D ** -0.5
    # queries grouped under their key head (head h reads key head h // G): [B, Hkv, G, T, D]
    qg = (q.float() * sm).view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4)
    ks, vs = k_scale[..., 0].transpose(1, 2)[:, :, None], v_scale[..., 0].transpose(1, 2)[:, :, None]
    outs = []
    for i in range(0, T, query_chunk):
        e = min(i + query_chunk, T)
        n = e - i
        qc = qg[:, :, :, i:e].reshape(B, Hkv, G * n, D)
        m = q.new_full((B, Hkv, G * n, 1), float("-inf"), dtype=torch.float32)
        denom = torch.zeros_like(m)
        acc = q.new_zeros(B, Hkv, G * n, Dv, dtype=torch.float32)
        for j in range(0, S, key_chunk):
            f = min(j + key_chunk, S)
            allowed = (k_pos[:, None, j:f] <= q_pos[:, i:e, None]) & key_mask[:, None, j:f]  # [B, n, c]
            if not bool(allowed.any()):
                continue
            s = (qc @ k[:, j:f].float().permute(0, 2, 3, 1)) * ks[..., j:f]  # [B, Hkv, G*n, c]
            s = s.view(B, Hkv, G, n, f - j).masked_fill(~allowed[:, None, None], float("-inf"))
            s = s.view(B, Hkv, G * n, f - j)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            shift = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows that saw no key yet
            p = (s - shift).exp()
            fade = (m - shift).exp()
            denom = denom * fade + p.sum(-1, keepdim=True)
            acc = acc * fade + (p * vs[..., j:f]) @ v[:, j:f].float().transpose(1, 2)
            m = m_new
        o = torch.where(denom > 0, acc / denom.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
        outs.append(o.view(B, Hkv, G, n, Dv).permute(0, 3, 1, 2, 4).reshape(B, n, H, Dv))
    return torch.cat(outs, 1).to(q.dtype) if outs else q.new_zeros(B, 0, H, Dv)
