"""``looplm bench convert CKPT``: the pretrained model made cheaper three ways, against itself.

Rows (each a JSON file in ``--out/rows``; a rerun skips rows already there and resumes their
fine-tunes, so the full table can be built over several sessions):

- ``original``: the checkpoint as imported (e.g. ``looplm import`` of SmolLM2-135M).
- ``hybrid``: ``linearize --mixer gla --keep-attention 4 --window W`` (Liger GLA + Liger
  Attention, one attention layer in four; the normalised read-out, linearize's default), then a
  LoRA fine-tune (rank ``--lora``) with KL distillation from the original for ``--minutes``.
- ``linear``: the same with every layer linearised.
- ``truncated``: the first third of the layers (the papers' baseline), fully fine-tuned
  ``--minutes``.
- ``recursive``: ``recursify --recursions 3 --init average --lora RANK`` (one third of the unique
  layers), fully uptrained ``--minutes``.
- ``mor``: the uptrained recursive model plus an expert-choice MoR router, trained ``--minutes``
  (top-k selection over the sequence), measured with the router's causal threshold selection.

Figures per row: perplexity on the first ``--eval-tokens`` tokens of two held-out texts
(``/usr/share/common-licenses/GPL-3`` and the stdlib's ``pprint.py``, both outside the ``finetune``
corpus the fine-tunes read), its ratio to the original; the decoding state's bytes at a
``--context``-token context and greedy decode tokens/s there (the state is filled with random keys
and values of that length: a step's cost depends on the state's size, not its values), the
ratios to the original; the same decode figure with the model's weights in int4 (groups of 32,
embedding and head too; not for the recursive rows, whose per-recursion LoRA stays unmerged); forward
FLOPs per token at the evaluation window. Fine-tunes run as
``looplm train --init`` subprocesses (``--data finetune``). Writes ``convert.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from looplm.argtypes import positive_int
from looplm.bench.common import machine_info, markdown_table, write_json
from looplm.bench.pretrained import PROSE, code_text, read_text
from looplm.checkpoint import load_model
from looplm.convert.files import write_converted
from looplm.convert.linearize import linearize
from looplm.convert.recursify import recursify
from looplm.data.tokenizer import load_tokenizer
from looplm.errors import ConfigError
from looplm.layers.mixer_states import KVState, LinearizedState
from looplm.model import LoopLM
from looplm.perplexity import score_tokens
from looplm.quant.ptq import quantize_model
from looplm.state import ModelState
from looplm.train.finetune import merge_adapters

ROWS = ("original", "hybrid", "linear", "truncated", "recursive", "mor")
# Peak learning rate of the full fine-tunes (truncated, recursive, mor): their starting points are
# far from any trained model (a 10-layer early exit: loss ~15 nats). Trials of the truncated row
# (GPL-3 perplexity): 5 minutes on 1 thread, 1e-3: ~2.4k (~3.3k with distillation, fewer steps),
# 3e-4 with distillation: ~81k; 10 minutes on 2 threads at 1e-4: ~3.3k.
FULL_LR = 1e-3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="an attention-only checkpoint (looplm import)")
    parser.add_argument("--out", default="bench/convert", help="results and work directory (resumable)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"subset of {','.join(ROWS)}")
    parser.add_argument("--minutes", type=float, default=2.0, help="wall minutes of each fine-tune (<= 60)")
    parser.add_argument("--lora", type=int, default=16, help="LoRA rank of the fine-tunes and relaxation")
    parser.add_argument("--window", type=int, default=64, help="Liger Attention window")
    parser.add_argument("--eval-tokens", type=int, default=1024, help="tokens of each held-out text scored")
    parser.add_argument("--context", type=int, default=16384, help="context of the state/decode figures")
    parser.add_argument("--decode-tokens", type=int, default=16, help="decoding steps timed")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seq-len", type=int, default=256, help="fine-tune sequence length")
    parser.add_argument("--batch-size", type=int, default=8, help="fine-tune sequences per step")
    parser.add_argument("--max-files", type=int, default=0, help="fine-tune on N corpus files (0: all)")


def synthetic_state(model: LoopLM, context: int) -> ModelState:
    """A decoding state as after ``context`` tokens: attention caches of ``context`` random keys
    and values, linearised layers' windows of their last W, random recurrent states."""
    g = torch.Generator().manual_seed(0)
    state = model.init_state(1)
    for key, s in list(state.layers.items()):
        if isinstance(s, KVState):
            state.layers[key] = _kv(s, context, context, g)
        elif isinstance(s, LinearizedState):
            n = min(context, model.config.window - 1)  # what the next query can still see
            window = None if s.window is None else _kv(s.window, n, context, g)
            ssm = 0.01 * torch.randn(s.ssm.shape, generator=g)
            if ssm.shape[-1] == ssm.shape[-2] + 1:  # normalised read-out: z, a sum of softmax weights, > 0
                ssm[..., -1] = ssm[..., -1].abs() + 1.0
            state.layers[key] = LinearizedState(ssm, window)
    state.positions = torch.full((1,), context, dtype=torch.long)
    return state


