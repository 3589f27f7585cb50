"""``looplm bench mqar``: multi-query associative recall (Zoology, Arora et al. 2023).

Trains a 2-layer LoopLM from scratch for every (mixer, width, sequence length) and reports the
accuracy of its argmax prediction at the answer positions of held-out MQAR data (another seed).
``hybrid`` is gated DeltaNet with the second layer attention. Fixed-state heads are 64 wide
(``d // 64`` heads), so the state grows with the width, as in Zoology; attention has one head.

Set for a small CPU machine while keeping Zoology's task:
- vocabulary ``2·T`` per task by default (Zoology needs ``vocab > T``; it uses 8192, but a large
  embedding would dominate these tiny models);
- the output head runs only at the answer positions (the loss is only there; ``LoopLM.forward``'s
  ``logits_at``), in training and evaluation: ~30% of a step at width 64 and T=256;
- almost no MLP, as Zoology's MQAR models: ``d_ffn = 1`` by default (a rank-one SwiGLU, what the
  recorded results used; ``--d-ffn 0`` drops the FFN entirely, ``ffn="none"``), which makes a step
  ~2.5× cheaper;
- a fresh batch per step (seeded by the step), learning rate per mixer (attention 1e-3: at 3e-3
  it stays on the ``1/pairs`` plateau; fixed-state mixers 3e-3), and an early stop once the
  accuracy on a validation set (a third seed) reaches ``--target``;
- configurations run in ``--workers`` processes of one thread each, largest first.

The default sweep (:data:`DEFAULT_TASKS`) is sized for about half an hour of two cores: widths 64
and 256 on sequences of 64 with 4 pairs, and the longer tasks (128 with 16 pairs, 256 with 32) at
width 64 with as many tokens per step (fewer sequences). ``--seq-lens`` (with ``--pairs``,
``--widths``, ``--steps``, ``--batch-size``) runs any other grid; ``--steps`` and ``--batch-size``
take one value or one per task.

Writes ``mqar.json`` (settings + one result per configuration, resumable) and ``mqar.png``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from looplm.argtypes import positive_int
from looplm.bench.runner import Sweep, markdown_table, save_figure, subplots, train_model
from looplm.data.mqar import IGNORE_INDEX, check_mqar_args, make_mqar
from looplm.model import MIXERS, LoopConfig, LoopLM

KINDS = (*MIXERS, "hybrid")
DEFAULT_MIXERS = ["attention", "linear", "gla", "deltanet", "gated_deltanet"]
LR = {"attention": 1e-3}  # every other kind: DEFAULT_LR
DEFAULT_LR = 3e-3


@dataclass(frozen=True)
class Task:
    """One MQAR task of the default sweep and how it is trained: the widths it runs, the sequences
    per step and the most steps."""

    seq_len: int
    pairs: int
    widths: tuple[int, ...]
    batch_size: int
    steps: int


# The default sweep, sized for about half an hour of two cores (docs/results.md, MQAR): widths 64
# and 256 (4x the state) on the short task, the longer tasks with more pairs at width 64. Every task
# has 4096 tokens per step (fewer, longer sequences), so a step costs about the same; at T=128,
# 32 sequences of 1000 steps learned more than 64 of 500 or 16 of 2000.
DEFAULT_TASKS = (
    Task(64, 4, (64, 256), 64, 1000),
    Task(128, 16, (64,), 32, 1500),
    Task(256, 32, (64,), 16, 800),
)
WIDTHS = [64, 128, 256]  # every task's widths when --seq-lens is given
BATCH_SIZE, STEPS = 64, 1000  # likewise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tasks = ", ".join(f"T={t.seq_len} {t.pairs} pairs widths {'/'.join(map(str, t.widths))} "
                      f"batch {t.batch_size} steps {t.steps}" for t in DEFAULT_TASKS)
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size, even (default 2 × seq len)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None,
                        help=f"sequence length of each task (default: the tasks {tasks})")
    parser.add_argument("--pairs", type=int, nargs="+", default=None,
                        help="key-value pairs per sequence, one per --seq-lens (default 4)")
    parser.add_argument("--widths", type=int, nargs="+", default=None,
                        help=f"widths of every task (default: the default tasks' own; with --seq-lens "
                             f"{WIDTHS})")
    parser.add_argument("--mixers", nargs="+", default=DEFAULT_MIXERS, choices=KINDS)
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help=f"most optimizer steps per configuration: one value, or one per task "
                             f"(default: the default tasks' own; with --seq-lens {STEPS})")
    parser.add_argument("--batch-size", type=int, nargs="+", default=None,
                        help=f"sequences per step: one value, or one per task (default: the default tasks' "
                             f"own; with --seq-lens {BATCH_SIZE})")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"learning rate (default per mixer: {LR}, others {DEFAULT_LR})")
    parser.add_argument("--d-ffn", type=int, default=1,
                        help="MLP width (0: no MLP, as Zoology; 1: rank-one SwiGLU, the default)")
    parser.add_argument("--target", type=float, default=0.99, help="stop once validation accuracy reaches it")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between validation checks")
    parser.add_argument("--val-examples", type=int, default=256)
    parser.add_argument("--test-examples", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes, one configuration each")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads per worker (default 1 with several workers, else torch's)")
    parser.add_argument("--out", default="bench_results/mqar")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tests)")


def _one_or_per_task(flag: str, values: list[int], n: int) -> int | list[int]:
    """A flag's values as stored in the settings: one int for every task, else one per task."""
    if len(values) not in (1, n):
        raise ValueError(f"{flag} needs one value or one per --seq-lens ({n}), got {values}")
    return values[0] if len(set(values)) == 1 else list(values)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The sweep's settings (the resume key) from the flags; ``--quick`` shrinks everything.

    ``widths`` is a list of ints (every task) or one list per task; ``steps`` and ``batch_size``
    an int (every task) or one per task (read them with :func:`task_widths`, :func:`task_value`)."""
    keys = ("vocab", "mixers", "lr", "d_ffn", "target", "eval_every", "val_examples", "test_examples", "seed")
    s: dict[str, Any] = {k: getattr(args, k) for k in keys}
    default = args.seq_lens is None and not args.quick  # the default tasks (--pairs may change their pairs)
    seq_lens = [t.seq_len for t in DEFAULT_TASKS] if default else (args.seq_lens or [32])
    pairs = args.pairs or ([t.pairs for t in DEFAULT_TASKS] if default else [4])
    if len(pairs) != len(seq_lens):
        raise ValueError(f"--pairs needs one value per --seq-lens {seq_lens}, got {pairs}")
    n = len(seq_lens)

    def pick(flag: str, given: list[int] | None, own: str, fallback: int) -> int | list[int]:
        values = given or ([getattr(t, own) for t in DEFAULT_TASKS] if default else [fallback])
        return _one_or_per_task(flag, values, n)

    steps = pick("--steps", args.steps, "steps", STEPS)
    batch = pick("--batch-size", args.batch_size, "batch_size", BATCH_SIZE)
    widths = args.widths or ([list(t.widths) for t in DEFAULT_TASKS] if default else WIDTHS)
    if widths and isinstance(widths[0], list) and all(w == widths[0] for w in widths):
        widths = widths[0]
    s.update(seq_lens=seq_lens, pairs=pairs, widths=widths, steps=steps, batch_size=batch)
    if args.quick:
        s.update(vocab=32, seq_lens=[32], pairs=[4], widths=[32], mixers=["attention", "gated_deltanet"],
                 steps=3, batch_size=4, eval_every=2, val_examples=8, test_examples=8)
    for t, p in zip(s["seq_lens"], s["pairs"]):
        check_mqar_args(vocab_for(s, t), t, p)
    return s


def task_widths(s: dict[str, Any], task: int) -> list[int]:
    """The widths task number ``task`` (index into ``seq_lens``) runs."""
    w = s["widths"]
    return list(w[task]) if w and isinstance(w[0], list) else list(w)


def task_value(s: dict[str, Any], key: str, task: int) -> int:
    """``steps`` or ``batch_size`` of task number ``task``."""
    v = s[key]
    return v[task] if isinstance(v, list) else v


def vocab_for(s: dict[str, Any], seq_len: int) -> int:
    """The vocabulary of a task: ``--vocab``, else ``2 · seq_len``."""
    return s["vocab"] or 2 * seq_len


def lr_for(s: dict[str, Any], kind: str) -> float:
    """``--lr`` if given, else the per-mixer rule (:data:`LR`, :data:`DEFAULT_LR`)."""
    return s["lr"] or LR.get(kind, DEFAULT_LR)


def model_config(kind: str, width: int, vocab: int, seq_len: int, d_ffn: int | None = None) -> LoopConfig:
    """A 2-layer LoopLM of ``kind`` (a mixer or ``hybrid``); ``d_ffn`` None: LoopLM's default MLP,
    0: no MLP (``ffn="none"``), else a SwiGLU that wide.
    Fixed-state heads are 64 wide (the state grows with the width); attention has one head, as
    Zoology's baseline (its cache does not depend on the heads; see docs/results.md for why)."""
    mixer, every = ("gated_deltanet", 2) if kind == "hybrid" else (kind, 0)
    heads = 1 if kind == "attention" else max(1, width // 64)
    return LoopConfig(vocab_size=vocab, d_model=width, n_heads=heads, n_core=2, mixer=mixer,
                      attn_every=every, max_seq_len=seq_len, chunk_size=min(64, seq_len),
                      ffn="none" if d_ffn == 0 else "dense", d_ffn=d_ffn or None)


@torch.no_grad()
def accuracy(model: LoopLM, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 64) -> float:
    """Fraction of answer positions (targets != -100) where the argmax prediction is the value."""
    model.eval()
    right = total = 0
    for i in range(0, len(inputs), batch_size):
        y = targets[i:i + batch_size]
        m = y != IGNORE_INDEX
        pred = model(inputs[i:i + batch_size], logits_at=m).logits.argmax(-1)  # the head at the answers only
        right += int((pred == y[m]).sum())
        total += int(m.sum())
    model.train()
    return right / max(total, 1)


class _Saturated(Exception):
    """Raised by the validation hook to end training early."""


def run_one(kind: str, width: int, seq_len: int, n_pairs: int, s: dict[str, Any], *,
            batch_size: int | None = None, steps: int | None = None) -> dict[str, Any]:
    """Train one configuration from scratch (until ``steps`` or the validation target) and evaluate it
    on held-out data. ``batch_size`` and ``steps`` default to the settings' (ints for every task).
    Data seeds: test ``2·seed+1``, validation ``2·seed+2``, the batch of step i ``(seed + 1) · 2^32 + i``."""
    torch.manual_seed(s["seed"])
    vocab = vocab_for(s, seq_len)
    data = dict(vocab_size=vocab, seq_len=seq_len, n_pairs=n_pairs)
    test = make_mqar(s["test_examples"], seed=s["seed"] * 2 + 1, **data)
    val = make_mqar(s["val_examples"], seed=s["seed"] * 2 + 2, **data)
    model = LoopLM(model_config(kind, width, vocab, seq_len, s["d_ffn"]))
    b, steps = batch_size or s["batch_size"], steps or s["steps"]

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = make_mqar(b, seed=(s["seed"] + 1) * 2**32 + step, **data)
        return d.inputs, d.targets

    curve: list[list[float]] = []

    def check(flops: float, tokens: int) -> None:
        curve.append([tokens // (b * seq_len), round(accuracy(model, val.inputs, val.targets), 4)])
        if curve[-1][1] >= s["target"]:
            raise _Saturated

    start = time.perf_counter()
    every = max(1, min(s["eval_every"], steps))
    try:
        ran = train_model(model, batch, steps=steps, lr=lr_for(s, kind), hook=check, sparse_loss=True,
                          hook_at=[i / steps for i in range(every, steps + 1, every)]).steps
    except _Saturated:
        ran = int(curve[-1][0])
    seconds = time.perf_counter() - start
    with torch.no_grad():
        state = model(test.inputs[:1], use_cache=True).state  # after one full sequence
    return {"mixer": kind, "width": width, "seq_len": seq_len, "n_pairs": n_pairs, "vocab": vocab,
            "accuracy": accuracy(model, test.inputs, test.targets), "lr": lr_for(s, kind),
            "batch_size": b, "steps": ran, "val_curve": curve,
            "state_bytes": state.nbytes(), "params": model.num_params(), "seconds": round(seconds, 1)}


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_jobs(sweep: Sweep, jobs: list[tuple[str, tuple[Any, ...], dict[str, Any]]], workers: int,
             threads: int | None) -> dict[str, Any]:
    """Run ``run_one(*args, **kwargs)`` for each ``(key, args, kwargs)`` not finished yet, in
    ``workers`` processes (``threads`` torch threads each), storing each result as it arrives."""
    todo = [(k, a, kw) for k, a, kw in jobs if k not in sweep.results]
    if len(todo) < len(jobs) and not sweep.quiet:
        print(f"mqar: {len(jobs) - len(todo)} of {len(jobs)} configurations already done")
    if workers <= 1:
        if threads:
            torch.set_num_threads(threads)
        return sweep.run([(k, partial(run_one, *a, **kw)) for k, a, kw in todo])
    start = time.perf_counter()
    # fork starts a worker in milliseconds; torch's thread pools are set after it (initializer)
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads or 1,)) as pool:
        futures = {pool.submit(run_one, *a, **kw): k for k, a, kw in todo}
        for i, fut in enumerate(as_completed(futures), 1):
            key = futures[fut]
            sweep.results[key] = r = fut.result()
            sweep.save()
            if not sweep.quiet:
                mins = (time.perf_counter() - start) / 60
                print(f"[{i}/{len(todo)}] {key}: acc {r['accuracy']:.3f} after {r['steps']} steps, "
                      f"{r['seconds']:.0f} s ({mins:.1f} min elapsed)", flush=True)
    return sweep.results


def plot(results: dict[str, Any], path: Path, vocab: int | None = None) -> Path:
    """One panel per (sequence length, pairs): accuracy against width, one line per mixer, or bars
    per mixer when the task ran one width; a dotted line at chance (a uniform guess among the
    ``vocab / 2`` values)."""
    rows = list(results.values())
    tasks = sorted({(r["seq_len"], r["n_pairs"]) for r in rows})
    kinds = list(dict.fromkeys(r["mixer"] for r in rows))
    color = {k: f"C{i}" for i, k in enumerate(kinds)}
    fig, axes = subplots(len(tasks), 1, size=(4.5, 3.6))
    for ax, (t, p) in zip(axes[0], tasks):
        mine = [r for r in rows if (r["seq_len"], r["n_pairs"]) == (t, p)]
        widths = sorted({r["width"] for r in mine})
        if len(widths) == 1:
            bars = [(k, r["accuracy"]) for k in kinds for r in mine if r["mixer"] == k]
            ax.bar(range(len(bars)), [a for _, a in bars], color=[color[k] for k, _ in bars])
            ax.set_xticks(range(len(bars)), [k for k, _ in bars], rotation=30, ha="right", fontsize=8)
            ax.set_xlabel(f"mixer (width {widths[0]})")
        else:
            for kind in kinds:
                pts = sorted((r["width"], r["accuracy"]) for r in mine if r["mixer"] == kind)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=kind, color=color[kind])
            ax.set_xscale("log", base=2)
            ax.set_xticks(widths, [str(w) for w in widths])
            ax.set_xlabel("model width")
        v = vocab or next(r.get("vocab") for r in rows if r["seq_len"] == t)
        if v:
            ax.axhline(2 / v, ls=":", color="gray", label="chance")
        if len(widths) > 1:
            ax.legend(fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"MQAR seq {t}, {p} pairs")
        ax.set_ylabel("test accuracy")
    return save_figure(fig, path)


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per (mixer, width), per task the accuracy and the steps it trained."""
    rows = list(results.values())
    tasks = sorted({(r["seq_len"], r["n_pairs"]) for r in rows})
    acc = {(r["mixer"], r["width"], r["seq_len"], r["n_pairs"]): r for r in rows}
    keys = sorted(dict.fromkeys((r["mixer"], r["width"]) for r in rows),
                  key=lambda k: (KINDS.index(k[0]) if k[0] in KINDS else len(KINDS), k[1]))
    body = []
    for kind, w in keys:
        cells = [acc.get((kind, w, t, p)) for t, p in tasks]
        state = next((c["state_bytes"] for c in cells if c), 0)
        body.append([kind, w, f"{state / 1024:.0f}"]
                    + [f"{c['accuracy']:.3f} ({c['steps']})" if c else "" for c in cells])
    header = ["mixer", "width", "state KiB (first task)"] + [f"acc (steps) T={t} pairs={p}" for t, p in tasks]
    return markdown_table(header, body)


def run(args: argparse.Namespace) -> int:
    s = settings(args)
    out = Path(args.out)
    sweep = Sweep(out, "mqar", s, swept=("seq_lens", "pairs", "widths", "mixers"), quiet=args.quick)
    jobs = [(f"{kind}-d{w}-T{t}-p{p}", (kind, w, t, p, s),
             {"batch_size": task_value(s, "batch_size", i), "steps": task_value(s, "steps", i)})
            for i, (t, p) in enumerate(zip(s["seq_lens"], s["pairs"])) for w in task_widths(s, i)
            for kind in s["mixers"]]
    # the largest first (cost ~ steps · sequences · T · width²): balances the workers
    jobs.sort(key=lambda j: -j[2]["steps"] * j[2]["batch_size"] * j[1][2] * j[1][1] ** 2)
    start = time.perf_counter()
    results = run_jobs(sweep, jobs, args.workers, args.threads)
    sweep.save(table=table(results))
    plot(results, out / "mqar.png", s["vocab"])
    if not args.quick:
        print(table(results))
        print(f"{(time.perf_counter() - start) / 60:.1f} min")
    print(f"wrote {sweep.path} and {out / 'mqar.png'}")
    return 0
