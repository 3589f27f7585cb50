"""The ``looplm`` command: thin; it parses flags and calls the library.

Each subcommand lives in the module that implements it and exposes two functions:
``add_arguments(parser: argparse.ArgumentParser) -> None`` and
``run(args: argparse.Namespace) -> int``. Modules are imported only when their
subcommand runs, so ``looplm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from looplm import __version__
from looplm.errors import LoopLMError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("looplm.train.command", "train a model (default: the Python stdlib corpus)"),
    "generate": ("looplm.generate_command", "stream text from a checkpoint"),
    "chat": ("looplm.chat_command", "a multi-turn conversation with a checkpoint's chat template"),
    "eval": ("looplm.train.evaluate", "validation loss and bits per byte of a checkpoint"),
    "info": ("looplm.info", "parameters, FLOPs per token and config of a checkpoint"),
    "quantize": ("looplm.quantize_command", "write a low-precision copy of a checkpoint"),
    "serve": ("looplm.serve.command", "serve a checkpoint over OpenAI's HTTP API (continuous batching)"),
    "import": ("looplm.import_command", "a GGUF file or Hugging Face Llama directory as a looplm checkpoint"),
    "pull": ("looplm.pull_command", "download a known pretrained model into the cache (smollm2)"),
    "export": ("looplm.export_command", "a vanilla checkpoint as a Hugging Face Llama directory"),
    "linearize": ("looplm.linearize_command", "attention layers as gated recurrences (Liger)"),
    "recursify": ("looplm.recursify_command", "fold a checkpoint's layers into one shared recursive core"),
    "train-draft": ("looplm.train_draft_command", "distil draft heads for self-speculative decoding"),
}

# bench name -> (module, one-line help)
BENCHES: dict[str, tuple[str, str]] = {
    "ops": ("looplm.bench.ops", "token-mixer ops: tokens/s against sequence length"),
    "model": ("looplm.bench.model", "training and decoding speed against transformers"),
    "train": ("looplm.bench.train", "training throughput against transformers' Llama"),
    "compile": ("looplm.bench.compile", "training tokens/s compiled (fullgraph) against eager"),
    "mqar": ("looplm.bench.mqar", "multi-query associative recall (Zoology)"),
    "lm": ("looplm.bench.lm", "compute-matched language modelling"),
    "decode": ("looplm.bench.decode", "decoding latency and memory against context"),
    "quant": ("looplm.bench.quant", "size, speed and quality of quantised formats"),
    "infer": ("looplm.bench.infer", "SmolLM2-sized CPU decoding and prefill against transformers"),
    "serve": ("looplm.bench.serve", "OpenAI-API load test of looplm serve (and llama.cpp's server)"),
    "pretrained": ("looplm.bench.pretrained", "a pretrained GGUF model: transformers, llama.cpp and looplm"),
    "convert": ("looplm.bench.convert", "a pretrained model linearised and recursified, against itself"),
    "speculative": ("looplm.bench.speculative", "self-speculative decoding: tokens/s, acceptance"),
    "prefill": ("looplm.bench.prefill", "a chunked prefill's time against one forward over the prompt"),
    "report": ("looplm.bench.report", "write docs/results.md from saved results"),
}


def _add_lazy(sub: argparse._SubParsersAction, name: str, module: str, help_: str) -> None:
    """Register a subcommand whose flags come from ``module.add_arguments``. A module that does
    not import is a broken install: its error propagates (a traceback), never a missing command."""
    mod = importlib.import_module(module)
    parser = sub.add_parser(name, help=help_, description=help_)
    mod.add_arguments(parser)
    parser.set_defaults(_run=mod.run)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Build the parser; only the subcommand named in ``argv`` has its module imported."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="looplm",
        description="Train, evaluate, run, quantise and benchmark efficient language models "
        "(recursive depth, fixed-state mixers, sparse experts, low precision).",
    )
    parser.add_argument("--version", action="version", version=f"looplm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv else None
    for name, (module, help_) in COMMANDS.items():
        if wanted == name:
            _add_lazy(sub, name, module, help_)
        else:
            sub.add_parser(name, help=help_, add_help=False)
    bench = sub.add_parser("bench", help="benchmarks; see `looplm bench --help`")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH")
    wanted_bench = argv[1] if wanted == "bench" and len(argv) > 1 else None
    for name, (module, help_) in BENCHES.items():
        if wanted_bench == name:
            _add_lazy(bench_sub, name, module, help_)
        else:
            bench_sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``looplm`` command; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:  # no command, or ``looplm bench`` without a benchmark
        parser.print_help()
        return 0
    try:
        return int(run(args) or 0)
    except LoopLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
