"""Causal softmax attention over SDPA with grouped KV heads, and rotary position embeddings.

RoPE: Su et al. 2021 (RoFormer), "rotate half" layout (pairs ``(i, i + D/2)``) as in GPT-NeoX
and Llama. Positions are absolute integers ``[B, T]`` so that padded or skipped tokens keep
their true positions. Attention: Vaswani et al. 2017; grouped KV heads: Ainslie et al. 2023
(GQA), computed by ``torch.nn.functional.scaled_dot_product_attention(enable_gqa=True)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from looplm.errors import ConfigError
from looplm.ops import cpp_ext
from looplm.ops.linear import bf16_products_on
from looplm.ops.nodes import row_tiles, tracked

ROPE_SCALINGS = ("linear", "llama3")


def check_rope_scaling(scaling: dict[str, Any] | None) -> None:
    """Raise ConfigError unless ``scaling`` is None or a RoPE scaling this module computes:
    ``{"rope_type": "linear", "factor": f}`` or ``{"rope_type": "llama3", "factor",
    "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}`` (``type`` is
    accepted for ``rope_type``, as in older Hugging Face configs)."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be a mapping or null, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return
    if kind not in ROPE_SCALINGS:
        raise ConfigError(f"RoPE scaling {kind!r} is not supported (supported: {', '.join(ROPE_SCALINGS)})")
    need = ["factor"] if kind == "linear" else ["factor", "low_freq_factor", "high_freq_factor",
                                                  "original_max_position_embeddings"]
    for key in need:
        value = scaling.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"rope_scaling {kind!r} needs a positive {key}, got {value!r}")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ConfigError("rope_scaling 'llama3' needs high_freq_factor > low_freq_factor")


