"""``looplm bench decode``: per-token decoding latency and memory against context length.

For each model (untrained weights: the cost of a step does not depend on them) the context is
prefilled in chunks up to each length of ``--contexts`` in turn (one growing state, so the
whole sweep costs one prefill of the longest context), and at each length ``--tokens`` greedy
steps are decoded from a copy of the state (states are never modified in place) and timed.

Memory, two measures: ``state_bytes`` — the exact bytes of the decoding state (KV caches, fixed
states, conv tails; ``ModelState.nbytes()``); ``rss_mb`` — the resident set size of the whole
process read from ``/proc/self/statm`` after the prefill (Linux only, else absent). RSS includes
weights, the interpreter and memory the allocator keeps, so it moves only when the state outgrows
what is already held; the state bytes are the clean curve.

Models (4 layers, width ``--d-model``): ``attention``; ``gated_deltanet`` (fixed state);
``hybrid`` (gated DeltaNet with the 4th layer attention, 3:1); ``mor`` (attention, middle-cycle,
one shared layer applied twice, expert-choice router in its causal threshold mode for decoding).
Writes ``decode.json`` (resumable per model) and ``decode.png``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from looplm.bench.runner import Sweep, markdown_table, save_figure, subplots
from looplm.errors import ConfigError
from looplm.generate import decoding_mode
from looplm.model import LoopConfig, LoopLM

VOCAB = 259  # the byte tokenizer's vocabulary
VARIANTS: dict[str, dict[str, Any]] = {
    "attention": dict(n_core=4),
    "gated_deltanet": dict(n_core=4, mixer="gated_deltanet"),
    "hybrid": dict(n_core=4, mixer="gated_deltanet", attn_every=4),
    "mor": dict(n_prelude=1, n_core=1, n_coda=1, n_recursions=2, sharing="middle_cycle",
                router="expert_choice"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--models", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-heads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16, help="decoded (timed) tokens per context length")
    parser.add_argument("--chunk", type=int, default=1024, help="prefill chunk length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="bench_results/decode")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tests)")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    s = dict(contexts=sorted(args.contexts), models=args.models, d_model=args.d_model, n_heads=args.n_heads,
             tokens=args.tokens, chunk=args.chunk, seed=args.seed, threads=torch.get_num_threads())
    for flag in ("contexts", "tokens", "chunk", "d_model", "n_heads"):
        if min(s[flag] if flag == "contexts" else [s[flag]]) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.quick:
        s.update(contexts=[16, 48], d_model=32, tokens=2, chunk=16)
    return s


def rss_mb() -> float | None:
    """Current resident set size of this process in MiB (Linux ``/proc``), else None."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@torch.no_grad()
def run_one(name: str, s: dict[str, Any]) -> dict[str, Any]:
    """Prefill ``name`` to each context length and time ``tokens`` decoding steps there."""
    torch.manual_seed(s["seed"])
    cfg = LoopConfig(vocab_size=VOCAB, d_model=s["d_model"], n_heads=s["n_heads"],
                     max_seq_len=max(s["contexts"]) + s["tokens"] + 1, **VARIANTS[name])
    model = LoopLM(cfg)
    gen = torch.Generator().manual_seed(s["seed"])
    prompt = torch.randint(0, VOCAB, (1, max(s["contexts"])), generator=gen)
    points = []
    with decoding_mode(model):
        state, done, out = model.init_state(1), 0, None
        for ctx in s["contexts"]:
            start = time.perf_counter()
            for i in range(done, ctx, s["chunk"]):
                out = model(prompt[:, i:min(i + s["chunk"], ctx)], state=state)
                state = out.state
            prefill_s = time.perf_counter() - start
            done = ctx
            token, step_state, times = out.logits[:, -1].argmax(-1, keepdim=True), state, []
            for _ in range(s["tokens"]):
                t0 = time.perf_counter()
                o = model(token, state=step_state)
                times.append(time.perf_counter() - t0)
                token, step_state = o.logits[:, -1].argmax(-1, keepdim=True), o.state
            points.append({"context": ctx, "ms_per_token": 1e3 * statistics.median(times),
                           "state_bytes": state.nbytes(), "rss_mb": rss_mb(), "prefill_s": prefill_s,
                           "reach": out.stats.get("reach")})
    return {"model": name, "params": model.num_params(), "points": points}


def plot(results: dict[str, Any], path: Path) -> Path:
    """Latency per token and state memory against context length (log-log), one line per model."""
    fig, axes = subplots(2, 1, size=(4.8, 3.8))
    for r in results.values():
        ctx = [p["context"] for p in r["points"]]
        axes[0][0].plot(ctx, [p["ms_per_token"] for p in r["points"]], marker="o", label=r["model"])
        axes[0][1].plot(ctx, [p["state_bytes"] / 2**20 for p in r["points"]], marker="o", label=r["model"])
    for ax, ylabel in zip(axes[0], ("ms per decoded token (median)", "decoding state (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    axes[0][0].set_title("decoding latency")
    axes[0][1].set_title("decoding memory")
    return save_figure(fig, path)


def table(results: dict[str, Any]) -> str:
    rows = []
    for r in results.values():
        for p in r["points"]:
            rss = "" if p["rss_mb"] is None else f"{p['rss_mb']:.0f}"
            mib = p["state_bytes"] / 2**20
            rows.append([r["model"], p["context"], f"{p['ms_per_token']:.2f}", f"{mib:.2f}", rss,
                         f"{p['prefill_s']:.2f}"])
    header = ["model", "context", "ms/token", "state MiB", "process RSS MiB", "prefill s (this increment)"]
    return markdown_table(header, rows)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    s = settings(args)
    out = Path(args.out)
    sweep = Sweep(out, "decode", s, swept=("models",), quiet=args.quick)
    results = sweep.run((name, lambda n=name: run_one(n, s)) for name in s["models"])
    sweep.save(table=table(results))
    plot(results, out / "decode.png")
    if not args.quick:
        print(table(results))
    print(f"wrote {sweep.path} and {out / 'decode.png'}")
    return 0
