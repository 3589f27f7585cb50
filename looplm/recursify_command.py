"""``looplm recursify CKPT --recursions R --init average|select [--lora RANK] --out DIR``: one shared
core applied R times, initialised from the checkpoint's layers (Relaxed Recursive Transformers)."""

from __future__ import annotations

import argparse

from looplm.convert.files import add_paths, convert
from looplm.convert.recursify import INITS, recursify


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_paths(parser, "a looplm checkpoint without recursion")
    parser.add_argument("--recursions", type=int, required=True, metavar="R", help="must divide the layers")
    parser.add_argument("--init", choices=INITS, default="average", help="shared weights from the layers")
    parser.add_argument("--lora", type=int, default=0, metavar="RANK",
                        help="per-recursion LoRA relaxation of this rank, SVD-initialised (0: none)")


def run(args: argparse.Namespace) -> int:
    model, new, out = convert(args, lambda m: recursify(m, args.recursions, args.init, args.lora))
    c = new.config
    print(f"{out}: {c.n_core} shared layers x {c.n_recursions} recursions, {new.num_params() / 1e6:.2f}M "
          f"parameters (was {model.num_params() / 1e6:.2f}M)")
    return 0
