"""``looplm quantize CHECKPOINT --format F --out DIR``: a low-precision copy of a checkpoint.

The new directory holds config.json (with a ``quantization`` block), model.safetensors (packed
weights + scales) and the source's other files (tokenizer, run.json), so ``looplm generate``,
``eval`` and ``load_model`` read it like any checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from looplm.checkpoint import load_model, save_model
from looplm.errors import CheckpointError, ConfigError
from looplm.quant.formats import FORMATS, GROUP_SIZES
from looplm.quant.ptq import quantize_model

OWN_FILES = ("config.json", "model.safetensors", "checksums.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a float checkpoint directory (looplm train's or save_model's)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="weight format")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES,
                        help="int4 group size (default 64); fp4_mx always uses blocks of 32")
    parser.add_argument("--no-zero-point", action="store_true", help="int4: symmetric groups")
    parser.add_argument("--keep-embeddings", dest="keep_embeddings", action="store_true", default=True,
                        help="keep the embedding (and a tied head) in float (default)")
    parser.add_argument("--quantize-embeddings", dest="keep_embeddings", action="store_false",
                        help="quantise the embedding table too (and the head)")
    parser.add_argument("--out", required=True, help="directory to write")


def run(args: argparse.Namespace) -> int:
    src, out = Path(args.checkpoint), Path(args.out)
    if out.resolve() == src.resolve():
        raise ConfigError("--out must differ from the source checkpoint (it would be overwritten)")
    model = load_model(src)
    if getattr(model, "quantization", None) is not None:
        raise CheckpointError(f"{str(src)!r} is already quantised ({model.quantization['format']}); "
                              "quantise its float checkpoint instead")
    group = args.group_size if args.format == "int4" else None
    if args.group_size is not None and group is None:
        raise ConfigError(f"--group-size applies to int4 only, not {args.format}")
    keep = args.keep_embeddings
    quantize_model(model, args.format, group_size=group, zero_point=not args.no_zero_point,
                   keep_embeddings=keep, keep_head=keep)
    save_model(model, out)
    for f in src.iterdir():
        if f.is_file() and f.name not in OWN_FILES:
            shutil.copy2(f, out / f.name)
    sizes = [(d / "model.safetensors").stat().st_size for d in (src, out)]
    print(f"{out}: {args.format}, {len(model.quantization['modules'])} modules quantised, "
          f"{sizes[1] / 1e6:.2f} MB ({100 * sizes[1] / sizes[0]:.1f}% of {sizes[0] / 1e6:.2f} MB)")
    return 0
