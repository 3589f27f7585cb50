"""Softmax attention of decoding queries over a cache, in float64 torch: the reference of the C++
decoding attention's tests (a module of its own: an AVX2-only build's test process imports it
without loading the main kernel build)."""

from __future__ import annotations

import math

import torch


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: list[int]) -> torch.Tensor:
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
