"""``looplm import SRC --out DIR [--quantize FORMAT]``: a GGUF file or a Hugging Face directory
of a Llama-family model as a looplm checkpoint (see :mod:`looplm.pretrained`)."""

from __future__ import annotations

import argparse
import json
import time

from looplm.errors import ConfigError
from looplm.pretrained.convert import INFO_FILE, import_checkpoint
from looplm.quant.formats import FORMATS, GROUP_SIZES, INT8_GROUP


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
    parser.add_argument(
        "--group-size",
        type=int,
        metavar="G",
        help=f"inputs per scale: int4 one of {', '.join(map(str, GROUP_SIZES))} (default 64), int8 a "
        f"multiple of {INT8_GROUP} (default: one per row). int4 g32 keeps a GGUF's Q4_1 codes as they "
        "are, int8 g32 its Q8_0 ones (lossless)",
    )
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
    parser.add_argument(
        "--embedding-group-size",
        type=int,
        metavar="G",
        help="with --embedding-format: its group size (int8 g32 keeps a GGUF's Q8_0 table as it is)",
    )


def run(args: argparse.Namespace) -> int:
    options = None
    if args.quantize is not None:
        if args.group_size is not None and args.quantize not in ("int4", "int8"):
            raise ConfigError(f"--group-size applies to int4 and int8 only, not {args.quantize}")
        if args.embedding_group_size is not None and args.embedding_format is None:
            raise ConfigError("--embedding-group-size needs --embedding-format")
        keep = not (args.quantize_embeddings or args.embedding_format)
        options = {"group_size": args.group_size, "keep_embeddings": keep, "keep_head": keep,
                   "embedding_format": args.embedding_format,
                   "embedding_group_size": args.embedding_group_size}
    elif args.group_size is not None or args.quantize_embeddings or args.embedding_format:
        raise ConfigError("--group-size, --quantize-embeddings and --embedding-format need --quantize FORMAT")
    start = time.perf_counter()
    out = import_checkpoint(args.source, args.out, quantize=args.quantize, quantize_options=options)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    kept = json.loads((out / INFO_FILE).read_text()).get("file_codes", 0)
    lossless = f"; {kept} matrices keep the file's own codes" if kept else ""
    print(f"{out}: {size / 1e6:.1f} MB written in {time.perf_counter() - start:.1f} s{lossless}")
    return 0
