"""``looplm train-draft CKPT --kind exit:K|medusa:H --out FILE``: distil draft heads for
self-speculative decoding (``looplm generate --draft heads:FILE``) from the model's own output
distributions on a corpus (:mod:`looplm.draft_heads`)."""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

from looplm.checkpoint import load_model
from looplm.data.tokenizer import load_tokenizer
from looplm.draft_heads import (
    HEAD_KINDS,
    ExitHead,
    corpus_texts,
    distill_heads,
    load_heads,
    new_heads,
    save_heads,
    shortlist,
)
from looplm.errors import CheckpointError, ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="the model the heads draft for")
    parser.add_argument("--kind", required=True, metavar="exit:K|medusa:H",
                        help="an early-exit head after layer K, or H Medusa heads on the last hidden state")
    parser.add_argument("--data", default="finetune", help="a text file, or 'finetune' (default: the "
                        "fine-tuning corpus of looplm train --data finetune, without the held-out texts)")
    parser.add_argument("--out", required=True, help="the heads file to write (safetensors)")
    parser.add_argument("--max-minutes", type=float, default=10.0, help="training time budget (default 10)")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps instead")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training window")
    parser.add_argument("--batch-size", type=int, default=2, help="windows per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--max-tokens", type=int, default=1_000_000, help="corpus tokens to read at most")
    parser.add_argument("--draft-vocab", type=int, default=8192, help="Medusa heads draft only the corpus's "
                        "this many most frequent tokens (their logits cost that fraction of the full head's; "
                        "0: every token; a file given to --init keeps its own)")
    parser.add_argument("--init", default=None, metavar="HEADS_FILE",
                        help="continue training these heads (a file of looplm train-draft of the same kind)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the file order and the windows")


def parse_kind(spec: str) -> tuple[str, int]:
    kind, _, count = spec.partition(":")
    if kind not in HEAD_KINDS or not count.isdigit():
        raise ConfigError(f"--kind {spec!r} must be exit:K or medusa:H (K, H positive integers)")
    return kind, int(count)


def run(args: argparse.Namespace) -> int:
    kind, count = parse_kind(args.kind)
    directory = Path(args.checkpoint)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise ConfigError(f"--out {args.out!r}: directory {str(out.parent)!r} does not exist")
    for name in ("max_minutes", "steps", "seq_len", "batch_size", "max_tokens", "lr"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.draft_vocab < 0:
        raise ConfigError(f"--draft-vocab must be 0 (every token) or positive, got {args.draft_vocab}")
    model = load_model(directory)
    tokenizer = load_tokenizer(directory)
    texts = corpus_texts(args.data)
    random.Random(args.seed).shuffle(texts)
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text)
        if len(ids) >= args.max_tokens:
            break
    tokens = torch.tensor(ids[:args.max_tokens], dtype=torch.long)
    if args.init is not None:
        heads = load_heads(args.init, model)
        have = ("exit", heads.layers) if isinstance(heads, ExitHead) else ("medusa", len(heads.blocks))
        if have != (kind, count):
            raise ConfigError(f"--init {args.init!r} holds {have[0]}:{have[1]} heads, not {kind}:{count}")
    else:
        vocab = shortlist(tokens, args.draft_vocab, model.config.vocab_size) if kind == "medusa" else None
        heads = new_heads(model, kind, count, vocab)
    print(f"train-draft: {kind}:{count} on {tokens.numel()} tokens", file=sys.stderr)

    def log(step: int, loss: float) -> None:
        if step == 1 or step % 20 == 0:
            print(f"step {step} distillation loss {loss:.4f}", file=sys.stderr)

    losses = distill_heads(model, heads, tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                           steps=args.steps, max_minutes=None if args.steps else args.max_minutes,
                           lr=args.lr, seed=args.seed, log=log)
    save_heads(heads, out)
    print(f"wrote {out} after {len(losses)} steps (loss {losses[0]:.4f} -> {losses[-1]:.4f})")
    return 0
