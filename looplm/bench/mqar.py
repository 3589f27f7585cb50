"""``looplm bench mqar``: multi-query associative recall (Zoology, Arora et al. 2023).

Trains a 2-layer LoopLM from scratch for every (mixer, width, sequence length) and reports the
accuracy of its argmax prediction at the answer positions of held-out MQAR data (another seed).
``hybrid`` is gated DeltaNet with the second layer attention. Heads are 64 wide (``d // 64``
heads), so a fixed-state mixer's state grows with the width, as in Zoology.

The vocabulary is kept modest (default 128, Zoology uses 8192) because LoopLM computes logits at
every position and the output head would dominate the cost of these 2-layer models; with 128 the
keys and values still come from disjoint halves of 64 tokens each (up to 32 pairs fit).

Writes ``mqar.json`` (settings + one result per configuration, resumable) and ``mqar.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from looplm.bench.runner import Sweep, markdown_table, save_figure, subplots, train_model
from looplm.data.mqar import IGNORE_INDEX, check_mqar_args, make_mqar
from looplm.model import MIXERS, LoopConfig, LoopLM

KINDS = (*MIXERS, "hybrid")
DEFAULT_MIXERS = ["attention", "linear", "gla", "deltanet", "gated_deltanet"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab", type=int, default=128, help="vocabulary size (even)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[64])
    parser.add_argument("--pairs", type=int, nargs="+", default=None,
                        help="key-value pairs per sequence, one per --seq-lens (default seq_len // 16)")
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--mixers", nargs="+", default=DEFAULT_MIXERS, choices=KINDS)
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps per configuration")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-examples", type=int, default=20000, help="training set (then epochs)")
    parser.add_argument("--test-examples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="bench_results/mqar")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tests)")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The sweep's settings (the resume key) from the flags; ``--quick`` shrinks everything."""
    if args.quick:
        s = dict(vocab=32, seq_lens=[32], pairs=[4], widths=[32], mixers=["attention", "gated_deltanet"],
                 steps=3, batch_size=4, lr=args.lr, train_examples=16, test_examples=8, seed=args.seed)
    else:
        s = dict(vocab=args.vocab, seq_lens=args.seq_lens, pairs=args.pairs, widths=args.widths,
                 mixers=args.mixers, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                 train_examples=args.train_examples, test_examples=args.test_examples, seed=args.seed)
    if s["pairs"] is None:
        s["pairs"] = [max(1, t // 16) for t in s["seq_lens"]]
    if len(s["pairs"]) != len(s["seq_lens"]):
        raise ValueError(f"--pairs needs one value per --seq-lens ({len(s['seq_lens'])}), got {s['pairs']}")
    for t, p in zip(s["seq_lens"], s["pairs"]):
        check_mqar_args(s["vocab"], t, p)
    return s


def model_config(kind: str, width: int, vocab: int, seq_len: int) -> LoopConfig:
    """A 2-layer LoopLM of ``kind`` (a mixer or ``hybrid``), heads 64 wide."""
    mixer, every = ("gated_deltanet", 2) if kind == "hybrid" else (kind, 0)
    return LoopConfig(vocab_size=vocab, d_model=width, n_heads=max(1, width // 64), n_core=2, mixer=mixer,
                      attn_every=every, max_seq_len=seq_len, chunk_size=min(64, seq_len))


@torch.no_grad()
def accuracy(model: LoopLM, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 64) -> float:
    """Fraction of answer positions (targets != -100) where the argmax prediction is the value."""
    model.eval()
    right = total = 0
    for i in range(0, len(inputs), batch_size):
        y = targets[i:i + batch_size]
        pred = model(inputs[i:i + batch_size]).logits.argmax(-1)
        m = y != IGNORE_INDEX
        right += int((pred[m] == y[m]).sum())
        total += int(m.sum())
    model.train()
    return right / max(total, 1)


def run_one(kind: str, width: int, seq_len: int, n_pairs: int, s: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration from scratch and evaluate it on held-out data."""
    torch.manual_seed(s["seed"])
    data = dict(vocab_size=s["vocab"], seq_len=seq_len, n_pairs=n_pairs)
    train = make_mqar(s["train_examples"], seed=s["seed"] * 2 + 1, **data)
    test = make_mqar(s["test_examples"], seed=s["seed"] * 2 + 2, **data)
    model = LoopLM(model_config(kind, width, s["vocab"], seq_len))
    n, b = s["train_examples"], s["batch_size"]

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(step * b, (step + 1) * b) % n
        return train.inputs[idx], train.targets[idx]

    res = train_model(model, batch, steps=s["steps"], lr=s["lr"])
    with torch.no_grad():
        state = model(test.inputs[:1], use_cache=True).state  # after one full sequence
    return {"mixer": kind, "width": width, "seq_len": seq_len, "n_pairs": n_pairs,
            "accuracy": accuracy(model, test.inputs, test.targets), "train_loss": res.train_loss,
            "state_bytes": state.nbytes(), "params": model.num_params(), "steps": res.steps,
            "seconds": res.seconds}


def plot(results: dict[str, Any], path: Path, vocab: int | None = None) -> Path:
    """Accuracy against width, one panel per (sequence length, pairs), one line per mixer; a dotted
    line at chance (a uniform guess among the ``vocab / 2`` values)."""
    rows = list(results.values())
    tasks = sorted({(r["seq_len"], r["n_pairs"]) for r in rows})
    fig, axes = subplots(len(tasks), 1, size=(4.5, 3.6))
    for ax, (t, p) in zip(axes[0], tasks):
        for kind in dict.fromkeys(r["mixer"] for r in rows):
            pts = sorted((r["width"], r["accuracy"]) for r in rows
                         if r["mixer"] == kind and (r["seq_len"], r["n_pairs"]) == (t, p))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=kind)
        if vocab:
            ax.axhline(2 / vocab, ls=":", color="gray", label="chance")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"MQAR seq {t}, {p} pairs")
        ax.set_xlabel("model width")
        ax.set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, path)


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per (mixer, width), one accuracy column per task."""
    rows = list(results.values())
    tasks = sorted({(r["seq_len"], r["n_pairs"]) for r in rows})
    acc = {(r["mixer"], r["width"], r["seq_len"], r["n_pairs"]): r for r in rows}
    keys = list(dict.fromkeys((r["mixer"], r["width"]) for r in rows))
    body = []
    for kind, w in keys:
        cells = [acc.get((kind, w, t, p)) for t, p in tasks]
        state = next((c["state_bytes"] for c in cells if c), 0)
        body.append([kind, w, f"{state / 1024:.0f}"] + [f"{c['accuracy']:.3f}" if c else "" for c in cells])
    header = ["mixer", "width", "state KiB (first task)"] + [f"acc T={t} pairs={p}" for t, p in tasks]
    return markdown_table(header, body)


def run(args: argparse.Namespace) -> int:
    s = settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    sweep = Sweep(out, "mqar", s, swept=("seq_lens", "pairs", "widths", "mixers"), quiet=args.quick)
    jobs = []
    for t, p in zip(s["seq_lens"], s["pairs"]):
        for w in s["widths"]:
            for kind in s["mixers"]:
                jobs.append((f"{kind}-d{w}-T{t}-p{p}", lambda k=kind, w=w, t=t, p=p: run_one(k, w, t, p, s)))
    results = sweep.run(jobs)
    sweep.save(table=table(results))
    plot(results, out / "mqar.png", s["vocab"])
    if not args.quick:
        print(table(results))
    print(f"wrote {sweep.path} and {out / 'mqar.png'}")
    return 0
