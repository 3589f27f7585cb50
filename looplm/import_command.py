"""``looplm import SRC --out DIR [--quantize FORMAT]``: a GGUF file or a Hugging Face directory
of a Llama-family model as a looplm checkpoint (see :mod:`looplm.pretrained`)."""

from __future__ import annotations

import argparse
import time

from looplm.errors import ConfigError
from looplm.pretrained.convert import import_checkpoint
from looplm.quant.formats import FORMATS, GROUP_SIZES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="SRC",
        help="a .gguf file (architecture llama) or a Hugging Face "
        "directory of LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM",
    )
    parser.add_argument("--out", required=True, help="checkpoint directory to write (must not exist)")
    parser.add_argument(
        "--quantize",
        choices=FORMATS,
        default=None,
        metavar="FORMAT",
        help=f"write a quantised checkpoint: {', '.join(FORMATS)}",
    )
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, help="int4 group size (default 64)")
    parser.add_argument(
        "--quantize-embeddings",
        action="store_true",
        help="with --quantize: quantise the embedding table and the head too",
    )
    parser.add_argument(
        "--embedding-format",
        choices=FORMATS,
        default=None,
        metavar="FORMAT",
        help="with --quantize: the embedding table and head in this format (e.g. int8 beside int4)",
    )


def run(args: argparse.Namespace) -> int:
    options = None
    if args.quantize is not None:
        if args.group_size is not None and args.quantize != "int4":
            raise ConfigError(f"--group-size applies to int4 only, not {args.quantize}")
        keep = not (args.quantize_embeddings or args.embedding_format)
        options = {"group_size": args.group_size, "keep_embeddings": keep, "keep_head": keep,
                   "embedding_format": args.embedding_format}
    elif args.group_size is not None or args.quantize_embeddings or args.embedding_format:
        raise ConfigError("--group-size, --quantize-embeddings and --embedding-format need --quantize FORMAT")
    start = time.perf_counter()
    out = import_checkpoint(args.source, args.out, quantize=args.quantize, quantize_options=options)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"{out}: {size / 1e6:.1f} MB written in {time.perf_counter() - start:.1f} s")
    return 0
