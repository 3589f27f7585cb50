"""``looplm eval CHECKPOINT``: validation loss and bits per byte of a checkpoint on a corpus.

The corpus is tokenized with the checkpoint's own tokenizer; its validation split is read
in consecutive windows (``looplm.data.eval_batches``), the ones training evaluates on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from looplm.data import eval_batches, load_tokenizer
from looplm.train.command import load_corpus
from looplm.train.config import TrainConfig
from looplm.train.distributed import Dist
from looplm.train.loop import evaluate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory (e.g. runs/small/latest)")
    parser.add_argument("--data", default=None, help="corpus (default: the run's own, else stdlib)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per batch")
    parser.add_argument("--iters", type=int, default=16, help="batches to evaluate")
    parser.add_argument("--json", action="store_true", help="print one JSON line")


def run(args: argparse.Namespace) -> int:
    from looplm.checkpoint import load_model

    ckpt = Path(args.checkpoint)
    model = load_model(ckpt)
    saved = ckpt / "run.json"
    train_cfg = json.loads(saved.read_text())["train"] if saved.is_file() else {}
    kept = ("data", "tokenizer", "vocab_size", "max_files", "seq_len")
    cfg = TrainConfig.from_dict({
        **{k: v for k, v in train_cfg.items() if k in kept},
        **({"data": args.data} if args.data else {}),
        **({"seq_len": args.seq_len} if args.seq_len else {}),
        "batch_size": args.batch_size,
    })
    corpus = load_corpus(cfg, Dist(), load_tokenizer(ckpt), progress=not args.json)
    windows = eval_batches(corpus.val.tokens, args.batch_size, cfg.seq_len, max_batches=args.iters)
    token_bytes = torch.from_numpy(corpus.tokenizer.token_nbytes())
    with torch.inference_mode():
        result = evaluate(model, windows, token_bytes)
    if args.json:
        print(json.dumps({"checkpoint": str(ckpt), "data": cfg.data, **result}))
    else:
        print(f"{ckpt} on {cfg.data} (validation split): loss {result['val_loss']:.4f} nats/token, "
              f"{result.get('val_bpb', float('nan')):.4f} bits/byte")
    return 0
