"""``looplm export CKPT --format hf --out DIR``: a vanilla looplm checkpoint as a Hugging Face Llama
directory (see :mod:`looplm.pretrained.export`)."""

from __future__ import annotations

import argparse

from looplm.pretrained.export import FORMATS, export_hf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="a looplm checkpoint directory (float weights)")
    parser.add_argument("--format", choices=FORMATS, default="hf", help="hf: a transformers Llama directory")
    parser.add_argument("--out", required=True, help="directory to write (must not exist)")


def run(args: argparse.Namespace) -> int:
    out = export_hf(args.checkpoint, args.out)
    print(f"{out}: {args.format} directory written")
    return 0