def _kv(s: KVState, n: int, seen: int, g: torch.Generator) -> KVState:
    shape = (1, n, *s.k.shape[2:])
    pos = torch.arange(seen - n, seen)[None]
    return KVState(torch.randn(shape, generator=g), torch.randn(shape, generator=g),
                   torch.ones(1, n, dtype=torch.bool), pos, torch.full((1,), seen, dtype=torch.long))


@torch.no_grad()
def decode_figures(model: LoopLM, context: int, steps: int) -> dict[str, float]:
    """State bytes at ``context`` and greedy decode tokens/s from there (one warm-up step)."""
    state = synthetic_state(model, context)
    nbytes = state.nbytes()
    x = torch.zeros(1, 1, dtype=torch.long)
    out = model(x, state=state)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(out.logits[:, -1:].argmax(-1), state=out.state)
    return {"state_bytes": nbytes, "decode_tok_s": steps / (time.perf_counter() - start)}


def quality(model: LoopLM, texts: dict[str, torch.Tensor], window: int) -> dict[str, float]:
    """Perplexity of each held-out text (non-overlapping windows of ``window`` tokens)."""
    return {f"ppl_{name}": score_tokens(model, ids, window=window).perplexity for name, ids in texts.items()}


def fine_tune(init: Path, run: Path, args: argparse.Namespace, *extra: str) -> Path:
    """``looplm train --init init`` for ``args.minutes`` into ``run`` (resumed if begun); -> latest."""
    if (run / "done").is_file():
        return run / "latest"
    cmd = [sys.executable, "-m", "looplm", "train", "--init", str(init), "--data", "finetune",
           "--no-progress", "--out", str(run), *extra, "--set", f"seq_len={args.seq_len}",
           f"batch_size={args.batch_size}", f"max_minutes={args.minutes}", "steps=100000", "warmup_steps=10",
           "eval_interval=100000", "eval_iters=2", "sample_tokens=0", "weight_decay=0.0",
           f"threads={args.threads}", f"max_files={args.max_files}"]
    if (run / "latest").exists():
        cmd.append("--resume")
    print(" ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    (run / "done").write_text("")
    return run / "latest"


def truncate(model: LoopLM, n_layers: int) -> LoopLM:
    """The first ``n_layers`` layers of an attention model (with its embedding, norm and head)."""
    c = model.config
    new = LoopLM(dataclasses.replace(c, n_prelude=0, n_core=n_layers, n_coda=0))
    layers = [*model.prelude, *model.core, *model.coda]
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("prelude.", "core.", "coda."))}
    for i in range(n_layers):
        state.update({f"core.{i}.{k}": v for k, v in layers[i].state_dict().items()})
    new.load_state_dict(state)
    return new


