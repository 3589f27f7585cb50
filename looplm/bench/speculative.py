"""``looplm bench speculative CKPT [CKPT ...]``: greedy decoding tokens/s of plain decoding against
self-speculative decoding with each draft, on held-out English prose (the GPL-3 text) and Python
(the stdlib's ``pprint.py``), both outside the ``finetune`` corpus draft heads train on; the same
prompts for every row. Several checkpoints (e.g. a float32 import and its int4 quantisation) each
get their rows; every draft spec applies to each.

Each prompt is decoded plainly and then with each draft, interleaved, in this process; a row's
tokens/s is its new tokens over its wall time (prompt forward included, the same for every row),
its speed-up the ratio to the plain row on the same prompts. Outputs must be identical to the
plain ones, up to rounding: a verification forward sums in another order than a step, and an
int8 / int4 model quantises each activation row to int8 (in groups of 32), which turns those
differences into rounding steps, so where plain decoding's two best tokens are within ``TIE``
logits of each other (``QUANT_TIE`` for a quantised model: its prefill and its decoding steps
already disagree by up to ~0.6 logits on SmolLM2 int4) the two runs may pick different ones
("tie" in the table, counted in the JSON); any other mismatch is NO and makes the command exit 1.
Acceptance is accepted / proposed draft tokens, accepted/round the mean accepted draft length,
tokens/forward the tokens per verification forward (accepted + the model's own). Per checkpoint, the cost that
bounds the speed-up: a verification forward of gamma + 1 tokens over the first prompt's cache
against one decoding step (medians of ``--cost-repeats`` each, interleaved): with ``a`` tokens
per forward and drafts costing ``c`` steps, the speed-up is at most ``a / (verify + c)``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from looplm.argtypes import positive_int
from looplm.bench.common import machine_info, markdown_table, write_json
from looplm.bench.pretrained import PROSE, code_text, read_text
from looplm.checkpoint import load_model
from looplm.data.tokenizer import load_tokenizer
from looplm.errors import ConfigError, LoopLMError
from looplm.generate import decoding_mode, generate_ids
from looplm.model import VERIFY_TOKENS, LoopLM
from looplm.speculative import SpecStats, build_drafter, check_gamma, speculative_ids

DEFAULT_DRAFTS = ["ngram:3", "layers:8"]
TIE = 0.05  # logits: a first difference where the plain token leads by less is rounding, not a bug
QUANT_TIE = 1.0  # the same for a model with int8 / int4 weights


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT_DIR",
                        help="e.g. `looplm import` of SmolLM2-135M-Instruct.Q4_1.gguf and its int4 "
                        "quantisation")
    parser.add_argument("--drafts", nargs="+", default=DEFAULT_DRAFTS, metavar="SPEC",
                        help="draft specs as --draft takes them (heads:PATH from looplm train-draft)")
    parser.add_argument("--gamma", type=int, default=4, help="draft tokens per verification")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per text")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens decoded per prompt")
    parser.add_argument("--cost-repeats", type=int, default=20, help="timings of the verification cost")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
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


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


@torch.no_grad()
def same_output(model: LoopLM, prompt: list[int], want: list[int], got: list[int]) -> str:
    """``yes`` when ``got`` is ``want``; ``tie`` when they first differ where plain decoding (the
    prompt's forward, then one step per token of ``want``) puts ``got``'s token within ``TIE``
    logits of ``want``'s (``QUANT_TIE`` for a quantised model); else ``NO``."""
    if got == want:
        return "yes"
    i = next((j for j, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    if i == len(want) or i == len(got):
        return "NO"
    device = model.norm.weight.device
    quantised = any(hasattr(module, "dequantized") for module in model.modules())
    with decoding_mode(model):
        last = torch.zeros(1, len(prompt), dtype=torch.bool, device=device)
        last[0, -1] = True
        out = model(torch.tensor([prompt], device=device), use_cache=True, logits_at=last)
        for token in want[:i]:
            out = model(torch.tensor([[token]], device=device), state=out.state)
        logits = out.logits.reshape(-1, out.logits.shape[-1])[-1]
    gap = float(logits[want[i]] - logits[got[i]])
    return "tie" if gap <= (QUANT_TIE if quantised else TIE) else "NO"


@torch.no_grad()
def verification_cost(model: LoopLM, prompt: list[int], tokens: int, repeats: int) -> tuple[float, float]:
    """Median seconds of one decoding step and of a forward of ``tokens`` tokens with logits at each
    (a verification), both from the state after ``prompt``, timed in turns."""
    device = model.norm.weight.device
    with decoding_mode(model):
        state = model(torch.tensor([prompt], device=device), use_cache=True).state
        one = torch.tensor([prompt[-1:]], device=device)
        many = torch.tensor([prompt[-tokens:]], device=device)
        at = torch.ones(1, tokens, dtype=torch.bool, device=device)
        steps, verifies = [], []
        for _ in range(repeats + 1):  # the first round warms up
            steps.append(_timed(model, one, state=state, use_cache=True)[0])
            verifies.append(_timed(model, many, state=state, logits_at=at)[0])
    return statistics.median(steps[1:]), statistics.median(verifies[1:])


def _model_rows(directory: Path, args: argparse.Namespace,
                texts: dict[str, str]) -> tuple[list[dict[str, Any]], bool]:
    """The rows of one checkpoint (plain, then each draft, per text) and whether every output was
    plain decoding's."""
    model = load_model(directory)
    tokenizer = load_tokenizer(directory)
    drafters = {spec: build_drafter(model, spec) for spec in args.drafts}
    rows: list[dict[str, Any]] = []
    ok, cost = True, None
    for text, path in texts.items():
        prompts = prompts_of(tokenizer.encode(read_text(path, text)), args.prompts, args.prompt_tokens)
        if cost is None:
            cost = verification_cost(model, prompts[0], args.gamma + 1, args.cost_repeats)
            print(f"{directory.name}: a decoding step {cost[0] * 1e3:.2f} ms, a verification of "
                  f"{args.gamma + 1} tokens {cost[1] * 1e3:.2f} ms ({cost[1] / cost[0]:.2f}x a step)")
        plain_s = 0.0
        # per draft: seconds, acceptance statistics, each output's verdict against plain decoding's
        totals: dict[str, list[Any]] = {spec: [0.0, SpecStats(), []] for spec in drafters}
        for prompt in prompts:
            seconds, (want,) = _timed(generate_ids, model, [prompt], max_new_tokens=args.new_tokens)
            plain_s += seconds
            for spec, drafter in drafters.items():
                total = totals[spec]
                seconds, got = _timed(speculative_ids, model, prompt, draft=drafter, gamma=args.gamma,
                                      max_new_tokens=args.new_tokens, stats=total[1])
                total[0] += seconds
                total[2].append(same_output(model, prompt, want, got))
        n_tokens = args.prompts * args.new_tokens
        base = {"model": directory.name, "text": text, "step_ms": cost[0] * 1e3, "verify_ms": cost[1] * 1e3}
        rows.append({**base, "draft": "plain", "tokens_per_s": n_tokens / plain_s, "speedup": 1.0,
                     "acceptance": None, "accepted_per_round": None, "tokens_per_forward": 1.0,
                     "identical": True, "ties": 0})
        for spec, (seconds, stats, verdicts) in totals.items():
            same = "NO" not in verdicts
            ok = ok and same
            rounds = max(stats.rounds, 1)
            rows.append({**base, "draft": spec, "tokens_per_s": n_tokens / seconds,
                         "speedup": plain_s / seconds, "acceptance": stats.acceptance,
                         "accepted_per_round": stats.accepted / rounds,
                         "tokens_per_forward": stats.tokens / rounds, "identical": same,
                         "ties": verdicts.count("tie")})
    return rows, ok


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.prompts, args.prompt_tokens, args.new_tokens, args.cost_repeats = 1, 64, 16, 3
    for name in ("prompts", "prompt_tokens", "new_tokens", "cost_repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    try:
        check_gamma(args.gamma)
    except ValueError as err:
        raise ConfigError(f"--gamma: {err}") from None
    if args.gamma + 1 > VERIFY_TOKENS:
        print(f"note: a verification of {args.gamma + 1} tokens runs the Python layers (the one-call "
              f"verification takes at most {VERIFY_TOKENS})")
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = {"prose": args.prose, "code": args.code or str(code_text())}
    rows: list[dict[str, Any]] = []
    ok = True
    for checkpoint in args.checkpoints:
        more, same = _model_rows(Path(checkpoint), args, texts)
        rows += more
        ok = ok and same
    table = markdown_table(
        ["model", "text", "draft", "tokens/s", "speed-up", "acceptance", "accepted/round", "tokens/forward",
         "identical"],
        [[r["model"], r["text"], r["draft"], f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.2f}x",
          "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}",
          "-" if r["accepted_per_round"] is None else f"{r['accepted_per_round']:.2f}",
          f"{r['tokens_per_forward']:.2f}",
          ("yes" if not r["ties"] else f"tie x{r['ties']}") if r["identical"] else "NO"] for r in rows])
    print(f"greedy, gamma={args.gamma}, {args.prompts} prompts x {args.prompt_tokens} tokens per text, "
          f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads")
    print(table)
    settings = {k: getattr(args, k) for k in ("drafts", "gamma", "prompts", "prompt_tokens", "new_tokens")}
    write_json(args.out, "speculative.json", {"machine": machine_info(), "settings": settings,
                                              "checkpoints": args.checkpoints, "rows": rows})
    if not ok:
        raise LoopLMError("speculative output differs from plain greedy decoding (see the table)")
    return 0
