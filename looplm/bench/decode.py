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

``--state-format float int8``: each model also decodes with its state held in int8 (or FP8):
attention caches quantised from the first token and read in chunks (:mod:`looplm.quant.state`).
Then per point also ``peak_bytes``: the state's bytes plus the largest resident-set growth during
the timed steps (``VmHWM`` reset through ``/proc/self/clear_refs`` after freed memory is handed
back with ``malloc_trim``; Linux/glibc only, else the state's bytes alone). The summary prints
each format's peak and step time over float's at the same context.

``hold_ms`` (every format, the table's "hold ms" column): the median time of holding one more
token in the state's format, apart from the attention that reads it — each cache appends one
token's keys and values (:func:`looplm.layers.kv_cache.append_rows`: a quantised cache quantises
only the new rows) and the state is stored and loaded again (a quantised format's
``compress_state`` / ``decompress_state``), ``--tokens`` times in a row after the timed steps: the
holding work of the per-layer step (the whole-stack C++ step quantises the new rows inside its
call). It must not grow with the context (copying or re-scanning the stored context would show).
Each result also records the C++ ops a decoding step calls (``kernels``) and the 1-minute load
average before and after it (``load``): a loaded machine makes every timing incomparable.

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
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.profiler import profile

from looplm.argtypes import positive_int
from looplm.bench.runner import Sweep, log_axes, markdown_table, save_figure, subplots
from looplm.errors import ConfigError
from looplm.generate import decoding_mode
from looplm.layers import kv_cache
from looplm.layers.mixer_states import KVState
from looplm.memory import release_free_memory
from looplm.model import LoopConfig, LoopLM
from looplm.quant.state import STATE_FORMATS, compress_state, decompress_state
from looplm.state import ModelState

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
    parser.add_argument("--state-format", nargs="+", default=["float"], choices=["float", *STATE_FORMATS],
                        help="decode with the state held in these formats (float: as computed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--out", default="bench_results/decode")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tests)")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    s = dict(contexts=sorted(args.contexts), models=args.models, d_model=args.d_model, n_heads=args.n_heads,
             tokens=args.tokens, chunk=args.chunk, seed=args.seed, threads=torch.get_num_threads(),
             state_formats=list(dict.fromkeys(args.state_format)))
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


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (VmRSS, VmHWM), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _reset_peak_rss() -> int | None:
    """Hand freed memory back (glibc), reset the peak RSS; the RSS now in KiB, None where unsupported."""
    try:
        release_free_memory()
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):
        return None
    return _status_kib("VmRSS")


def hold_ms(live: ModelState, store: Any, load: Any, reps: int, seed: int) -> float:
    """Median ms of holding one more token in ``live``'s format (a decoded state, its caches
    the newest of their buffers): every cache appends one token's random keys and values
    (``kv_cache.append_rows``), then the state is stored and loaded; ``reps`` times in a row."""
    gen = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(reps):
        rows = {name: (torch.randn(s.k.shape[0], 1, *s.k.shape[2:], generator=gen),
                       torch.randn(s.v.shape[0], 1, *s.v.shape[2:], generator=gen))
                for name, s in live.layers.items() if isinstance(s, KVState)}
        t0 = time.perf_counter()
        layers = dict(live.layers)
        for name, (k, v) in rows.items():
            s = layers[name]
            ones = torch.ones(k.shape[0], 1, dtype=torch.bool)
            layers[name] = kv_cache.append_rows(s, k, v, ones, s.seen[:, None], s.seen + 1)
        live = load(store(ModelState(live.positions + 1, layers)))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


@torch.no_grad()
def run_one(name: str, s: dict[str, Any], fmt: str = "float") -> dict[str, Any]:
    """Prefill ``name`` to each context length and time ``tokens`` decoding steps there, the state
    held in ``fmt`` (float: as computed; else quantised between steps, caches from the start)."""
    torch.manual_seed(s["seed"])
    cfg = LoopConfig(vocab_size=VOCAB, d_model=s["d_model"], n_heads=s["n_heads"],
                     max_seq_len=max(s["contexts"]) + s["tokens"] + 1, **VARIANTS[name])
    model = LoopLM(cfg)
    gen = torch.Generator().manual_seed(s["seed"])
    prompt = torch.randint(0, VOCAB, (1, max(s["contexts"])), generator=gen)
    if fmt == "float":
        store, load = (lambda st: st), (lambda st: st)
    else:
        store, load = (lambda st: compress_state(st, fmt)), decompress_state
    points, load_before = [], _load_average()
    with decoding_mode(model):
        state, done, out = store(model.init_state(1)), 0, None
        for ctx in s["contexts"]:
            start = time.perf_counter()
            for i in range(done, ctx, s["chunk"]):
                out = model(prompt[:, i:min(i + s["chunk"], ctx)], state=load(state))
                state = store(out.state)
            prefill_s = time.perf_counter() - start
            done = ctx
            if out is None:
                raise ConfigError(f"contexts must be positive, got {ctx}")
            token, step_state, times = out.logits[:, -1].argmax(-1, keepdim=True), state, []
            base = _reset_peak_rss()
            for _ in range(s["tokens"]):
                t0 = time.perf_counter()
                o = model(token, state=load(step_state))
                step_state = store(o.state)
                times.append(time.perf_counter() - t0)
                token = o.logits[:, -1].argmax(-1, keepdim=True)
            peak = _status_kib("VmHWM")
            growth = 0 if base is None or peak is None else max(0, peak - base) * 1024
            points.append({"context": ctx, "ms_per_token": 1e3 * statistics.median(times),
                           "hold_ms": hold_ms(load(step_state), store, load, s["tokens"], s["seed"]),
                           "state_bytes": state.nbytes(), "peak_bytes": state.nbytes() + growth,
                           "rss_mb": rss_mb(), "prefill_s": prefill_s, "reach": out.stats.get("reach")})
        kernels = step_kernels(model, token, load(step_state))
    return {"model": name, "format": fmt, "params": model.num_params(), "points": points,
            "kernels": kernels, "load": [load_before, _load_average()]}


