"""``looplm generate CHECKPOINT_DIR --prompt TEXT``: stream generated text to stdout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from looplm.checkpoint import load_model
from looplm.data.tokenizer import load_tokenizer
from looplm.errors import CheckpointError, LoopLMError
from looplm.generate import generate


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampling flags `looplm generate` and `looplm chat` share."""
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    parser.add_argument("--min-p", type=float, default=None,
                        help="keep tokens at least this fraction as likely as the most likely one")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="divide the logits of tokens already present by this (1 = none; CTRL)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of those flags, as ``generate`` and ``Chat`` take them."""
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "min_p": args.min_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="directory written by training")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    add_sampling_arguments(parser)
    parser.add_argument("--state-format", choices=("int8", "fp8_e4m3"), default=None,
                        help="hold the decoding state (fixed-size states, KV caches) in this format "
                        "between steps (default: the model's float dtype)")
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="stop before this text (repeat the flag for several)")


def run(args: argparse.Namespace) -> int:
    directory = Path(args.checkpoint)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist: give the directory "
                              "a training run wrote (config.json, model.safetensors, tokenizer)")
    try:
        model = load_model(directory)
        tokenizer = load_tokenizer(directory)
    except LoopLMError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"cannot read checkpoint {str(directory)!r}: {err}") from None
    try:
        pieces = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                          stop=args.stop, stream=True, state_format=args.state_format,
                          **sampling_options(args))
    except (ValueError, TypeError) as err:  # bad flag values or prompt: one line, no traceback
        raise LoopLMError(str(err)) from None
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
