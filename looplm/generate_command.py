"""``looplm generate CHECKPOINT_DIR --prompt TEXT``: stream generated text to stdout."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

from looplm.checkpoint import load_model
from looplm.data.tokenizer import load_tokenizer
from looplm.errors import CheckpointError, LoopLMError
from looplm.generate import Decoder, generate
from looplm.model import LoopLM
from looplm.speculative import SpecStats, build_drafter, check_gamma, iter_speculative


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


def add_draft_arguments(parser: argparse.ArgumentParser) -> None:
    """The self-speculative decoding flags `looplm generate` and `looplm chat` share."""
    parser.add_argument("--draft", default=None, metavar="SPEC",
                        help="self-speculative decoding with this draft: layers:K (first K layers), "
                        "recursions:R (fewer recursions), ngram:N (prompt lookup), heads:PATH (heads of "
                        "looplm train-draft); the output is unchanged, a stats line goes to stderr")
    parser.add_argument("--gamma", type=int, default=4, help="draft tokens verified per forward (default 4)")


def draft_decoder(model: LoopLM, args: argparse.Namespace) -> tuple[Decoder | None, SpecStats]:
    """The token iterator of ``--draft`` (None without it) and the stats it fills in."""
    stats = SpecStats()
    if args.draft is None:
        return None, stats
    try:
        check_gamma(args.gamma)
    except ValueError as err:
        raise LoopLMError(f"--gamma: {err}") from None
    drafter = build_drafter(model, args.draft)
    return functools.partial(iter_speculative, drafter=drafter, gamma=args.gamma, stats=stats), stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="directory written by training")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    add_sampling_arguments(parser)
    add_draft_arguments(parser)
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
    decoder, stats = draft_decoder(model, args)
    try:
        pieces = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                          stop=args.stop, stream=True, state_format=args.state_format, decoder=decoder,
                          **sampling_options(args))
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except (ValueError, TypeError) as err:  # bad flag values or prompt: one line, no traceback
        raise LoopLMError(str(err)) from None
    sys.stdout.write("\n")
    if decoder is not None:
        print(stats.line(), file=sys.stderr)
    return 0