def prepare(row: str, src: Path, work: Path, args: argparse.Namespace) -> Path:
    """The checkpoint a row measures (converted and fine-tuned as needed)."""
    if row == "original":
        return src
    base = load_model(src)
    n_layers = base.config.n_prelude + base.config.n_core + base.config.n_coda
    made = work / row
    if row in ("hybrid", "linear") and not made.exists():
        write_converted(linearize(base, "gla", 4 if row == "hybrid" else 0, args.window), src, made)
    elif row == "truncated" and not made.exists():
        write_converted(truncate(base, n_layers // 3), src, made)
    elif row in ("recursive", "mor") and not (work / "recursive").exists():
        write_converted(recursify(base, 3, "average", args.lora), src, work / "recursive")
    if row in ("hybrid", "linear"):
        return fine_tune(made, work / f"{row}-run", args, "--lora", str(args.lora), "--distill", str(src),
                         "--set", "lr=1e-3")
    if row == "truncated":
        return fine_tune(made, work / "truncated-run", args, "--set", f"lr={FULL_LR}")
    rec = fine_tune(work / "recursive", work / "recursive-run", args, "--set", f"lr={FULL_LR}")
    if row == "recursive":
        return rec
    return fine_tune(rec, work / "mor-run", args, "--set", "router=expert_choice", f"lr={FULL_LR}")


def causal(model: LoopLM) -> LoopLM:
    """An expert-choice model with its router's causal ``threshold`` selection (trained with
    ``topk`` over the sequence, which decoding cannot use); other models unchanged."""
    if model.config.router != "expert_choice" or model.config.selection == "threshold":
        return model
    new = LoopLM(dataclasses.replace(model.config, selection="threshold"))
    new.load_state_dict(model.state_dict())
    return new.eval()


def run(args: argparse.Namespace) -> int:
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown or not 0 < args.minutes <= 60:
        raise ConfigError(f"--rows must name some of {','.join(ROWS)} and --minutes be in (0, 60]; "
                          f"got {args.rows!r}, {args.minutes}")
    if args.threads:
        torch.set_num_threads(args.threads)
    src, out = Path(args.checkpoint), Path(args.out)
    tokenizer = load_tokenizer(src)
    texts = {"prose": read_text(PROSE, "prose"), "code": read_text(code_text(), "code")}
    ids = {k: torch.tensor(tokenizer.encode(t)[:args.eval_tokens + 1]) for k, t in texts.items()}
    results: dict[str, Any] = {}
    for row in rows:
        path = out / "rows" / f"{row}.json"
        if path.is_file():
            results[row] = json.loads(path.read_text())
            continue
        model = load_model(prepare(row, src, out / "work", args)).eval()
        if model.config.n_recursions == 1:
            model = merge_adapters(model)  # LoRA folded into the weights: decoded as a plain model
        model = causal(model)
        fig = {**quality(model, ids, min(args.eval_tokens, 1024)),
               **decode_figures(model, args.context, args.decode_tokens),
               "flops_per_token": model.flops_per_token(min(args.eval_tokens, 1024), training=False),
               "params": model.num_params(), "minutes": args.minutes if row != "original" else 0}
        if model.config.n_recursions == 1:  # the same model with int4 weights (recursions keep LoRA: none)
            quantize_model(model, "int4", group_size=32, keep_embeddings=False, keep_head=False)
            fig["decode_int4_tok_s"] = decode_figures(model, args.context, args.decode_tokens)["decode_tok_s"]
        results[row] = fig
        write_json(out / "rows", row, fig)
        print(f"{row}: {fig}", flush=True)
    print(table(results, args))
    write_json(out, "convert", {"machine": machine_info(), "settings": vars(args), "rows": results})
    return 0


def table(results: dict[str, Any], args: argparse.Namespace) -> str:
    """Each row's figures and its ratios to the original (and of mor to recursive)."""
    ref = results.get("original")
    head = ["row", "ppl prose", "ppl code", "ppl ratio (prose/code)", f"state @{args.context}",
            "state ratio", "decode tok/s", "decode ratio", "int4 decode tok/s", "int4 ratio", "GFLOPs/token",
            "minutes"]
    lines = []
    for row, r in results.items():
        base = results.get("recursive") if row == "mor" else ref
        ratio = "-"
        if base is not None:
            ratio = f"{r['ppl_prose'] / base['ppl_prose']:.3f} / {r['ppl_code'] / base['ppl_code']:.3f}"
        int4, ref4 = r.get("decode_int4_tok_s"), None if ref is None else ref.get("decode_int4_tok_s")
        lines.append([row, r["ppl_prose"], r["ppl_code"], ratio, f"{r['state_bytes'] / 2**20:.1f} MiB",
                      None if ref is None else r["state_bytes"] / ref["state_bytes"], r["decode_tok_s"],
                      None if ref is None else r["decode_tok_s"] / ref["decode_tok_s"],
                      int4, None if int4 is None or ref4 is None else int4 / ref4,
                      r["flops_per_token"] / 1e9, r["minutes"]])
    return markdown_table(head, lines)
