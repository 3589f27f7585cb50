"""Shared machinery of the research benches (mqar, lm, decode): a lean training loop that stops
at a budget of training FLOPs as counted by the model, and a resumable sweep with progress.

The loop is written here rather than reusing ``looplm.train`` because the benches need FLOPs (not
steps) as the stopping criterion and the learning-rate schedule as a function of the budget spent,
and they train dozens of tiny models in one process without checkpoint directories.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from looplm.train.optim import param_groups

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class TrainResult:
    """What :func:`train_model` spent: optimizer steps, training FLOPs (3 × the forward FLOPs the
    model counted), tokens, wall seconds and the last training losses (mean of the final 10 steps)."""

    steps: int
    flops: float
    tokens: int
    seconds: float
    train_loss: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def lr_at(frac: float, lr: float, warmup: float = 0.05, min_ratio: float = 0.1) -> float:
    """Learning rate after spending ``frac`` of the budget: linear warmup over ``warmup`` of it, then
    cosine to ``min_ratio · lr`` (a schedule in FLOPs, so every model anneals at its own budget)."""
    if frac < warmup:
        return lr * max(frac / warmup, 0.01)
    p = min((frac - warmup) / max(1 - warmup, 1e-9), 1.0)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def train_model(
    model: nn.Module, batch: Callable[[int], Batch], *, budget: float | None = None, steps: int | None = None,
    lr: float = 3e-3, weight_decay: float = 0.1, clip: float = 1.0,
    hook: Callable[[float, int], object] | None = None, hook_at: Sequence[float] = (),
    sparse_loss: bool = False,
) -> TrainResult:
    """Train ``model`` (a LoopLM) on ``batch(step) -> (x [B,T], y [B,T])`` until the training FLOPs it
    counted (3 × forward, routing included) reach ``budget`` or ``steps`` optimizer steps ran, whichever
    comes first; a FLOPs budget overshoots by less than one step.

    AdamW (β = 0.9, 0.95) on ``loss + aux_loss``, gradient clipping, warmup + cosine over the fraction
    of the budget (or steps) spent. ``hook(flops, tokens)`` is called once the spent fraction passes
    each of ``hook_at`` (e.g. to evaluate along the way; its time is not counted). ``sparse_loss``:
    the output head runs only where ``y`` is supervised (``!= -100``; ``LoopLM.forward(logits_at=)``),
    the same loss for less work when few positions are (MQAR's answers); the FLOPs count that head.
    """
    if budget is None and steps is None:
        raise ValueError("give a FLOPs budget or a number of steps")
    if (budget is not None and not budget > 0) or (steps is not None and steps < 1):
        raise ValueError(f"budget and steps must be positive, got budget={budget}, steps={steps}")
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))
    model.train()
    spent, tokens, step = 0.0, 0, 0
    losses: list[float] = []
    pending = sorted(hook_at)
    seconds, start = 0.0, time.perf_counter()

    def progress() -> float:
        return max(spent / budget if budget else 0.0, step / steps if steps else 0.0)

    while progress() < 1.0:
        for g in opt.param_groups:
            g["lr"] = lr_at(progress(), lr)
        x, y = batch(step)
        out = model(x, y, logits_at=y != -100) if sparse_loss else model(x, y)
        loss = out.loss + out.aux_loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training diverged at step {step} (loss {float(loss)}); lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        spent += 3.0 * out.stats["flops"]
        tokens += x.numel()
        losses = (losses + [float(out.loss.detach())])[-10:]
        step += 1
        if hook is not None and pending and progress() >= pending[0]:
            seconds += time.perf_counter() - start
            while pending and progress() >= pending[0]:
                pending.pop(0)
            hook(spent, tokens)
            model.train()
            start = time.perf_counter()
    seconds += time.perf_counter() - start
    return TrainResult(step, spent, tokens, seconds, sum(losses) / max(len(losses), 1))


def step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> float:
    """Training FLOPs of one step on ``x`` as the model counts them (3 × one forward)."""
    with torch.no_grad():
        return 3.0 * model(x, y).stats["flops"]


def command_line() -> str | None:
    """The ``looplm ...`` command this process runs, if it was started as ``looplm`` (else None)."""
    if Path(sys.argv[0]).name != "looplm":
        return None
    return " ".join(["looplm", *(shlex.quote(a) for a in sys.argv[1:])])


class Sweep:
    """Resumable results of a sweep: ``<out>/<name>.json`` holds the settings and one result per
    finished configuration, keyed by a name that encodes what the sweep varies (``swept`` settings:
    left out of the comparison). A rerun with the same other settings skips finished keys and keeps
    earlier results (so a sweep can be extended); different settings start over. Prints which
    configuration runs and the ETA from the mean time of the ones run so far."""

    def __init__(self, out: str | Path, name: str, settings: dict[str, Any], *, swept: tuple[str, ...] = (),
                 quiet: bool = False) -> None:
        self.out = Path(out)
        self.path = self.out / f"{name}.json"
        self.name, self.settings, self.swept, self.quiet = name, settings, swept, quiet
        self.results: dict[str, Any] = {}
        if self.path.exists():
            data = json.loads(self.path.read_text())
            if self._shared(data.get("settings", {})) == self._shared(json.loads(json.dumps(settings))):
                self.results = data.get("results", {})
            elif not quiet:
                print(f"{self.path}: settings changed, starting over")

    def _shared(self, settings: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in settings.items() if k not in self.swept}

    def save(self, **extra: Any) -> Path:
        """Write the JSON atomically (a temporary file renamed over the old one)."""
        self.out.mkdir(parents=True, exist_ok=True)
        data = {"bench": self.name, "command": command_line(), "settings": self.settings,
                "results": self.results, **extra}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=False))
        os.replace(tmp, self.path)
        return self.path

    def run(self, jobs: Iterable[tuple[str, Callable[[], dict[str, Any]]]]) -> dict[str, Any]:
        """Run each ``(key, job)`` not already finished, storing its result after each one."""
        jobs = list(jobs)
        todo = [(k, j) for k, j in jobs if k not in self.results]
        if not self.quiet and len(todo) < len(jobs):
            print(f"{self.name}: {len(jobs) - len(todo)} of {len(jobs)} configurations already done")
        start = time.perf_counter()
        for i, (key, job) in enumerate(todo):
            if not self.quiet:
                elapsed = time.perf_counter() - start
                eta = f", ETA {elapsed / i * (len(todo) - i) / 60:.1f} min" if i else ""
                print(f"[{i + 1}/{len(todo)}] {key}{eta}", flush=True)
            self.results[key] = job()
            self.save()
        return self.results


def subplots(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (5.0, 4.0)) -> tuple[Any, Any]:
    """A matplotlib figure (Agg backend, no display needed) and a 2-D array of axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)


def log_axes(axes: Any, xlabel: str, ylabels: Sequence[str], titles: Sequence[str],
             legend_size: int = 8) -> None:
    """Each of ``axes`` log-log (x in powers of two) with ``xlabel``, its y label and title, a legend."""
    for ax, ylabel, title in zip(axes, ylabels, titles):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=legend_size)
        ax.set_title(title)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG (150 dpi) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; floats with 4 significant digits."""
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