def rope_inv_freq(dim: int, base: float = 10000.0, device: torch.device | str | None = None,
                  scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """RoPE's frequencies ``base^(-2i/dim)``, ``[dim/2]`` float32: the angle of position p is ``p * f``.

    ``scaling`` (see :func:`check_rope_scaling`): ``linear`` divides every frequency by ``factor``
    (position interpolation, Chen et al. 2023); ``llama3`` divides the low frequencies (wavelength
    above ``original / low_freq_factor``) by ``factor``, keeps the high ones (wavelength below
    ``original / high_freq_factor``) and blends linearly in between (Llama 3.1, Meta 2024).
    """
    inv = base ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if scaling is None or kind in (None, "default"):
        return inv
    check_rope_scaling(scaling)
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    smooth = ((original / wavelen - low) / (high - low)).clamp(0, 1)  # 0: low band, 1: high band
    return (1 - smooth) * inv / factor + smooth * inv


def rope_cos_sin(
    positions: torch.Tensor, dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32,
    scaling: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation tables for integer ``positions [B, T]`` (or ``[T]``): ``cos, sin [B, T, 1, dim/2]``.

    Angles are computed in float32 and cast to ``dtype`` at the end.
    """
    if dim % 2:
        raise ValueError(f"dim must be even for RoPE, got {dim}")
    if positions.dim() == 1:
        positions = positions[None]
    inv_freq = rope_inv_freq(dim, base, positions.device, scaling)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, dim/2]
    return angles.cos()[:, :, None].to(dtype), angles.sin()[:, :, None].to(dtype)


_TILE = 1 << 19  # elements per tile of rows in apply_rope


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, sign: int) -> None:
    """``out = (x1 cos - sign x2 sin, x2 cos + sign x1 sin)`` for the halves ``x1, x2`` of ``x``."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    torch.mul(x1, cos, out=out[..., :h]).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=out[..., h:]).addcmul_(x1, sin, value=sign)


class _Rope(torch.autograd.Function):
    """The rotation written into one output, tile by tile over batch rows (in cache); its
    backward is the rotation by the opposite angle. fwd+bwd of ``[8, 512, 12, 64]``, 1 thread:
    27.8 ms as autograd of the chunk/cat formula, 12.9 ms this. float32 on the CPU runs the
    rotation in ``csrc/norm_rope.cpp`` (one pass per row, rows over threads) where it is built."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.dtype = x.dtype
        return _rotate_rows(x, cos, sin, 1)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate_rows(gy, cos, sin, -1).to(ctx.dtype), None, None


def _rotate_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int) -> torch.Tensor:
    if (x.device.type == "cpu" and x.dtype == cos.dtype == sin.dtype == torch.float32 and x.stride(-1) == 1
            and cos.is_contiguous() and sin.is_contiguous() and x.numel() and cpp_ext.available()):
        return torch.ops.looplm.rope_rotate(x, cos, sin, sign)  # csrc/norm_rope.cpp: one pass, threads
    if torch.compiler.is_compiling():  # the same rotation without out= views, for the compiler to fuse
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - sign * x2 * sin, x2 * cos + sign * x1 * sin], dim=-1)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
    per_row = cos.shape[0] > 1
    for r in row_tiles(x.shape[0], x[0].numel(), _TILE):
        _rotate(x[r], cos[r] if per_row else cos, sin[r] if per_row else sin, out[r], sign)
    return out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, H, D]`` by tables ``cos, sin [B|1, T, 1, D/2]`` from :func:`rope_cos_sin`:
    ``(x1 cos - x2 sin, x2 cos + x1 sin)`` for the halves ``x1, x2``."""
    if not tracked(x, cos, sin):
        return _rotate_rows(x, cos, sin, 1)
    # torch's autograd Function.apply is untyped
    return _Rope.apply(x, cos, sin)  # type: ignore[no-untyped-call]


def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0,
         scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """``apply_rope`` with tables built for ``positions [B, T]``; ``x [B, T, H, D]``."""
    cos, sin = rope_cos_sin(positions, x.shape[-1], base, x.dtype, scaling)
    return apply_rope(x, cos, sin)


CAUSAL_CHUNK = 128  # query chunk of causal self-attention without positions or masks


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _chunks(T: int) -> list[tuple[int, int]]:
    return [(i, min(i + CAUSAL_CHUNK, T)) for i in range(0, T, CAUSAL_CHUNK)]


def _chunk_mask(i: int, e: int, like: torch.Tensor) -> torch.Tensor | None:
    """Additive causal mask of queries ``[i, e)`` over keys ``[0, e)``; None for the first chunk
    (square: the kernel's own causal flag)."""
    if i == 0:
        return None
    allowed = torch.ones(e - i, e, dtype=torch.bool, device=like.device).tril(i)
    return torch.zeros(e - i, e, dtype=like.dtype, device=like.device).masked_fill_(~allowed, float("-inf"))


class _CausalByChunks(torch.autograd.Function):
    """Causal attention of ``q, k, v [B, H, T, D]`` (CPU) by query chunks: chunk ``[i, e)`` reads
    keys ``< e`` only, so most tiles above the diagonal are never computed. It calls SDPA's CPU
    flash kernels (forward and backward) per chunk: autograd of sliced SDPA calls zero-filled a
    full-size gradient of k and v for every chunk and added them up; here the last chunk's
    gradients (which cover every key) are the buffers the others add into. fwd+bwd at B=8, H=6,
    D=64, T=512, 2 threads: 39 ms this, 45 ms one causal SDPA call, 50 ms sliced SDPA calls (T=1024,
    8 chunks: 142 vs 130 ms, so ``attention`` uses it for 2 to 4 chunks only)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float | None) -> torch.Tensor:
        outs, lses, masks = [], [], []
        for i, e in _chunks(q.shape[2]):
            mask = _chunk_mask(i, e, q)
            o, lse = _flash(q[:, :, i:e], k[:, :, :e], v[:, :, :e], 0.0, i == 0, attn_mask=mask, scale=scale)
            outs.append(o)
            lses.append(lse)
            masks.append(mask)
        ctx.save_for_backward(q, k, v, *outs, *lses)
        ctx.masks, ctx.scale = masks, scale
        return torch.cat(outs, dim=2)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        q, k, v, *saved = ctx.saved_tensors
        n = len(ctx.masks)
        outs, lses = saved[:n], saved[n:]
        dq: list[torch.Tensor] = []
        dk: torch.Tensor | None = None
        dv: torch.Tensor | None = None
        for c, (i, e) in reversed(list(enumerate(_chunks(q.shape[2])))):
            gq, gk, gv = _flash_backward(g[:, :, i:e], q[:, :, i:e], k[:, :, :e], v[:, :, :e], outs[c],
                                         lses[c], 0.0, i == 0, attn_mask=ctx.masks[c], scale=ctx.scale)
            dq.insert(0, gq)
            if dk is None or dv is None:  # the last chunk: every key
                dk, dv = gk, gv
            else:
                dk[:, :, :e] += gk
                dv[:, :, :e] += gv
        return torch.cat(dq, dim=2), dk, dv, None


def _after_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal attention of ``q [B, H, T, D]`` whose queries are the last T of the S keys
    ``k, v [B, Hkv, S, D]`` (a prefill chunk after a cache; CPU, nothing recorded for autograd),
    with no mask built: every query sees the P = S - T keys before the chunk, so those are one
    flash call without a mask (the query heads sharing a key head stacked as its rows: each cached
    key read once per key head); the chunk's own keys are a square causal flash call; the two
    softmaxes are merged by their log-sum-exps ``l1, l2``: ``o = o2 + sigmoid(l1 - l2) (o1 - o2)``
    (the first part's share of the total probability mass; as Flash-Decoding combines splits)."""
    B, H, T, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    P, g = S - T, H // Hkv
    stacked = q.reshape(B, Hkv, g * T, D)  # rows of key head j: its g query heads' T queries
    o1, l1 = _flash(stacked, k[:, :, :P], v[:, :, :P], 0.0, False, scale=scale)
    o1, l1 = o1.reshape(B, H, T, Dv), l1.reshape(B, H, T, 1)
    kc, vc = k[:, :, P:], v[:, :, P:]
    if g > 1:  # the flash kernels take equal heads: the chunk's T keys repeated for each group
        kc, vc = kc.repeat_interleave(g, dim=1), vc.repeat_interleave(g, dim=1)
    o2, l2 = _flash(q, kc, vc, 0.0, True, scale=scale)
    share = torch.sigmoid(l1 - l2.view(B, H, T, 1))
    return torch.lerp(o2.float(), o1.float(), share).to(q.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    window: int = 0,
) -> torch.Tensor:
    """Softmax attention: ``q [B, T, H, D]``, ``k, v [B, S, Hkv, D|Dv]`` -> ``[B, T, H, Dv]``.

    ``H`` must be a multiple of ``Hkv`` (grouped KV heads). Causality is by position: query t
    sees key s iff ``k_pos[b, s] <= q_pos[b, t]``. Without positions the queries are the last
    T of the S keys (a cache prepended). ``key_mask [B, S]`` bool, False = never attended.
    A query that sees no key at all returns zeros. ``window = W > 0`` (sliding-window attention,
    causal only): query t sees key s only if also ``k_pos[b, s] > q_pos[b, t] - W``.
    """
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    if k.shape[0] != B or v.shape[:3] != k.shape[:3] or k.shape[-1] != D:
        raise ValueError(f"k, v must be [B, S, Hkv, D] matching q {tuple(q.shape)}, got "
                         f"k {tuple(k.shape)} v {tuple(v.shape)}")
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if not q.dtype == k.dtype == v.dtype:  # under autocast: RoPE'd q, k float32, v bfloat16
        device = q.device.type  # the flash calls below do not autocast: cast as SDPA would
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if window and not causal:
        raise ValueError("a sliding window needs causal attention")
    if (T > 1 and q.dtype == torch.float32 and q.device.type == "cpu" and bf16_products_on()
            and not tracked(q, k, v)):
        # several queries inside bf16_products: bfloat16 operands (SDPA's CPU flash kernels run them
        # on AMX tiles), float32 softmax, sums and output
        out = _attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal, q_pos, k_pos, key_mask, scale, window)
        return out.float()
    return _attend(q, k, v, causal, q_pos, k_pos, key_mask, scale, window)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, q_pos: torch.Tensor | None,
            k_pos: torch.Tensor | None, key_mask: torch.Tensor | None, scale: float | None,
            window: int) -> torch.Tensor:
    """:func:`attention` of checked operands of one dtype."""
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = H != Hkv
    if not window and key_mask is None and q_pos is None and k_pos is None and (T == S or not causal):
        if causal and CAUSAL_CHUNK < T <= 4 * CAUSAL_CHUNK and q.device.type == "cpu":
            if gqa:  # the flash kernels take equal heads: repeat each key/value head for its group
                kt, vt = kt.repeat_interleave(H // Hkv, dim=1), vt.repeat_interleave(H // Hkv, dim=1)
            # torch's autograd Function.apply is untyped
            return _CausalByChunks.apply(qt, kt, vt, scale).transpose(1, 2)  # type: ignore[no-untyped-call]
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal and T > 1, scale=scale,
                                             enable_gqa=gqa)
        return out.transpose(1, 2)
    if (causal and not window and key_mask is None and q_pos is None and k_pos is None and 1 < T < S
            and v.shape[-1] == D and q.device.type == "cpu" and not tracked(q, k, v)):  # a chunk after keys
        return _after_prefix(qt, kt, vt, scale).transpose(1, 2)
    allowed = torch.ones(B, T, S, dtype=torch.bool, device=q.device)
    if causal:
        if q_pos is None:
            q_pos = torch.arange(S - T, S, device=q.device).expand(B, T)
        if k_pos is None:
            k_pos = torch.arange(S, device=q.device).expand(B, S)
        allowed = k_pos[:, None, :] <= q_pos[:, :, None]
        if window:
            allowed = allowed & (k_pos[:, None, :] > q_pos[:, :, None] - window)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :]
    seen = allowed.any(-1, keepdim=True)  # [B, T, 1]
    allowed = allowed | ~seen  # keep softmax finite on empty rows; zeroed below
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed[:, None], scale=scale,
                                         enable_gqa=gqa)
    return out.transpose(1, 2).masked_fill(~seen[..., None], 0.0)
