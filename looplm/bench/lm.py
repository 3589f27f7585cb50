"""``looplm bench lm``: compute-matched language modelling (Languini; MoR, Bae et al. 2025).

Every model trains on the same batches (byte tokens of the default stdlib corpus, or ``--data``)
until the training FLOPs it counted itself reach the same budget (3 × the forward FLOPs of what
each token actually ran, routers included), then is evaluated on the validation split in bits per
byte — expert-choice routers (MoR, MoD) by the causal threshold rule decoding uses (the top-k
over the sequence, which sees future tokens, is reported beside it, never in the comparisons).
The models share width, heads and the 6-layer effective depth of the vanilla Transformer:

- ``transformer``: 6 attention layers, dense SwiGLU;
- ``gated_deltanet``: the same with gated DeltaNet mixers; ``hybrid``: gated DeltaNet with every
  3rd layer attention (2:1); ``mom``: mixture of memories (4 gated DeltaNet memories, top-2);
- ``recursive``: middle-cycle sharing, 1 unique layer, one shared layer applied 4 times, 1 unique
  layer (3 unique layers, 6 effective), no router;
- ``mor_expert``: the same with MoR's expert-choice router (hierarchical keep 1, 3/4, 1/2, 1/4);
- ``mor_token`` / ``mor_token_kv``: token-choice router, without / with recursive KV sharing;
- ``halting``: the same core under PonderNet halting;
- ``mod``: the Transformer with Mixture-of-Depths at capacity 12.5% on every other layer;
- ``moe``: the Transformer with an MoE FFN (4 experts of half width, top-2: same active FLOPs);
  ``moe_recurrent``: the same with RMoE's GRU router.

Each model runs with every ``--seeds`` seed; the table gives mean ± standard deviation and each
model's difference from the Transformer in standard errors (looplm/bench/lm_stats.py: ``better``
/ ``worse`` beyond 2σ), then which of the papers' claims hold at this scale. The scaling fit
``L(C) = E + A·C^(−α)`` runs the Transformer and the best MoR configuration (``best``: the
recursive model with the lowest mean at the full budget) at ``--flops`` × 1/8, 1/4, 1/2, 1.

Resumable (``lm.json``: a finished (model, budget, seed) is skipped) and splittable: ``--shard
i/n`` runs every n-th job into ``lm.shard-i-of-n.json``; any run reads all of them in ``--out``
for its table. Writes ``lm.png``: the mean curves (±1 std), bits/byte against unique parameters,
and the scaling points with their fits.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from looplm.argtypes import positive_int
from looplm.bench import lm_stats
from looplm.bench.runner import Sweep, markdown_table, save_figure, subplots, train_model
from looplm.data.corpus import prepare_corpus
from looplm.data.loader import BatchSampler, eval_batches
from looplm.errors import ConfigError
from looplm.model import LoopConfig, LoopLM
from looplm.train.loop import evaluate

CURVE_AT = (0.25, 0.5, 0.75)  # fractions of the budget where validation is also measured (the curves)
SCALING_AT = (0.125, 0.25, 0.5, 1.0)  # fractions of --flops of the scaling fit's budgets (x2 apart)
RECUR = dict(n_prelude=1, n_core=1, n_coda=1, n_recursions=4, sharing="middle_cycle")
MOE = dict(n_core=6, ffn="moe", n_experts=4, top_k=2, d_ffn_scale=0.5)
VARIANTS: dict[str, dict[str, Any]] = {
    "transformer": dict(n_core=6),
    "recursive": dict(RECUR),
    "mor_expert": dict(RECUR, router="expert_choice"),
    "mor_token": dict(RECUR, router="token_choice"),
    "mor_token_kv": dict(RECUR, router="token_choice", kv_sharing=True),
    "mod": dict(n_core=6, layer_router="mod", mod_capacity=0.125),
    "halting": dict(RECUR, router="halting"),
    "gated_deltanet": dict(n_core=6, mixer="gated_deltanet"),
    "hybrid": dict(n_core=6, mixer="gated_deltanet", attn_every=3),
    "mom": dict(n_core=6, mixer="mom", memories=4, memory_top_k=2),
    "moe": dict(MOE),
    "moe_recurrent": dict(MOE, moe_router="recurrent"),
}
RECURSIVE = ("recursive", "mor_expert", "mor_token", "mor_token_kv", "halting")  # candidates for "best"
SWEPT = ("models", "seeds", "scaling_models")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--flops", type=float, default=4e11, help="training FLOPs budget per model")
    parser.add_argument("--models", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds per model (>= 3 for "
                        "the verdicts to mean much)")
    parser.add_argument("--scaling-models", nargs="*", default=["transformer", "best"],
                        choices=[*VARIANTS, "best"], help="models of the scaling fit ('best': the best "
                        "recursive one at --flops); none: no fit")
    parser.add_argument("--shard", default=None, help="i/n: run only every n-th job, starting at i (0-based)")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-heads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-batches", type=int, default=16, help="validation batches (of --batch-size)")
    parser.add_argument("--data", default=None, help="corpus source (default: the Python stdlib)")
    parser.add_argument("--max-files", type=int, default=None, help="only the first N files of the corpus")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--out", default="bench_results/lm")
    parser.add_argument("--quick", action="store_true", help="a minutes-long smoke run at a tiny size")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    s = dict(flops=args.flops, models=args.models, seeds=sorted(set(args.seeds)),
             scaling_models=args.scaling_models, d_model=args.d_model, n_heads=args.n_heads,
             seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, eval_batches=args.eval_batches,
             data=args.data, max_files=args.max_files)
    if args.quick:
        s.update(flops=2e8, d_model=32, n_heads=2, seq_len=32, batch_size=4, eval_batches=2,
                 max_files=s["max_files"] or 20)
    return s


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must be i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard {text}: need 0 <= i < n")
    return i, n


def model_config(name: str, s: dict[str, Any], vocab: int) -> LoopConfig:
    """The LoopConfig of variant ``name`` at the sweep's width."""
    opts = dict(VARIANTS[name])
    scale = opts.pop("d_ffn_scale", None)
    base = LoopConfig(vocab_size=vocab, d_model=s["d_model"], n_heads=s["n_heads"], max_seq_len=s["seq_len"])
    if scale:
        opts["d_ffn"] = int(base.ffn_dim * scale)
    return LoopConfig.from_dict({**base.to_dict(), **opts})


