"""``looplm bench lm``: compute-matched language modelling (Languini; MoR, Bae et al. 2025).

Every model trains on the same batches (byte tokens of the default stdlib corpus, or ``--data``)
until the training FLOPs it counted itself reach the same budget (3 × the forward FLOPs of what
each token actually ran, routers included), then is evaluated on the validation split in bits per
byte. The models share width, heads and the 6-layer effective depth of the vanilla Transformer:

- ``transformer``: 6 attention layers, dense SwiGLU;
- ``gated_deltanet``: the same with gated DeltaNet mixers; ``hybrid``: gated DeltaNet with every
  3rd layer attention (2:1);
- ``recursive``: middle-cycle sharing, 1 unique layer, one shared layer applied 4 times, 1 unique
  layer (3 unique layers, 6 effective), no router;
- ``mor_expert``: the same with MoR's expert-choice router (hierarchical keep 1, 3/4, 1/2, 1/4);
- ``mor_token`` / ``mor_token_kv``: token-choice router, without / with recursive KV sharing;
- ``moe``: the Transformer with an MoE FFN (4 experts of half width, top-2: same active FLOPs).

Writes ``lm.json`` (resumable: a finished model is skipped) and ``lm.png`` (val bits/byte against
training FLOPs and against unique parameters).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from looplm.bench.runner import Sweep, markdown_table, save_figure, subplots, train_model
from looplm.data.corpus import prepare_corpus
from looplm.data.loader import BatchSampler, eval_batches
from looplm.model import LoopConfig, LoopLM
from looplm.train.loop import evaluate

CURVE_AT = (0.25, 0.5, 0.75)  # fractions of the budget where validation is also measured (the curves)
RECUR = dict(n_prelude=1, n_core=1, n_coda=1, n_recursions=4, sharing="middle_cycle")
VARIANTS: dict[str, dict[str, Any]] = {
    "transformer": dict(n_core=6),
    "gated_deltanet": dict(n_core=6, mixer="gated_deltanet"),
    "hybrid": dict(n_core=6, mixer="gated_deltanet", attn_every=3),
    "recursive": dict(RECUR),
    "mor_expert": dict(RECUR, router="expert_choice"),
    "mor_token": dict(RECUR, router="token_choice"),
    "mor_token_kv": dict(RECUR, router="token_choice", kv_sharing=True),
    "moe": dict(n_core=6, ffn="moe", n_experts=4, top_k=2, d_ffn_scale=0.5),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--flops", type=float, default=4e11, help="training FLOPs budget per model")
    parser.add_argument("--models", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-heads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-batches", type=int, default=16, help="validation batches (of --batch-size)")
    parser.add_argument("--data", default=None, help="corpus source (default: the Python stdlib)")
    parser.add_argument("--max-files", type=int, default=None, help="only the first N files of the corpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="bench_results/lm")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tests)")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    s = dict(flops=args.flops, models=args.models, d_model=args.d_model, n_heads=args.n_heads,
             seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, eval_batches=args.eval_batches,
             data=args.data, max_files=args.max_files, seed=args.seed)
    if args.quick:
        s.update(flops=2e8, d_model=32, n_heads=2, seq_len=32, batch_size=4, eval_batches=2,
                 max_files=s["max_files"] or 20)
    return s


def model_config(name: str, s: dict[str, Any], vocab: int) -> LoopConfig:
    """The LoopConfig of variant ``name`` at the sweep's width."""
    opts = dict(VARIANTS[name])
    scale = opts.pop("d_ffn_scale", None)
    base = LoopConfig(vocab_size=vocab, d_model=s["d_model"], n_heads=s["n_heads"], max_seq_len=s["seq_len"])
    if scale:
        opts["d_ffn"] = int(base.ffn_dim * scale)
    return LoopConfig.from_dict({**base.to_dict(), **opts})


