"""The training loop: one ``TrainConfig`` drives a run from first step to last checkpoint.

AdamW + schedule (``optim.py``), batches as a function of the step
(``looplm.data.BatchSampler``: the data position is the step),
atomic resumable checkpoints (``run_checkpoint.py``), DDP when launched by torchrun
(``distributed.py``), or FSDP2 with ``fsdp`` (``fsdp.py``). The model is any module whose
``forward(x, y)`` returns an object with ``loss`` (mean cross-entropy, nats) and optionally
``aux_loss`` and ``stats``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from looplm.data.loader import BatchSampler, eval_batches
from looplm.errors import CheckpointError, ConfigError, LoopLMError
from looplm.routers import causal_routing, sees_future
from looplm.train import distributed, fsdp
from looplm.train.config import TrainConfig
from looplm.train.distributed import Dist
from looplm.train.optim import build_optimizer, lr_at, set_lr
from looplm.train.run_checkpoint import clean_partial, list_checkpoints, load_checkpoint, save_checkpoint
from looplm.train.run_dir import lock_on_rank0, release


class DivergedError(LoopLMError):
    """Training produced non-finite losses too many steps in a row."""


def _stats(out: Any) -> dict[str, Any]:
    """The model's stats as JSON-able numbers (scalars → float, small tensors → lists)."""
    stats = getattr(out, "stats", None) or {}
    clean = {}
    for key, value in stats.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().float()
            value = value.item() if value.numel() == 1 else [round(v, 5) for v in value.flatten().tolist()]
        if isinstance(value, (int, float, list)):
            clean[key] = value
    return clean


def _autocast(d: Dist, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=d.device.type, dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    token_bytes: torch.Tensor | None = None,
    d: Dist | None = None,
    bf16: bool = False,
) -> dict[str, float]:
    """Validation loss (nats/token) and bits per byte = nll_nats / (bytes · ln 2).

    ``token_bytes`` [V]: UTF-8 bytes each token id stands for (None: no bits per byte).
    Expert-choice routers (MoR, MoD) route by their causal threshold rule, as decoding does;
    where one is set to top-k over the sequence (which sees future tokens), that result is also
    given, as ``val_loss_topk`` / ``val_bpb_topk``.
    """
    d = d or Dist()
    batches = list(batches)
    with causal_routing(model):
        result = _evaluate(model, batches, token_bytes, d, bf16)
    if sees_future(model):
        topk = _evaluate(model, batches, token_bytes, d, bf16)
        result.update({f"{k}_topk": v for k, v in topk.items()})
    return result


def _evaluate(model: nn.Module, batches: list, token_bytes: torch.Tensor | None, d: Dist,
              bf16: bool) -> dict[str, float]:
    was_training = model.training
    model.eval()
    nll = n_tok = n_bytes = 0.0
    for x, y in batches:
        x, y = x.to(d.device), y.to(d.device)
        with _autocast(d, bf16):
            out = model(x, y)
        nll += out.loss.float().item() * y.numel()
        n_tok += y.numel()
        if token_bytes is not None:
            n_bytes += token_bytes[y.cpu()].sum().item()
    model.train(was_training)
    nll, n_tok, n_bytes = distributed.all_sum([nll, n_tok, n_bytes], d)
    result = {"val_loss": nll / max(n_tok, 1)}
    if token_bytes is not None and n_bytes > 0:
        result["val_bpb"] = nll / (n_bytes * math.log(2))
    return result


class MetricsLog:
    """metrics.jsonl (rank 0 only), plus TensorBoard when the package is installed.

    On resume the lines a killed run wrote after its checkpoint are dropped, and so is a last
    line it was killed in the middle of (said through ``log``); a broken line elsewhere is an error.
    """

    def __init__(self, path: Path, resume_step: int | None, enabled: bool,
                 log: Callable[[str], None] = print):
        self.path, self.enabled, self.tb = path, enabled, None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():  # drop lines the killed run wrote after its checkpoint
            keep = [ln for ln, row in self._rows(path, log) if row["step"] <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))
        elif path.exists():
            path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tb"))
        except ImportError:
            pass

    @staticmethod
    def _rows(path: Path, log: Callable[[str], None]) -> list[tuple[str, dict[str, Any]]]:
        """(line, row) of each complete line of ``path``; a partial last line is dropped."""
        lines = path.read_text(errors="replace").split("\n")
        rows = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                    raise ValueError("no step")
            except ValueError:
                if i == len(lines) - 1:  # no newline after it: the write was cut short
                    log(f"{path}: dropped a partial last line (the run was killed while writing it)")
                    continue
                raise CheckpointError(f"{path}, line {i + 1}, is not a metrics row; "
                                      "remove or fix that line, then --resume again") from None
            rows.append((line, row))
        return rows

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def total_steps(cfg: TrainConfig) -> int:
    """``cfg.steps``, shortened by the token budget when one is set."""
    if cfg.max_tokens:
        return max(1, min(cfg.steps, math.ceil(cfg.max_tokens / (cfg.batch_size * cfg.seq_len))))
    return cfg.steps


