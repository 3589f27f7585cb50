"""Argument validation shared by the ops: each failure names the offending argument."""

from __future__ import annotations

import torch


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, step: bool = False) -> None:
    """Check q, k ``[B,T,H,dk]`` and v ``[B,T,H,dv]`` (``[B,H,*]`` when ``step``).

    Raises ValueError/TypeError naming ``q``, ``k`` or ``v``.
    """
    ndim = 3 if step else 4
    layout = "[B, H, D]" if step else "[B, T, H, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got q {tuple(q.shape)} k {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"v must match q in all but the last dim, got q {tuple(q.shape)} v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def check_like(name: str, t: torch.Tensor | None, shape: tuple[int, ...], ref: torch.Tensor) -> None:
    """Check an optional tensor argument has ``shape`` and the dtype/device of ``ref``."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have dtype {ref.dtype} (that of q), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} (that of q), got {t.device}")


def check_chunk_size(chunk_size: int) -> None:
    """Chunk length must be a positive int."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