def step_kernels(model: LoopLM, token: torch.Tensor, state: ModelState) -> list[str]:
    """The C++ ops (``looplm::*``) one decoding step of ``model`` calls (profiled, not timed); an
    empty list: every layer ran PyTorch's own ops."""
    with profile() as prof:
        model(token, state=state)
    return sorted({e.name for e in prof.events() if e.name.startswith("looplm::")})


def _key(model: str, fmt: str) -> str:
    """A result's key: the model's name, with ``@fmt`` for a quantised state."""
    return model if fmt == "float" else f"{model}@{fmt}"


def format_ratios(results: dict[str, Any]) -> list[str]:
    """Lines: each quantised format's peak memory and step time over float's, per model and context."""
    lines = []
    for key, r in results.items():
        ref = results.get(_key(r["model"], "float"))
        if r.get("format", "float") == "float" or ref is None:
            continue
        for p, f in zip(r["points"], ref["points"]):
            peak = p["peak_bytes"] / f["state_bytes"]
            lines.append(f"{key} @{p['context']}: peak memory {peak:.2f}x the float "
                         f"state ({p['state_bytes'] / f['state_bytes']:.2f}x stored), step "
                         f"{p['ms_per_token'] / f['ms_per_token']:.2f}x float's, holding a token "
                         f"{p.get('hold_ms', float('nan')):.3f} ms "
                         f"({f.get('hold_ms', float('nan')):.3f} float)")
    return lines


def format_conditions(results: dict[str, Any]) -> list[str]:
    """Lines: what each model's layers decode with, and the load average around its run."""
    lines = []
    for key, r in results.items():
        kernels = ", ".join(r.get("kernels", [])) or "PyTorch ops only"
        load = [f"{x:.2f}" for x in r.get("load", []) if x is not None]
        lines.append(f"{key}: a step calls {kernels}; 1-min load average "
                     f"{' -> '.join(load) or '?'}")
    return lines


def plot(results: dict[str, Any], path: Path) -> Path:
    """Latency per token and state memory against context length (log-log), one line per model."""
    fig, axes = subplots(2, 1, size=(4.8, 3.8))
    for key, r in results.items():
        ctx = [p["context"] for p in r["points"]]
        axes[0][0].plot(ctx, [p["ms_per_token"] for p in r["points"]], marker="o", label=key)
        axes[0][1].plot(ctx, [p["state_bytes"] / 2**20 for p in r["points"]], marker="o", label=key)
    log_axes(axes[0], "context length (tokens)", ("ms per decoded token (median)", "decoding state (MiB)"),
             ("decoding latency", "decoding memory"))
    return save_figure(fig, path)


def table(results: dict[str, Any]) -> str:
    rows = []
    for r in results.values():
        for p in r["points"]:
            rss = "" if p["rss_mb"] is None else f"{p['rss_mb']:.0f}"
            mib = p["state_bytes"] / 2**20
            hold = f"{p['hold_ms']:.3f}" if "hold_ms" in p else ""
            rows.append([f"{r['model']} ({r.get('format', 'float')})", p["context"],
                         f"{p['ms_per_token']:.2f}", hold, f"{mib:.2f}", rss, f"{p['prefill_s']:.2f}"])
    header = ["model", "context", "ms/token", "hold ms", "state MiB", "process RSS MiB",
              "prefill s (this increment)"]
    return markdown_table(header, rows)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    s = settings(args)
    out = Path(args.out)
    sweep = Sweep(out, "decode", s, swept=("models", "state_formats"), quiet=args.quick)
    results = sweep.run((_key(name, fmt), partial(run_one, name, s, fmt))
                        for name in s["models"] for fmt in s["state_formats"])
    sweep.save(table=table(results))
    plot(results, out / "decode.png")
    if not args.quick:
        print(table(results))
    for line in format_ratios(results) + format_conditions(results):
        print(line)
    print(f"wrote {sweep.path} and {out / 'decode.png'}")
    return 0