def _forward_backward(
    net: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, cfg: TrainConfig, d: Dist,
    extra_loss: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
) -> tuple[float, dict[str, Any]]:
    """Gradients of ``loss + aux_loss`` (+ ``extra_loss(x, out)``, e.g. distillation) over this
    rank's ``grad_accum`` micro-batches (DDP syncs on the last); returns the LM loss averaged over
    all ranks and the model's stats."""
    if len(x_all) % cfg.grad_accum:
        raise ConfigError(f"each process's {len(x_all)} sequences do not split into "
                          f"grad_accum={cfg.grad_accum} micro-batches; change train.grad_accum")
    micro = list(zip(x_all.chunk(cfg.grad_accum), y_all.chunk(cfg.grad_accum)))
    loss_sum = torch.zeros((), device=d.device)
    stats: dict[str, Any] = {}
    for i, (x, y) in enumerate(micro):
        x, y = x.to(d.device), y.to(d.device)
        sync = d.world == 1 or i == len(micro) - 1
        held = contextlib.nullcontext() if sync else (
            net.no_sync() if isinstance(net, DistributedDataParallel) else fsdp.no_sync(net))
        with held, _autocast(d, cfg.bf16):
            out = net(x, y)
            aux = getattr(out, "aux_loss", None)
            total = out.loss if aux is None else out.loss + aux
            if extra_loss is not None:
                total = total + extra_loss(x, out)
            (total / len(micro)).backward()
        loss_sum += out.loss.detach().float()
        stats = _stats(out)
    return distributed.all_sum([loss_sum.item() / len(micro)], d)[0] / d.world, stats


def _schedule_step(step: int, elapsed: float, run: dict[str, Any], cfg: TrainConfig, budget_s: float) -> int:
    """The step the schedule is at. Under a time budget, after the warmup (counted in steps),
    whichever is further along, steps or the time left, so the learning rate has decayed
    when the budget ends (such a run is not bit-reproducible)."""
    w = cfg.warmup_steps
    if not budget_s or step < w:
        return step
    start = run.setdefault("warm_s", elapsed)  # the clock when the warmup ended
    frac = (elapsed - start) / max(budget_s - start, 1e-9)
    return max(step, min(w + int((cfg.steps - w) * frac), cfg.steps - 1))


