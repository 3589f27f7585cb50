"""``looplm serve CHECKPOINT_DIR``: serve a checkpoint over OpenAI's HTTP API (uvicorn)."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path
from typing import Any

import torch

from looplm.argtypes import positive_int
from looplm.checkpoint import load_model
from looplm.data.tokenizer import load_tokenizer
from looplm.errors import CheckpointError, LoopLMError

try:  # the looplm[serve] extra
    from looplm.serve.api import create_app
    from looplm.serve.engine import Engine
except ModuleNotFoundError as err:  # say which package is missing when the command runs
    _MISSING: str | None = err.name
else:
    _MISSING = None


def _port(text: str) -> int:
    """A TCP port number, 0-65535 (argparse type)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {text!r}")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="a checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=_port, default=8000, help="TCP port (0: any free port)")
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests waiting at most; more get 429 with Retry-After")
    parser.add_argument("--max-tokens-in-flight", type=int, default=None,
                        help="prompt + max_tokens summed over running requests at most (default: no limit)")
    parser.add_argument("--prefill-chunk", type=int, default=512,
                        help="prompt tokens read per prefill forward (several prompts share them; default "
                        "512: SmolLM2-135M reads 512 ~1.2x as fast per token as 256, float32 or int4)")
    parser.add_argument("--kv-cache", choices=("float", "int8"), default="float",
                        help="attention caches in float or as int8 codes with a scale per cached row "
                             "(a quarter of the bytes a decoding step reads; default float)")
    parser.add_argument("--bf16-prefill", action="store_true",
                        help="prompt forwards multiply float32 weights and attend in bfloat16 on AMX tiles "
                        "(CPUs with AMX: several times float32's rate; decoding steps stay float32)")
    parser.add_argument("--draft", default=None, metavar="SPEC",
                        help="self-speculative decoding of a greedy request that runs alone: layers:K, "
                        "recursions:R, ngram:N or heads:PATH as in looplm generate (tokens unchanged)")
    parser.add_argument("--gamma", type=int, default=4, help="draft tokens verified per forward (default 4)")
    parser.add_argument("--max-stall", type=float, default=0.5,
                        help="seconds running streams may wait for prefill forwards between two decoding "
                        "steps (0: a decoding step after every prefill forward)")
    parser.add_argument("--default-max-tokens", type=int, default=256,
                        help="max_tokens of a request that gives none")
    parser.add_argument("--api-key", default=os.environ.get("LOOPLM_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $LOOPLM_API_KEY, none)")
    parser.add_argument("--model-name", default=None, help="model id reported by /v1/models (default: "
                        "the checkpoint directory's name)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")


def load(directory: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) of a checkpoint directory; CheckpointError naming what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    try:
        return load_model(directory), load_tokenizer(directory)
    except LoopLMError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"cannot read checkpoint {str(directory)!r}: {err}") from None


def build_app(args: argparse.Namespace) -> Any:
    """The FastAPI app for ``args`` (the model loaded, the engine not yet started)."""
    if _MISSING is not None:
        raise LoopLMError(f"`looplm serve` needs {_MISSING}: pip install 'looplm[serve]'")
    model, tokenizer = load(args.checkpoint)
    try:
        engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                        max_tokens_in_flight=args.max_tokens_in_flight, prefill_chunk=args.prefill_chunk,
                        max_stall=args.max_stall, kv_cache=args.kv_cache, draft=args.draft,
                        gamma=args.gamma, bf16_prefill=args.bf16_prefill)
    except ValueError as err:
        raise LoopLMError(str(err)) from None
    name = args.model_name or Path(args.checkpoint).resolve().name
    return create_app(engine, model_id=name, api_key=args.api_key, default_max_tokens=args.default_max_tokens)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)
    app = build_app(args)
    try:
        sock = socket.create_server((args.host, args.port))
    except OSError as err:
        raise LoopLMError(f"cannot listen on {args.host}:{args.port}: {err}") from None
    host, port = sock.getsockname()[:2]
    print(f"serving {args.checkpoint} on http://{host}:{port} (chat page at /, API at /v1)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0
