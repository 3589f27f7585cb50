"""Writing a converted checkpoint: the model plus every other file of the source directory (its
tokenizer, ``pretrained.json``), so generate/chat/train read it as they read the source."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path

from looplm.checkpoint import CHECKSUMS_FILE, CONFIG_FILE, WEIGHTS_FILE, load_model, save_model
from looplm.errors import ConfigError
from looplm.model import LoopLM

__all__ = ["add_paths", "convert", "write_converted"]


def add_paths(parser: argparse.ArgumentParser, source_help: str) -> None:
    """The source checkpoint (positional ``CKPT``) and ``--out`` of a conversion command."""
    parser.add_argument("checkpoint", metavar="CKPT", help=source_help)
    parser.add_argument("--out", required=True, help="checkpoint directory to write (must not exist)")


def convert(args: argparse.Namespace, fn: Callable[[LoopLM], LoopLM]) -> tuple[LoopLM, LoopLM, Path]:
    """Load ``args.checkpoint``, convert it with ``fn``, write the result to ``args.out``;
    returns ``(source model, converted model, output directory)``."""
    model = load_model(args.checkpoint)
    new = fn(model)
    return model, new, write_converted(new, args.checkpoint, args.out)


def write_converted(model: LoopLM, source: str | Path, out: str | Path) -> Path:
    """Save ``model`` into ``out`` (which must not exist) with ``source``'s other files copied."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out {str(out)!r} already exists; choose a new directory")
    own = {CONFIG_FILE, WEIGHTS_FILE, CHECKSUMS_FILE}
    save_model(model, out)
    for f in Path(source).iterdir():
        if f.is_file() and f.name not in own:
            shutil.copy2(f, out / f.name)
    return out
