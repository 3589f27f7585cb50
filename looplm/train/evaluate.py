"""``looplm eval CHECKPOINT [--data FILE]``: loss, perplexity and bits per byte of a checkpoint.

Expert-choice routers (MoR, MoD) route by the causal threshold rule decoding uses; a model set
to top-k over the sequence (which sees future tokens) gets that result too, labelled as such.
Without ``--data``: the run's own validation split (the corpus it trained on, tokenized with
the checkpoint's tokenizer), read in the consecutive windows training evaluates on
(``looplm.data.eval_batches``). With ``--data``: the whole of that text (files, a directory,
a glob, ``.jsonl``/``.parquet``; or its first ``--max-tokens`` tokens), in windows of the
model's context, non-overlapping or strided (:mod:`looplm.perplexity`).
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from looplm.checkpoint import load_model
from looplm.data import eval_batches, load_tokenizer
from looplm.data.corpus import cache_root, resolve_source
from looplm.errors import CheckpointError, ConfigError, DataError
from looplm.ops.linear import BF16_NEEDS, bf16_products
from looplm.ops.qlinear import bf16_rows
from looplm.perplexity import score_tokens, scored_bytes
from looplm.routers import causal_routing, sees_future
from looplm.train.command import load_corpus
from looplm.train.config import TrainConfig
from looplm.train.distributed import Dist
from looplm.train.loop import evaluate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory (e.g. runs/small/latest)")
    parser.add_argument("--data", default=None,
                        help="score the whole of this text: a file, directory or glob (default: the run's "
                        "validation split)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="with --data: score only the first N tokens")
    parser.add_argument("--stride", type=int, default=None,
                        help="with --data: start a window every S tokens, each scoring only its new tokens "
                        "(default: the window, i.e. non-overlapping windows)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per window (default: --data: the model's max_seq_len; else the run's)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="windows per batch (default 16; --data: 1)")
    parser.add_argument("--iters", type=int, default=16, help="without --data: batches to evaluate")
    parser.add_argument("--bf16-products", action="store_true",
                        help="with --data: multiply float32 weights and attend in bfloat16 on AMX tiles, as "
                        "`looplm serve --bf16-prefill` reads prompts (CPUs with AMX)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")


def read_tokens(spec: str, tokenizer, max_tokens: int | None = None) -> list[int]:
    """Token ids of the text named by ``spec`` (documents in order, each encoded on its own),
    at most ``max_tokens`` of them."""
    ids: list[int] = []
    pending = b""
    for doc in resolve_source(spec).documents():
        pending += doc.data
        if not doc.last:
            continue
        ids.extend(tokenizer.encode(pending.decode("utf-8", errors="replace")))
        pending = b""
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return ids if max_tokens is None else ids[:max_tokens]


def _score_file(model, tokenizer, args: argparse.Namespace) -> dict:
    if args.max_tokens is not None and args.max_tokens < 2:
        raise DataError(f"--max-tokens must be at least 2 (one context token and one scored), "
                        f"got {args.max_tokens}")
    ids = read_tokens(args.data, tokenizer, args.max_tokens)
    window = args.seq_len or model.config.max_seq_len
    n_bytes = scored_bytes(tokenizer, ids)

    def score() -> dict:
        s = score_tokens(model, torch.tensor(ids), window=window, stride=args.stride,
                         batch_size=args.batch_size or 1)
        s.bytes = n_bytes
        return s.as_dict()

    # bf16 products apply where nothing is recorded for autograd; they hold for both scores
    with (torch.no_grad() if args.bf16_products else nullcontext()), bf16_products(args.bf16_products):
        with causal_routing(model):  # expert-choice routers as decoding routes
            result = {**score(), "window": window, "stride": args.stride or window}
        if sees_future(model):
            topk = score()
            result.update(loss_topk=topk["loss"], bits_per_byte_topk=topk["bits_per_byte"])
    return result


def _score_validation(model, ckpt: Path, tokenizer, args: argparse.Namespace) -> dict:
    train_cfg = recorded_train_config(ckpt)
    if isinstance(train_cfg.get("data"), str):
        check_recorded_data(train_cfg["data"], ckpt)
    kept = ("data", "tokenizer", "vocab_size", "max_files", "seq_len", "text_field")
    batch_size = args.batch_size or 16
    cfg = TrainConfig.from_dict({
        **{k: v for k, v in train_cfg.items() if k in kept},
        **({"seq_len": args.seq_len} if args.seq_len else {}),
        "batch_size": batch_size,
    })
    corpus = load_corpus(cfg, Dist(), tokenizer, progress=not args.json)
    batches = eval_batches(corpus.val.tokens, batch_size, cfg.seq_len, max_batches=args.iters)
    token_bytes = torch.from_numpy(corpus.tokenizer.token_nbytes())
    with torch.inference_mode():
        result = evaluate(model, batches, token_bytes)
    return {"data": cfg.data, **result}


def recorded_train_config(ckpt: Path) -> dict[str, Any]:
    """The ``train`` section of the checkpoint's run.json ({} without one)."""
    saved = ckpt / "run.json"
    if not saved.is_file():
        return {}
    try:
        train_cfg = json.loads(saved.read_text())["train"]
        if not isinstance(train_cfg, dict):
            raise TypeError
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{str(saved)!r} is corrupted (not a run record); restore it") from None
    return train_cfg