def run_one(name: str, s: dict[str, Any], corpus: Any) -> dict[str, Any]:
    """Train variant ``name`` to the FLOPs budget, then measure validation bits per byte."""
    torch.manual_seed(s["seed"])
    model = LoopLM(model_config(name, s, corpus.tokenizer.vocab_size))
    sampler = BatchSampler(corpus.train, s["batch_size"], s["seq_len"], seed=s["seed"])
    token_bytes = torch.from_numpy(corpus.tokenizer.token_nbytes())
    curve = []

    def validate(flops: float, tokens: int) -> dict[str, float]:
        val = eval_batches(corpus.val, s["batch_size"], s["seq_len"], max_batches=s["eval_batches"])
        ev = evaluate(model, val, token_bytes)
        curve.append({"flops": flops, "tokens": tokens, "val_bpb": ev["val_bpb"]})
        return ev

    res = train_model(model, sampler.batch, budget=s["flops"], lr=s["lr"], hook=validate, hook_at=CURVE_AT)
    ev = validate(res.flops, res.tokens)
    return {"model": name, "val_bpb": ev["val_bpb"], "val_loss": ev["val_loss"], "train_loss": res.train_loss,
            "flops": res.flops, "tokens": res.tokens, "steps": res.steps, "seconds": res.seconds,
            "tokens_per_s": res.tokens_per_s, "flops_per_token": res.flops / max(res.tokens, 1),
            "params_unique": model.num_params(), "params_applied": model.num_params(unique=False),
            "curve": curve}


def plot(results: dict[str, Any], path: Path) -> Path:
    """Left: val bits/byte against training FLOPs spent (measured at 1/4, 1/2, 3/4 and all of the
    budget). Right: final val bits/byte against unique parameters (the Pareto view)."""
    fig, axes = subplots(2, 1, size=(5.2, 4.0))
    left, right = axes[0]
    for r in results.values():
        pts = r.get("curve") or [{"flops": r["flops"], "val_bpb": r["val_bpb"]}]
        line = left.plot([p["flops"] for p in pts], [p["val_bpb"] for p in pts], marker="o", ms=3,
                         label=r["model"])[0]
        right.scatter(r["params_unique"], r["val_bpb"], color=line.get_color())
        right.annotate(r["model"], (r["params_unique"], r["val_bpb"]), fontsize=7, xytext=(3, 3),
                       textcoords="offset points")
    left.set_xscale("log")
    left.set_xlabel("training FLOPs spent (as counted by the model)")
    left.set_title("compute-matched LM: val bits/byte vs FLOPs")
    left.legend(fontsize=7)
    right.set_xscale("log")
    right.set_xlabel("unique parameters")
    right.set_title("at the full budget: vs unique parameters")
    for ax in (left, right):
        ax.set_ylabel("validation bits per byte")
    return save_figure(fig, path)


def table(results: dict[str, Any]) -> str:
    rows = sorted(results.values(), key=lambda r: r["val_bpb"])
    body = [[r["model"], f"{r['val_bpb']:.3f}", f"{r['flops']:.3g}", f"{r['params_unique'] / 1e6:.2f}M",
             f"{r['params_applied'] / 1e6:.2f}M", r["tokens"], f"{r['flops_per_token'] / 1e6:.2f}M",
             f"{r['tokens_per_s']:.0f}"] for r in rows]
    header = ["model", "val bits/byte", "train FLOPs", "unique params", "applied params", "tokens seen",
              "FLOPs/token", "tokens/s"]
    return markdown_table(header, body)


def run(args: argparse.Namespace) -> int:
    s = settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = prepare_corpus(s["data"], "byte", max_files=s["max_files"])
    out = Path(args.out)
    sweep = Sweep(out, "lm", s, swept=("models",), quiet=args.quick)
    results = sweep.run((name, lambda n=name: run_one(n, s, corpus)) for name in s["models"])
    sweep.save(table=table(results))
    plot(results, out / "lm.png")
    if not args.quick:
        print(table(results))
    print(f"wrote {sweep.path} and {out / 'lm.png'}")
    return 0