def train(
    cfg: TrainConfig,
    model: nn.Module,
    train_data: BatchSampler,
    val_tokens: np.ndarray | None = None,
    *,
    d: Dist | None = None,
    resume: bool = False,
    token_bytes: torch.Tensor | None = None,
    extras: Callable[[Path], None] | None = None,
    sample: Callable[[nn.Module], str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    extra_loss: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (already seeded and built) under ``cfg``; return the last metrics row.

    ``train_data`` yields this rank's share of the global batch ``cfg.batch_size``;
    ``val_tokens`` [N] is the validation split (``cfg.eval_iters`` batches of it are read).

    ``extras(dir)`` writes run files into each checkpoint (tokenizer); ``sample(model)``
    returns text printed at each evaluation (run under a forked RNG, so it changes nothing).
    ``extra_loss(x, out)``: a term added to each micro-batch's loss (train/finetune.py's
    distillation); the logged loss stays the LM loss.
    """
    d = d or Dist()
    run_dir = Path(cfg.out)
    lock_on_rank0(run_dir, d)
    steps = total_steps(cfg)
    sched = dataclasses.replace(cfg, steps=steps)
    model.to(d.device).train()
    sharded = cfg.fsdp and d.world > 1
    if sharded:
        fsdp.shard(model)
        if d.main:
            log(f"FSDP2: weights, gradients and optimizer state sharded over {d.world} processes")
    optimizer = build_optimizer(model, cfg)
    run: dict[str, Any] = {"tokens": 0, "bad_steps": 0, "best_val": math.inf}
    start, resume_step = 0, None
    existing = list_checkpoints(run_dir)
    if resume and existing:
        run = (fsdp.load_full(existing[-1][1], model, optimizer, cfg) if sharded
               else load_checkpoint(existing[-1][1], model, optimizer))
        start = resume_step = run.pop("step")
        if not isinstance(run.get("data"), dict):
            raise CheckpointError(f"cannot resume from {existing[-1][1]}: no data position in its state")
        train_data.load_state_dict(run["data"])  # checks the data and batch settings match
        if start >= steps:
            log(f"{run_dir} is already finished (step {start} of {steps}); "
                "pass a larger --steps with --resume to train further")
            if d.main:
                release(run_dir)
            return {"step": start, "finished": True}
        log(f"resuming {run_dir} from step {start}")
    elif existing:
        raise ConfigError(f"{run_dir} already holds checkpoints; pass --resume or choose another --out")
    elif resume:
        log(f"no checkpoint in {run_dir}: starting from step 0")
    if d.main:
        clean_partial(run_dir)
    distributed.barrier(d)
    net = DistributedDataParallel(model) if d.world > 1 and not sharded else model
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step, d.main, log)
    bar = tqdm(total=steps, initial=start, disable=not (progress and d.main), dynamic_ncols=True, unit="step")
    tokens_per_step = cfg.batch_size * cfg.seq_len
    t0 = time.perf_counter() - run.get("elapsed_s", 0.0)  # wall time of the run, across resumes
    window_t, window_steps = time.perf_counter(), 0
    budget_s, elapsed = cfg.max_minutes * 60, run.get("elapsed_s", 0.0)
    row: dict[str, Any] = {}
    last_loss = math.nan
    for step in range(start, steps):
        lr = lr_at(_schedule_step(step, elapsed, run, sched, budget_s), sched)
        set_lr(optimizer, lr)
        loss, stats = _forward_backward(net, *train_data.batch(step), cfg, d, extra_loss)
        grad_norm = fsdp.local(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf))
        if not (math.isfinite(loss) and torch.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            run["bad_steps"] += 1
            metrics.write({"step": step + 1, "skipped": True, "loss": str(loss)})
            log(f"step {step + 1}: non-finite loss/gradient ({loss}); step skipped")
            if run["bad_steps"] >= cfg.max_bad_steps:
                raise DivergedError(
                    f"loss was NaN/inf {run['bad_steps']} steps in a row (at step {step + 1}); "
                    "lower train.lr, keep train.grad_clip > 0, or turn off train.bf16"
                )
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run["bad_steps"] = 0
            last_loss = loss
        run["tokens"] += tokens_per_step
        window_steps += 1
        done = step + 1
        now = time.perf_counter()
        elapsed = run["elapsed_s"] = distributed.broadcast_float(now - t0, d) if budget_s else now - t0
        out_of_time = bool(budget_s) and elapsed >= budget_s
        last = done == steps or out_of_time
        if done % cfg.log_interval == 0 or last:
            tps = window_steps * tokens_per_step / max(now - window_t, 1e-9)
            row = {"step": done, "loss": last_loss, "lr": lr, "tokens": run["tokens"], "tokens_per_s": tps,
                   "grad_norm": float(grad_norm), "elapsed_s": now - t0, **stats}
            metrics.write(row)
            left = {"budget_left": f"{(budget_s - elapsed) / 60:.1f}min"} if budget_s else {}
            bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tps:,.0f}", **left, refresh=False)
            window_t, window_steps = now, 0
        bar.update(1)
        if done % cfg.eval_interval == 0 or last:
            row = {**row, "step": done}
            is_best = False
            if val_tokens is not None:
                val = eval_batches(val_tokens, cfg.batch_size // d.world, cfg.seq_len,
                                   max_batches=cfg.eval_iters, rank=d.rank, world_size=d.world)
                ev = evaluate(model, val, token_bytes, d, cfg.bf16)
                is_best = ev["val_loss"] < run["best_val"]
                run["best_val"] = min(run["best_val"], ev["val_loss"])
                metrics.write({"step": done, "tokens": run["tokens"], "elapsed_s": now - t0, **ev})
                row.update(ev)
                bpb = f", val bits/byte {ev['val_bpb']:.3f}" if "val_bpb" in ev else ""
                if d.main:
                    bar.write(f"step {done}: val loss {ev['val_loss']:.4f}{bpb}")
            if sample is not None and cfg.sample_tokens > 0 and d.main and not sharded:  # (one rank)
                with torch.random.fork_rng(devices=[]):
                    text = sample(model)
                bar.write(f"--- sample at step {done} ---\n{text}\n---")
            train_data.step = done
            run["data"] = train_data.state_dict()
            whole = fsdp.full_state(model, optimizer, cfg) if sharded else (model, optimizer)
            if d.main and whole is not None:  # (sharded: gathered onto a plain copy on rank 0)
                saved, saved_opt = whole
                save_checkpoint(run_dir, done, saved, saved_opt, dict(run), extras, cfg.keep_last, is_best)
            distributed.barrier(d)
        if out_of_time:
            log(f"time budget of {cfg.max_minutes} min reached at step {done}")
            break
    bar.close()
    metrics.close()
    if d.main:
        release(run_dir)
    return row
