"""A tiny stand-in language model and a runnable training script for the trainer's tests.

``python -m tests.train.tiny OUT STEPS [--resume]`` trains it on seeded random tokens;
the subprocess tests kill and resume it, or launch it under torchrun.
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from looplm.data import BatchSampler
from looplm.train import distributed
from looplm.train.config import TrainConfig
from looplm.train.loop import train


class TinyLM(nn.Module):
    """Embedding → norm → MLP → head; forward(x [B,T], y [B,T]) → .loss, .aux_loss, .stats."""

    def __init__(self, vocab: int = 64, d: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> SimpleNamespace:
        h = self.embed(x)
        h = h + self.mlp(self.norm(h))
        logits = self.head(h)
        loss = None if y is None else F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        return SimpleNamespace(logits=logits, loss=loss, aux_loss=0.0 * loss, stats={"mean_h": h.mean()})


def tokens(n: int = 20_000, vocab: int = 64, seed: int = 0) -> np.ndarray:
    """A learnable stream: a random walk over the vocabulary."""
    rng = np.random.default_rng(seed)
    return (np.cumsum(rng.integers(-2, 3, size=n)) % vocab).astype(np.uint16)


def tiny_config(out: str, steps: int, **kw) -> TrainConfig:
    base = dict(out=out, steps=steps, batch_size=8, seq_len=16, lr=1e-2, warmup_steps=3, eval_interval=5,
                eval_iters=2, log_interval=5, keep_last=2, sample_tokens=0)
    return TrainConfig(**{**base, **kw})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("steps", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds per step, so a test can kill mid-run")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    d = distributed.setup("cpu")
    cfg = tiny_config(args.out, args.steps, grad_accum=args.grad_accum)
    torch.manual_seed(cfg.seed)
    model = TinyLM()
    if args.sleep:
        import time

        model.register_forward_hook(lambda *_: time.sleep(args.sleep))
    data = tokens()
    batches = BatchSampler(data[:15000], cfg.batch_size, cfg.seq_len, seed=cfg.seed, rank=d.rank,
                           world_size=d.world)
    train(cfg, model, batches, data[15000:], d=d, resume=args.resume, progress=False)
    distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