def check_recorded_data(data: str, ckpt: Path) -> None:
    """A data path read from run.json is followed only inside the run directory or the looplm cache."""
    if data == "stdlib" or data.startswith("hf:"):
        return
    fixed = Path(data.split("*")[0].split("?")[0].split("[")[0] or ".").expanduser().resolve()
    inside = (ckpt.resolve().parent, cache_root().resolve())
    if not any(fixed == root or fixed.is_relative_to(root) for root in inside):
        raise ConfigError(f"the run's data {data!r} (from {str(ckpt / 'run.json')!r}) lies outside the run "
                          "and the looplm cache; pass --data to choose what to evaluate on")


def run(args: argparse.Namespace) -> int:
    for flag in ("iters", "batch_size", "seq_len", "max_tokens", "stride"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.data is None and (args.max_tokens is not None or args.stride is not None or args.bf16_products):
        raise DataError("--max-tokens, --stride and --bf16-products apply to --data FILE; "
                        "give the text to score")
    if args.bf16_products and not bf16_rows():
        raise ConfigError(f"--bf16-products needs {BF16_NEEDS}")
    ckpt = Path(args.checkpoint)
    model = load_model(ckpt)
    tokenizer = load_tokenizer(ckpt)
    if args.data is not None:
        result = {"data": args.data, **_score_file(model, tokenizer, args)}
        line = (f"{ckpt} on {args.data}: {result['tokens']:,} tokens, loss {result['loss']:.4f} nats/token, "
                f"perplexity {result['perplexity']:.3f}, {result['bits_per_byte']:.4f} bits/byte "
                f"(window {result['window']}, stride {result['stride']})")
        if "loss_topk" in result:
            line += (f"; with top-k routing over each window (sees future tokens): "
                     f"loss {result['loss_topk']:.4f}, {result['bits_per_byte_topk']:.4f} bits/byte")
    else:
        result = _score_validation(model, ckpt, tokenizer, args)
        line = (f"{ckpt} on {result['data']} (validation split): loss {result['val_loss']:.4f} nats/token, "
                f"{result.get('val_bpb', float('nan')):.4f} bits/byte")
        if "val_loss_topk" in result:  # expert-choice routing: the line above is its causal rule
            line += (f" with causal (threshold) routing; top-k over the sequence (sees future tokens): "
                     f"loss {result['val_loss_topk']:.4f}, "
                     f"{result.get('val_bpb_topk', float('nan')):.4f} bits/byte")
    print(json.dumps({"checkpoint": str(ckpt), **result}) if args.json else line)
    return 0
