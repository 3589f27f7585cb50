"""Perplexity and bits per byte of a token stream, in windows of the model's context.

Every token after the first is scored once, as the target of the position before it. The
stream is cut into windows of at most ``window`` input tokens starting every ``stride`` tokens;
window ``k`` reads inputs ``ids[b:e]`` (``b = k * stride``) and scores only the targets it adds
(those past the previous window's end), so with ``stride == window`` the windows do not overlap
and with a smaller stride each scored token sees at least ``window - stride`` tokens of context
(the sliding-window evaluation of transformers' perplexity guide). The head runs only at the
scored positions (``logits_at``).

Bits per byte = total nats / ln 2 / the UTF-8 bytes the scored tokens stand for, which makes
models with different tokenizers comparable.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from looplm.errors import DataError


@dataclass(frozen=True)
class Window:
    """Inputs ``ids[start:end]``; targets ``ids[start + 1:end + 1]``, of which the last
    ``scored`` are counted."""

    start: int
    end: int
    scored: int


def windows(n_tokens: int, window: int, stride: int | None = None) -> list[Window]:
    """The windows covering targets ``1 .. n_tokens - 1`` once each (see the module doc)."""
    stride = window if stride is None else stride
    if window < 1 or not 1 <= stride <= window:
        raise DataError(f"need window >= 1 and 1 <= stride <= window, got window={window}, stride={stride}")
    if n_tokens < 2:
        raise DataError(f"need at least 2 tokens to score, got {n_tokens}")
    last = n_tokens - 1  # inputs end here at most (the last token is only a target)
    out, done, start = [], 0, 0
    while done < last:
        end = min(start + window, last)
        out.append(Window(start, end, end - done))
        done, start = end, start + stride
    return out


@dataclass
class Score:
    """Sums over the scored tokens; ``bytes`` may be 0 when unknown."""

    nll: float = 0.0  # nats
    tokens: int = 0
    bytes: int = 0

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (self.bytes * math.log(2)) if self.bytes else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {"tokens": self.tokens, "bytes": self.bytes, "loss": self.loss,
                "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


def _batches(ws: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of the same length, at most ``batch_size`` at a time."""
    batch: list[Window] = []
    for w in ws:
        if batch and (len(batch) == batch_size or w.end - w.start != batch[0].end - batch[0].start):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


@torch.no_grad()
def score_tokens(model: torch.nn.Module, ids: torch.Tensor, *, window: int, stride: int | None = None,
                 batch_size: int = 1) -> Score:
    """Summed negative log-likelihood of ``ids [N]`` (long) under ``model`` (a ``LoopLM``):
    ``Score.tokens == N - 1``; ``bytes`` is left 0 (the caller knows the text)."""
    ids = ids.reshape(-1).long()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    score = Score()
    try:
        for batch in _batches(windows(len(ids), window, stride), batch_size):
            x = torch.stack([ids[w.start:w.end] for w in batch]).to(device)
            y = torch.stack([ids[w.start + 1:w.end + 1] for w in batch]).to(device)
            at = torch.zeros_like(y, dtype=torch.bool)
            for i, w in enumerate(batch):
                at[i, at.shape[1] - w.scored:] = True
            out = model(x, y.masked_fill(~at, -100), logits_at=at)
            n = int(at.sum())
            score.nll += out.loss.double().item() * n
            score.tokens += n
    finally:
        model.train(was_training)
    return score


def scored_bytes(tokenizer, ids: list[int]) -> int:
    """UTF-8 bytes the targets ``ids[1:]`` stand for: the text of all ``ids`` less that of the
    first token (decoded with its successors, so tokenizers whose pieces depend on context,
    such as a leading space, are counted as they print)."""
    return len(tokenizer.decode(ids).encode("utf-8")) - len(tokenizer.decode(ids[:1]).encode("utf-8"))
