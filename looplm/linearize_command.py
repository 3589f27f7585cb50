"""``looplm linearize CKPT --mixer gla|gated_deltanet [--keep-attention EVERY] [--window W]
[--no-normalize] --out DIR``:
an attention checkpoint's attention layers as gated recurrences on the same weights (Liger)."""

from __future__ import annotations

import argparse

from looplm.convert.files import add_paths, convert
from looplm.convert.linearize import RECURRENCES, linearize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_paths(parser, "an attention-only looplm checkpoint directory")
    parser.add_argument("--mixer", required=True, choices=RECURRENCES, help="the recurrence the layers run")
    parser.add_argument("--keep-attention", type=int, default=0, metavar="EVERY",
                        help="keep every EVERY-th layer softmax attention (0: linearise all)")
    parser.add_argument("--window", type=int, default=0, metavar="W",
                        help="Liger Attention: sliding-window softmax over W positions inside each layer")
    parser.add_argument("--no-normalize", dest="normalize", action="store_false",
                        help="gla: Liger's unnormalised read-out q S (default: q S / q z, whose scale "
                             "does not grow with the context)")


def run(args: argparse.Namespace) -> int:
    _, new, out = convert(
        args, lambda m: linearize(m, args.mixer, args.keep_attention, args.window, args.normalize))
    kinds = [b.mixer_name for b in (*new.prelude, *new.core, *new.coda)]
    n_attn = kinds.count("attention")
    print(f"{out}: {n_attn} attention and {len(kinds) - n_attn} liger_{args.mixer} layers (window "
          f"{args.window}); fine-tune with looplm train --init {out} --lora 8")
    return 0
