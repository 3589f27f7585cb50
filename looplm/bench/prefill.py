"""``looplm bench prefill CKPT [CKPT...]``: what a chunked prefill costs against one forward.

Per checkpoint, one process: a random prompt of ``--prompt`` tokens prefilled (``generate.prefill``,
caches reserved as a generation reserves them) in chunks of each ``--chunks`` size and of
``generate.prefill_chunk``'s own size, and in one forward over the prompt (the reference), timed in
interleaved repeats (medians, wall and this process's CPU seconds). Prints tokens/s and each row's
wall and CPU time over the one forward's (CPU seconds stay near the work done where other processes
take the cores; wall seconds are the figure on an idle machine); ``--threads 1`` (the default)
keeps the comparison steady on a shared machine. ``--quick``: a 96-token prompt, one repeat (for
the test).

``--groups BxT,...`` adds the serving engine's shape: forwards of B prompts of T tokens together,
each from an empty state with the head only at the last token (``looplm serve``'s prefill forward),
their prompt tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from looplm.argtypes import positive_int
from looplm.bench.common import markdown_table, parse_int_list, time_interleaved
from looplm.checkpoint import load_model
from looplm.errors import LoopLMError
from looplm.generate import chunks_exact, decoding_mode, prefill, prefill_chunk
from looplm.model import LoopLM
from looplm.ops.linear import bf16_products
from looplm.ops.qlinear import bf16_rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint directories")
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens (default 1024)")
    parser.add_argument("--chunks", default="128,256", help="chunk sizes besides the rule's (128,256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each row (medians)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    parser.add_argument("--groups", default="", help="also forwards of B prompts of T tokens together: "
                        "BxT,... (e.g. 1x256,4x128: the serving engine's prefill forwards)")
    parser.add_argument("--quick", action="store_true", help="a 96-token prompt, one repeat")


def _times(fn: Any) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call of ``fn``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(model: LoopLM, prompt: int, chunks: list[int], repeats: int) -> list[dict[str, Any]]:
    """Rows ``{chunk, wall_s, cpu_s, tokens_per_s, vs_one_forward}`` for each chunk size and the
    one forward (``chunk`` = the prompt), the chunk sizes interleaved in every repeat."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    sizes = sorted({min(c, prompt) for c in chunks} | {prompt})

    def run(chunk: int) -> Any:
        return lambda: prefill(model, ids, None, model.init_state(1).reserve(prompt), chunk=chunk)

    with torch.no_grad(), decoding_mode(model):
        for c in sizes:  # warm-up: thread pools, allocator, lazy paths
            run(c)()
        times: dict[int, list[tuple[float, float]]] = {c: [] for c in sizes}
        for _ in range(repeats):
            for c in sizes:
                times[c].append(_times(run(c)))
    med = {c: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
           for c, ts in times.items()}
    ref, ref_cpu = med[prompt]
    return [{"chunk": c, "wall_s": w, "cpu_s": cpu, "tokens_per_s": prompt / w, "vs_one_forward": w / ref,
             "cpu_vs_one_forward": cpu / ref_cpu} for c, (w, cpu) in med.items()]


def parse_groups(text: str) -> list[tuple[int, int]]:
    """``"1x256,4x128"`` -> [(1, 256), (4, 128)]; LoopLMError naming the flag otherwise."""
    groups = []
    for part in filter(None, text.split(",")):
        b, sep, t = part.partition("x")
        if not (sep and b.isdigit() and t.isdigit() and int(b) > 0 and int(t) > 0):
            raise LoopLMError(f"--groups {text!r}: each group must be BxT, B and T positive, not {part!r}")
        groups.append((int(b), int(t)))
    return groups


def measure_groups(model: LoopLM, groups: list[tuple[int, int]], repeats: int) -> list[dict[str, Any]]:
    """Rows ``{rows, tokens, wall_s, tokens_per_s}``: one forward of B prompts of T tokens from an
    empty state, the head at each last token (the engine's prefill forward), groups interleaved;
    where the CPU has AMX tiles also ``tokens_per_s_bf16``: the same with float32 weights' products
    in bfloat16 (``looplm serve --bf16-prefill``)."""
    def run(b: int, t: int, bf16: bool) -> Any:
        ids = torch.randint(0, model.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(0))
        at = torch.zeros(b, t, dtype=torch.bool)
        at[:, -1] = True

        def forward() -> Any:
            with bf16_products(bf16):
                return model(ids, state=model.init_state(b), use_cache=True, logits_at=at)
        return forward

    modes = (False, True) if bf16_rows() else (False,)
    fns = {f"{b}x{t}{' bf16' * bf16}": run(b, t, bf16) for b, t in groups for bf16 in modes}
    with torch.no_grad(), decoding_mode(model):
        secs = time_interleaved(fns, repeats)
    rows = []
    for b, t in groups:
        row = {"rows": b, "tokens": t, "wall_s": secs[f"{b}x{t}"], "tokens_per_s": b * t / secs[f"{b}x{t}"]}
        if bf16_rows():
            row["tokens_per_s_bf16"] = b * t / secs[f"{b}x{t} bf16"]
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    prompt, repeats = (96, 1) if args.quick else (args.prompt, args.repeats)
    try:
        chunks = parse_int_list(args.chunks, "--chunks")
    except ValueError as e:
        raise LoopLMError(str(e)) from e
    if prompt < 1 or repeats < 1 or args.threads < 1:
        raise LoopLMError("--prompt, --repeats and --threads must be positive")
    groups = parse_groups(args.groups)
    torch.set_num_threads(args.threads)
    table, group_table = [], []
    for path in args.checkpoints:
        model = load_model(path)
        if not chunks_exact(model):
            print(f"{path}: prefills in one forward (routers that choose over the sequence): skipped")
            continue
        rule = prefill_chunk(model)
        for r in measure(model, prompt, [*chunks, rule], repeats):
            name = "one forward" if r["chunk"] == prompt else f"{r['chunk']}"
            name += " (default)" if r["chunk"] == min(rule, prompt) else ""
            table.append([path, name, f"{r['tokens_per_s']:.0f}", f"{r['wall_s'] * 1e3:.0f}",
                          f"{r['cpu_s'] * 1e3:.0f}", f"{r['vs_one_forward']:.3f}",
                          f"{r['cpu_vs_one_forward']:.3f}"])
        for r in measure_groups(model, groups, repeats):
            bf16 = r.get("tokens_per_s_bf16")
            group_table.append([path, f"{r['rows']} x {r['tokens']}", f"{r['tokens_per_s']:.0f}",
                                f"{r['wall_s'] * 1e3:.0f}", "-" if bf16 is None else f"{bf16:.0f}"])
    print(f"prefill of {prompt} prompt tokens, {args.threads} thread(s), medians of {repeats}")
    print(markdown_table(["checkpoint", "chunk", "tok/s", "wall ms", "CPU ms", "wall x one forward",
                          "CPU x one forward"], table))
    if group_table:
        print(f"forwards of B prompts of T tokens together (the engine's prefill), medians of {repeats}")
        print(markdown_table(["checkpoint", "B x T", "tok/s", "wall ms", "tok/s, bf16 products"],
                             group_table))
    return 0
