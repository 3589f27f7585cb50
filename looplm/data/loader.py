"""Batches of windows over a token file: deterministic, resumable, sharded by rank.

A batch at step ``s`` is a pure function of ``(seed, s)`` and the global batch size: its
``batch_size`` window starts are drawn (``mode="random"``: uniform offsets as in nanoGPT,
from a generator seeded with ``[seed, s]``) or enumerated (``mode="sequential"``:
consecutive non-overlapping windows, wrapping around). Rank ``r`` of ``world_size`` takes
the ``r``-th contiguous run of ``batch_size // world_size`` windows and reads only those
rows of the memory-mapped file, so concatenating the ranks' batches in rank order gives the
single-process batch, and a resumed run (``load_state_dict``) reads exactly the same
batches, under any world size that divides the batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from looplm.data.tokens import TokenFile
from looplm.errors import ConfigError, DataError

MODES = ("random", "sequential")


def _tokens(tokens: TokenFile | np.ndarray) -> np.ndarray:
    return tokens.tokens if isinstance(tokens, TokenFile) else np.asarray(tokens)


def _check_length(n: int, seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len must be a positive int, got {seq_len!r}")
    if n < seq_len + 1:
        raise DataError(f"the corpus has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                        "use a shorter seq_len or more data")


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
    return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())


class BatchSampler:
    """Infinite iterator of ``(x, y)``: int64 ``[batch_size // world_size, seq_len]``, ``y`` is
    ``x`` shifted by one token. ``batch_size`` is the global batch (all ranks together)."""

    def __init__(
        self,
        tokens: TokenFile | np.ndarray,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        mode: str = "random",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.tokens = _tokens(tokens)
        _check_length(len(self.tokens), seq_len)
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if not isinstance(batch_size, int) or batch_size < 1 or batch_size % world_size:
            raise ConfigError(
                f"batch_size (global) must be a positive multiple of world_size={world_size}, "
                f"got {batch_size!r}"
            )
        self.batch_size, self.seq_len, self.seed, self.mode = batch_size, seq_len, seed, mode
        self.rank, self.world_size = rank, world_size
        self.step = 0

    def starts(self, step: int) -> np.ndarray:
        """``[batch_size]`` window starts of the global batch at ``step``."""
        n, t, b = len(self.tokens), self.seq_len, self.batch_size
        if self.mode == "random":
            return np.random.default_rng([self.seed, step]).integers(0, n - t, size=b)
        count = (n - 1) // t
        return ((step * b + np.arange(b)) % count) * t

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(x, y)`` at ``step`` (does not move the position)."""
        per_rank = self.batch_size // self.world_size
        mine = self.starts(step)[self.rank * per_rank : (self.rank + 1) * per_rank]
        return _windows(self.tokens, mine, self.seq_len)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict:
        """The position and what it depends on (global quantities only: valid for any rank)."""
        return {"step": self.step, "seed": self.seed, "mode": self.mode, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "num_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state["step"]``; the other entries must match this sampler."""
        mine = self.state_dict()
        for key in ("seed", "mode", "batch_size", "seq_len", "num_tokens"):
            if state.get(key) != mine[key]:
                raise ConfigError(
                    f"cannot resume the data position: {key} was {state.get(key)!r}, now {mine[key]!r}; "
                    "resume with the same data and batch settings"
                )
        self.step = int(state["step"])


def eval_batches(
    tokens: TokenFile | np.ndarray,
    batch_size: int,
    seq_len: int,
    *,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over the non-overlapping windows (a trailing part shorter than a window is
    left out), at most ``max_batches`` batches of ``batch_size`` windows (fewer in the last).
    Rank ``r`` takes windows ``r, r + world_size, ...``: sum loss and count across ranks."""
    tokens = _tokens(tokens)
    _check_length(len(tokens), seq_len)
    if not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    starts = np.arange((len(tokens) - 1) // seq_len)[rank::world_size] * seq_len
    for i, s in enumerate(range(0, len(starts), batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        yield _windows(tokens, starts[s : s + batch_size], seq_len)
