"""Tiny configurations shared by the model tests."""

from __future__ import annotations

import torch

from looplm.model import LoopConfig, LoopLM

VOCAB = 50


def tiny(**overrides) -> LoopConfig:
    """d=32, 2 heads, one prelude, two core, one coda layer; small chunks so chunking is exercised."""
    base = dict(vocab_size=VOCAB, d_model=32, n_heads=2, n_prelude=1, n_core=2, n_coda=1, d_ffn=48,
                chunk_size=4, max_seq_len=64)
    base.update(overrides)
    return LoopConfig(**base)


def model(seed: int = 0, **overrides) -> LoopLM:
    torch.manual_seed(seed)
    return LoopLM(tiny(**overrides)).eval()


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
