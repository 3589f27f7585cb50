"""``looplm bench speculative CKPT``: greedy decoding tokens/s of plain decoding against
self-speculative decoding with each draft, on held-out English prose (the GPL-3 text) and Python
(the stdlib's ``pprint.py``, a validation-split file), the same prompts for every row.

Each prompt is decoded plainly and then with each draft, interleaved, in this process; a row's
tokens/s is its new tokens over its wall time (prompt forward included, the same for every row),
its speed-up the ratio to the plain row on the same prompts. Outputs must be identical to the
plain ones: a mismatch is reported in the table and makes the command exit 1. Acceptance is
accepted / proposed draft tokens; tokens per forward counts the verification forwards.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from looplm.bench.common import machine_info, markdown_table, write_json
from looplm.bench.pretrained import PROSE, code_text, read_text
from looplm.checkpoint import load_model
from looplm.data.tokenizer import load_tokenizer
from looplm.errors import ConfigError, LoopLMError
from looplm.generate import generate_ids
from looplm.speculative import SpecStats, build_drafter, check_gamma, speculative_ids

DEFAULT_DRAFTS = ["ngram:3", "layers:8"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR",
                        help="e.g. `looplm import` of SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--drafts", nargs="+", default=DEFAULT_DRAFTS, metavar="SPEC",
                        help="draft specs as --draft takes them (heads:PATH from looplm train-draft)")
    parser.add_argument("--gamma", type=int, default=4, help="draft tokens per verification")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per text")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens decoded per prompt")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--prose", default=str(PROSE), help="English prose text (default: the GPL-3 text)")
    parser.add_argument("--code", default=None, help="Python source text (default: the stdlib's pprint.py)")
    parser.add_argument("--out", default="bench_results/speculative")
    parser.add_argument("--quick", action="store_true", help="one short prompt per text, 16 new tokens")


def prompts_of(ids: list[int], count: int, length: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens spread evenly over ``ids``."""
    if len(ids) < length + 1:
        raise ConfigError(f"the text has {len(ids)} tokens, fewer than one prompt of {length}")
    step = (len(ids) - length) // max(count, 1)
    return [ids[i * step:i * step + length] for i in range(count)]


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.prompts, args.prompt_tokens, args.new_tokens = 1, 64, 16
    for name in ("prompts", "prompt_tokens", "new_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    try:
        check_gamma(args.gamma)
    except ValueError as err:
        raise ConfigError(f"--gamma: {err}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    directory = Path(args.checkpoint)
    model = load_model(directory)
    tokenizer = load_tokenizer(directory)
    drafters = {spec: build_drafter(model, spec) for spec in args.drafts}
    texts = {"prose": args.prose, "code": args.code or str(code_text())}
    rows: list[dict[str, Any]] = []
    ok = True
    for text, path in texts.items():
        ids = tokenizer.encode(read_text(path, text))
        plain_s = 0.0
        # per draft: seconds, acceptance statistics, whether every output equals plain decoding's
        totals: dict[str, list[Any]] = {spec: [0.0, SpecStats(), True] for spec in drafters}
        for prompt in prompts_of(ids, args.prompts, args.prompt_tokens):
            seconds, (want,) = _timed(generate_ids, model, [prompt], max_new_tokens=args.new_tokens)
            plain_s += seconds
            for spec, drafter in drafters.items():
                total = totals[spec]
                seconds, got = _timed(speculative_ids, model, prompt, draft=drafter, gamma=args.gamma,
                                      max_new_tokens=args.new_tokens, stats=total[1])
                total[0] += seconds
                total[2] = total[2] and got == want
        n_tokens = args.prompts * args.new_tokens
        rows.append({"text": text, "draft": "plain", "tokens_per_s": n_tokens / plain_s, "speedup": 1.0,
                     "acceptance": None, "tokens_per_forward": 1.0, "identical": True})
        for spec, (seconds, stats, same) in totals.items():
            ok = ok and same
            rows.append({"text": text, "draft": spec, "tokens_per_s": n_tokens / seconds,
                         "speedup": plain_s / seconds, "acceptance": stats.acceptance,
                         "tokens_per_forward": stats.tokens / max(stats.rounds, 1), "identical": same})
    table = markdown_table(
        ["text", "draft", "tokens/s", "speed-up", "acceptance", "tokens/forward", "identical"],
        [[r["text"], r["draft"], f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.2f}x",
          "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}", f"{r['tokens_per_forward']:.2f}",
          "yes" if r["identical"] else "NO"] for r in rows])
    print(f"greedy, gamma={args.gamma}, {args.prompts} prompts x {args.prompt_tokens} tokens per text, "
          f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads")
    print(table)
    settings = {k: getattr(args, k) for k in ("drafts", "gamma", "prompts", "prompt_tokens", "new_tokens")}
    write_json(args.out, "speculative.json", {"machine": machine_info(), "settings": settings,
                                              "checkpoint": str(directory), "rows": rows})
    if not ok:
        raise LoopLMError("speculative output differs from plain greedy decoding (see the table)")
    return 0