def job_key(name: str, flops: float, seed: int) -> str:
    return f"{name}@{flops:.4g}/seed{seed}"


def run_one(name: str, flops: float, seed: int, s: dict[str, Any], corpus: Any) -> dict[str, Any]:
    """Train variant ``name`` with ``seed`` to ``flops``, then measure validation bits per byte."""
    torch.manual_seed(seed)
    model = LoopLM(model_config(name, s, corpus.tokenizer.vocab_size))
    sampler = BatchSampler(corpus.train, s["batch_size"], s["seq_len"], seed=seed)
    token_bytes = torch.from_numpy(corpus.tokenizer.token_nbytes())
    curve = []

    def validate(spent: float, tokens: int) -> dict[str, float]:
        val = eval_batches(corpus.val, s["batch_size"], s["seq_len"], max_batches=s["eval_batches"])
        ev = evaluate(model, val, token_bytes)
        curve.append({"flops": spent, "tokens": tokens, "val_bpb": ev["val_bpb"]})
        return ev

    res = train_model(model, sampler.batch, budget=flops, lr=s["lr"], hook=validate, hook_at=CURVE_AT)
    ev = validate(res.flops, res.tokens)
    return {"model": name, "budget": flops, "seed": seed, **ev, "train_loss": res.train_loss,
            "flops": res.flops, "tokens": res.tokens, "steps": res.steps, "seconds": res.seconds,
            "tokens_per_s": res.tokens_per_s, "flops_per_token": res.flops / max(res.tokens, 1),
            "params_unique": model.num_params(), "params_applied": model.num_params(unique=False),
            "curve": curve}


def runs_of(results: dict[str, Any], name: str, flops: float) -> list[dict[str, Any]]:
    return [r for r in results.values() if r["model"] == name and abs(r["budget"] - flops) <= 1e-6 * flops]


def best_recursive(results: dict[str, Any], s: dict[str, Any]) -> str | None:
    """The recursive variant with the lowest mean bits/byte at the full budget, once every model
    of the sweep has all its seeds there (None before)."""
    done = {n: runs_of(results, n, s["flops"]) for n in s["models"] if n in RECURSIVE}
    if not done or any(len(v) < len(s["seeds"]) for v in done.values()):
        return None
    return min(done, key=lambda n: lm_stats.mean_std([r["val_bpb"] for r in done[n]])[0])


def scaling_names(results: dict[str, Any], s: dict[str, Any]) -> list[str]:
    names = []
    for n in s["scaling_models"]:
        n = best_recursive(results, s) if n == "best" else n
        if n is not None and n not in names:
            names.append(n)
    return names


