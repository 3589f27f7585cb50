"""``looplm chat CHECKPOINT_DIR``: a multi-turn conversation on stdin/stdout.

Each line read from stdin is a user message; the reply streams to stdout as it decodes and
ends with a newline. ``/reset`` starts the conversation over, ``/exit`` (or the end of stdin)
quits. A prompt marker is printed only when stdin is a terminal, so piped use reads clean
replies, one per line of input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from looplm.chat import Chat
from looplm.checkpoint import load_model
from looplm.data.tokenizer import load_tokenizer
from looplm.errors import CheckpointError, LoopLMError
from looplm.generate_command import (
    add_draft_arguments,
    add_sampling_arguments,
    draft_decoder,
    sampling_options,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="a checkpoint with a chat template "
                        "(e.g. one written by `looplm import`)")
    parser.add_argument("--system", default=None, help="system message opening the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply at most")
    add_sampling_arguments(parser)
    add_draft_arguments(parser)


def run(args: argparse.Namespace) -> int:
    directory = Path(args.checkpoint)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    model = load_model(directory)
    tokenizer = load_tokenizer(directory)
    decoder, stats = draft_decoder(model, args)
    options = sampling_options(args) if decoder is None else {**sampling_options(args), "decoder": decoder}
    try:
        chat = Chat(model, tokenizer, system=args.system, max_new_tokens=args.max_new_tokens, **options)
    except (ValueError, TypeError) as err:
        raise LoopLMError(str(err)) from None
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            chat.reset()
            continue
        if not text.strip():
            continue
        try:
            for piece in chat.reply(text):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except (ValueError, TypeError) as err:  # a message too long for the context: say so, go on
            print(f"error: {err}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if decoder is not None:
            print(stats.line(), file=sys.stderr)
    return 0
