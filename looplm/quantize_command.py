"""``looplm quantize CHECKPOINT --format F --out DIR``: a low-precision copy of a checkpoint.

The new directory holds config.json (with a ``quantization`` section), model.safetensors (packed
weights + scales) and the source's other files (tokenizer, run.json), so ``looplm generate``,
``eval`` and ``load_model`` read it like any checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

from looplm.checkpoint import load_model, save_model
from looplm.errors import CheckpointError, ConfigError
from looplm.quant.formats import FORMATS, GROUP_SIZES, INT8_GROUP
from looplm.quant.ptq import quantize_model

OWN_FILES = ("config.json", "model.safetensors", "checksums.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a float checkpoint directory (looplm train's or save_model's)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="weight format")
    parser.add_argument("--group-size", type=int, metavar="G",
                        help=f"inputs per scale: int4 in {', '.join(map(str, GROUP_SIZES))} (default 64); "
                             f"int8 a multiple of {INT8_GROUP} (default: one scale per output row); "
                             "fp4_mx always uses groups of 32")
    parser.add_argument("--no-zero-point", action="store_true", help="int4: symmetric groups")
    parser.add_argument("--keep-embeddings", dest="keep_embeddings", action="store_true", default=True,
                        help="keep the embedding (and a tied head) in float (default)")
    parser.add_argument("--quantize-embeddings", dest="keep_embeddings", action="store_false",
                        help="quantise the embedding table too (and the head)")
    parser.add_argument("--embedding-format", choices=FORMATS, default=None,
                        help="the embedding table and the head in this format (implies "
                             "--quantize-embeddings), e.g. int8 beside an int4 body")
    parser.add_argument("--embedding-group-size", type=int, metavar="G",
                        help="with --embedding-format: its group size (int8 default: one scale per row)")
    parser.add_argument("--out", required=True, help="directory to write")


def check_out(out: Path) -> None:
    """``--out`` must be new or an empty directory (never a file, a link, or another checkpoint)."""
    if out.is_symlink():
        raise ConfigError(f"--out {str(out)!r} is a symbolic link; give a new directory")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {str(out)!r} is not empty (it would be overwritten); give a new directory")
    parent = next((p for p in out.absolute().parents if p.exists()), Path("/"))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {str(out)!r} cannot be created: {str(parent)!r} is not writable")


def write_copy(model: Any, src: Path, out: Path) -> None:
    """Save ``model`` (a quantised copy of checkpoint ``src``) as checkpoint ``out`` (new or an empty
    directory: :func:`check_out`) with ``src``'s other files (tokenizer, run.json); written beside
    it and renamed, so ``out`` is never half written."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_model(model, tmp)
        for f in src.iterdir():
            if f.is_file() and f.name not in OWN_FILES:
                shutil.copy2(f, tmp / f.name)
        if out.is_dir():  # empty (check_out): replaced by the finished copy
            out.rmdir()
        os.rename(tmp, out)
    except OSError as exc:
        raise CheckpointError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    src, out = Path(args.checkpoint), Path(args.out)
    if out.resolve() == src.resolve():
        raise ConfigError("--out must differ from the source checkpoint (it would be overwritten)")
    check_out(out)
    model = load_model(src)
    if getattr(model, "quantization", None) is not None:
        raise CheckpointError(f"{str(src)!r} is already quantised ({model.quantization['format']}); "
                              "quantise its float checkpoint instead")
    if args.group_size is not None and args.format not in ("int4", "int8"):
        raise ConfigError(f"--group-size applies to int4 and int8 only, not {args.format}")
    if args.embedding_group_size is not None and args.embedding_format is None:
        raise ConfigError("--embedding-group-size needs --embedding-format")
    keep = args.keep_embeddings and args.embedding_format is None
    quantize_model(model, args.format, group_size=args.group_size, zero_point=not args.no_zero_point,
                   keep_embeddings=keep, keep_head=keep, embedding_format=args.embedding_format,
                   embedding_group_size=args.embedding_group_size)
    write_copy(model, src, out)
    sizes = [(d / "model.safetensors").stat().st_size for d in (src, out)]
    print(f"{out}: {args.format}, {len(model.quantization['modules'])} modules quantised, "
          f"{sizes[1] / 1e6:.2f} MB ({100 * sizes[1] / sizes[0]:.1f}% of {sizes[0] / 1e6:.2f} MB)")
    return 0