def summary(results: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    """Per model at the full budget: mean ± std and the verdict against the Transformer; the
    claims; the scaling fit."""
    rows: dict[str, Any] = {}
    ref = [r["val_bpb"] for r in runs_of(results, "transformer", s["flops"])]
    for name in s["models"]:
        runs = runs_of(results, name, s["flops"])
        if not runs:
            continue
        bpb = [r["val_bpb"] for r in runs]
        row = {"seeds": len(runs), "val_bpb": lm_stats.mean_std(bpb),
               "params_unique": runs[0]["params_unique"], "params_applied": runs[0]["params_applied"],
               "flops_per_token": float(np.mean([r["flops_per_token"] for r in runs])),
               "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in runs]))}
        if "val_bpb_topk" in runs[0]:
            row["val_bpb_topk"] = lm_stats.mean_std([r["val_bpb_topk"] for r in runs])
        if ref and name != "transformer":
            row["vs_transformer"] = lm_stats.verdict(bpb, ref)
        rows[name] = row
    out: dict[str, Any] = {"models": rows, "claims": claims(rows)}
    names = scaling_names(results, s)
    points = {n: {f * s["flops"]: [r["val_bpb"] for r in runs_of(results, n, f * s["flops"])]
                  for f in SCALING_AT} for n in names}
    points = {n: p for n, p in points.items() if all(p.values())}
    if points:
        out["scaling"] = lm_stats.scaling(points)
    return out


def claims(rows: dict[str, Any]) -> list[dict[str, Any]]:
    """The papers' claims at this scale, each ``{claim, holds, margin}`` (None: not measured)."""
    out = []
    base = rows.get("transformer")
    for name in RECURSIVE:
        if name in rows and base and "vs_transformer" in rows[name]:
            v = rows[name]["vs_transformer"]
            fewer = rows[name]["params_unique"] < base["params_unique"]
            out.append({"claim": f"{name} beats the Transformer at equal FLOPs with fewer unique parameters",
                        "holds": v["verdict"] == "better" and fewer, "margin": v["margin"]})
    for name, text in (("mod", "MoD (12.5%, every other layer) matches or beats the Transformer"),
                       ("hybrid", "the hybrid matches the Transformer"),
                       ("gated_deltanet", "gated DeltaNet matches the Transformer")):
        v = rows.get(name, {}).get("vs_transformer")
        out.append({"claim": text, "holds": None if v is None else v["verdict"] != "worse",
                    "margin": None if v is None else v["margin"]})
    return out


def table(summ: dict[str, Any]) -> str:
    rows = sorted(summ["models"].items(), key=lambda kv: kv[1]["val_bpb"][0])
    body = []
    for name, r in rows:
        m, sd = r["val_bpb"]
        v = r.get("vs_transformer")
        topk = f"{r['val_bpb_topk'][0]:.3f}" if "val_bpb_topk" in r else ""
        body.append([name, r["seeds"], f"{m:.3f} ± {sd:.3f}", topk,
                     "" if v is None else f"{v['delta']:+.3f} ({v['margin']:+.1f}σ) {v['verdict']}",
                     f"{r['params_unique'] / 1e6:.2f}M", f"{r['flops_per_token'] / 1e6:.2f}M",
                     f"{r['tokens_per_s']:.0f}"])
    header = ["model", "seeds", "val bits/byte (causal routing)", "top-k routing (sees the future)",
              "vs transformer", "unique params", "FLOPs/token", "tokens/s"]
    lines = [markdown_table(header, body), ""]
    for c in summ["claims"]:
        state = "not measured" if c["holds"] is None else "holds" if c["holds"] else "refuted"
        margin = "" if c["margin"] is None else f" ({c['margin']:+.1f}σ)"
        lines.append(f"- {c['claim']}: {state}{margin}")
    sc = summ.get("scaling")
    if sc:
        for name, f in sc["fits"].items():
            lines.append(f"- fit {name}: L(C) = {f['E']:.3f} ± {f['E_std']:.3f} + {f['A']:.3g}·C^-"
                         f"({f['alpha']:.3f} ± {f['alpha_std']:.3f})"
                         + (" (α at the search bound: no power law in these points)" if f["alpha_at_bound"]
                            else ""))
        if "pair" in sc:
            where = "no crossing" if sc["crossing"] is None else f"cross at C = {sc['crossing']:.3g}"
            lines.append(f"- {' and '.join(sc['pair'])}: {where} (curves cross in {sc['cross_share']:.0%} "
                         "of the bootstrap draws)")
    return "\n".join(lines)


def plot(results: dict[str, Any], summ: dict[str, Any], s: dict[str, Any], path: Path) -> Path:
    """Left: mean val bits/byte (±1 std over seeds) against training FLOPs. Middle: at the full
    budget against unique parameters. Right: the scaling budgets and the fitted L(C)."""
    fig, axes = subplots(3, 1, size=(5.2, 4.0))
    left, mid, right = axes[0]
    for name in summ["models"]:
        runs = runs_of(results, name, s["flops"])
        curves = [r["curve"] for r in runs if len(r["curve"]) == len(runs[0]["curve"])]
        x = np.mean([[p["flops"] for p in c] for c in curves], 0)
        y = np.array([[p["val_bpb"] for p in c] for c in curves])
        line = left.plot(x, y.mean(0), marker="o", ms=3, label=name)[0]
        if len(y) > 1:
            left.fill_between(x, y.mean(0) - y.std(0, ddof=1), y.mean(0) + y.std(0, ddof=1),
                              color=line.get_color(), alpha=0.2)
        m, sd = summ["models"][name]["val_bpb"]
        p = summ["models"][name]["params_unique"]
        mid.errorbar([p], [m], yerr=[sd], fmt="o", color=line.get_color())
        mid.annotate(name, (p, m), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for name, f in summ.get("scaling", {}).get("fits", {}).items():
        c = np.array([float(b) for b in f["points"]])
        ms = np.array(list(f["points"].values()))
        line = right.errorbar(c, ms[:, 0], yerr=ms[:, 1], fmt="o", label=name)
        grid = np.logspace(np.log10(c.min() / 2), np.log10(c.max() * 4), 100)
        right.plot(grid, lm_stats.predict(f, grid), color=line[0].get_color())
    left.set_xlabel("training FLOPs spent (as counted by the model)")
    left.set_title("compute-matched LM: mean ± std over seeds")
    left.legend(fontsize=6)
    mid.set_xlabel("unique parameters")
    mid.set_title("at the full budget")
    right.set_xlabel("training FLOPs budget")
    right.set_title("scaling fit L(C) = E + A C^-α")
    if summ.get("scaling"):
        right.legend(fontsize=7)
    for ax in (left, mid, right):
        ax.set_xscale("log")
        ax.set_ylabel("validation bits per byte")
    return save_figure(fig, path)


def merged_results(out: Path, s: dict[str, Any]) -> dict[str, Any]:
    """Results of every lm*.json in ``out`` run with these settings (all shards)."""
    merged: dict[str, Any] = {}
    for path in sorted(out.glob("lm*.json")):
        merged.update(Sweep(out, path.stem, s, swept=SWEPT, quiet=True).results)
    return merged


def run(args: argparse.Namespace) -> int:
    s = settings(args)
    shard, n_shards = parse_shard(args.shard)
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = prepare_corpus(s["data"], "byte", max_files=s["max_files"])
    out = Path(args.out)
    name = "lm" if n_shards == 1 else f"lm.shard-{shard}-of-{n_shards}"
    sweep = Sweep(out, name, s, swept=SWEPT, quiet=args.quick)
    sweep.results.update(merged_results(out, s))

    def jobs(pairs: list[tuple[str, float]]) -> list[tuple[str, Any]]:
        todo = [(m, f, seed) for m, f in pairs for seed in s["seeds"]]
        return [(job_key(m, f, seed), lambda m=m, f=f, seed=seed: run_one(m, f, seed, s, corpus))
                for m, f, seed in todo[shard::n_shards]]

    sweep.run(jobs([(m, s["flops"]) for m in s["models"]]))
    sweep.results.update(merged_results(out, s))
    names = scaling_names(sweep.results, s)
    if "best" in s["scaling_models"] and best_recursive(sweep.results, s) is None and not args.quick:
        print("scaling fit: the best recursive model is chosen once every shard's full-budget runs are done; "
              "rerun then")
    sweep.run(jobs([(m, f * s["flops"]) for m in names for f in SCALING_AT if f < 1]))
    sweep.results.update(merged_results(out, s))
    summ = summary(sweep.results, s)
    sweep.save(summary=summ, table=table(summ))
    plot(sweep.results, summ, s, out / "lm.png")
    print(table(summ))
    print(f"wrote {sweep.path} and {out / 'lm.png'}")
    return 0
