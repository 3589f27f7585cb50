"""Batches of a training run, drawn as a pure function of (seed, step).

Each optimizer step draws ``batch_size`` random windows of ``seq_len + 1`` tokens from the
token array with a generator seeded by ``(seed, step)``; rank ``r`` of ``world`` takes its
contiguous share, then splits it into ``grad_accum`` micro-batches. The loader's position is
therefore just the step: resuming needs no iterator state, and the global batch of a step
is the same whatever the number of processes (what the distributed test relies on).
Validation uses fixed, evenly spaced windows.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from looplm.errors import DataError


class TokenBatches:
    """Windows of a 1-D token array (a ``np.memmap`` works; nothing is copied up front).

    ``tokens`` [N] ints; batches are ``(x, y)`` with ``x, y`` [b, seq_len] int64, ``y`` = ``x``
    shifted by one.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0, rank: int = 0, world: int = 1):
        if tokens.ndim != 1:
            raise DataError(f"tokens must be a 1-D array, got shape {tuple(tokens.shape)}")
        if len(tokens) < seq_len + 2:
            raise DataError(
                f"the corpus has {len(tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}; "
                "use more data or a smaller train.seq_len"
            )
        self.tokens, self.seq_len, self.seed, self.rank, self.world = tokens, seq_len, seed, rank, world

    def _windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1]) for s in starts])
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def _share(self, n: int) -> slice:
        if n % self.world:
            raise DataError(f"batch of {n} sequences does not split over {self.world} processes")
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def train_step(
        self, step: int, batch_size: int, grad_accum: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of optimizer step ``step`` (global batch ``batch_size``)."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=batch_size)
        mine = starts[self._share(batch_size)]
        if len(mine) % grad_accum:
            raise DataError(
                f"each process's {len(mine)} sequences must split into grad_accum={grad_accum} micro-batches"
            )
        x, y = self._windows(mine)
        return list(zip(x.chunk(grad_accum), y.chunk(grad_accum)))

    def eval_batches(self, n_batches: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed windows spread evenly over the array; this rank's share of each batch."""
        total = n_batches * batch_size
        hi = len(self.tokens) - self.seq_len - 1
        starts = np.linspace(0, hi, total).astype(np.int64)
        for b in range(n_batches):
            yield self._windows(starts[b * batch_size : (b + 1) * batch_size][self._share(batch_size)])
