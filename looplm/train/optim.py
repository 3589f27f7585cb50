"""AdamW with decay groups and the learning-rate schedules (warmup + cosine, or WSD).

The schedule is a pure function of the step, so the "scheduler state" of a run is its step.
WSD (warmup-stable-decay): Hu et al. 2024, "MiniCPM"; cosine: Loshchilov & Hutter 2017.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from looplm.train.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters: matrices decay; norms, biases and embedding tables do not."""
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) or "norm" in type(module).__name__.lower():
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or id(p) in no_decay_ids else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; ``foreach`` is left to torch (fast on every device)."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2)
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) under ``cfg.schedule``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    low = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        span = max(cfg.steps - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps + 1) / span, 1.0)
        return low + 0.5 * (cfg.lr - low) * (1 + math.cos(math.pi * progress))
    decay_steps = max(int(cfg.steps * cfg.decay_frac), 1)
    decay_start = cfg.steps - decay_steps
    if step < decay_start:
        return cfg.lr
    return cfg.lr - (cfg.lr - low) * min((step - decay_start + 1) / decay_steps, 1.0)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
