"""``looplm bench train``: training throughput of the trainer's step, LoopLM vs transformers' Llama.

The vanilla-Transformer configuration (``looplm/configs/transformer.yaml``'s model, widened to about
10M parameters) and ``LlamaForCausalLM`` of the same width, depth, heads and FFN width are
trained with the step ``looplm train`` runs (forward, backward, gradient clipping, AdamW with
decay groups), on the same batch, alternating within every repeat; tokens/s are medians.
Target: ratio LoopLM / Llama >= 1. Writes ``train.json`` to ``--out``.

``--threads-list 1,2 --config small``: instead, the trainer's step of a shipped configuration
(its model, vocabulary, batch and sequence length) at each torch thread count, alternating within
every repeat; tokens/s and the ratio to the first count, written to ``train_threads.json``. A
configuration's ``threads`` default is chosen from this, run on an idle machine.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from looplm.argtypes import positive_int
from looplm.bench.common import causal_lm_loss, machine_info, parse_int_list, time_interleaved, write_json
from looplm.model import LoopConfig, LoopLM
from looplm.train.config import TrainConfig, load_sections
from looplm.train.optim import build_optimizer

VOCAB = 320  # the byte tokenizer's 259 ids, padded to a multiple of 64 as looplm train does


def looplm_config(d_model: int, n_layers: int, n_heads: int, seq_len: int) -> LoopConfig:
    base = load_sections("transformer")["model"]
    return LoopConfig.from_dict({**base, "vocab_size": VOCAB, "d_model": d_model, "n_core": n_layers,
                                 "n_heads": n_heads, "max_seq_len": seq_len})


def llama_like(c: LoopConfig) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim,
        num_hidden_layers=c.n_core, num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads,
        max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
        attn_implementation="sdpa",
    ))


def trainer_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """The optimizer step of ``looplm.train.loop`` (one micro-batch), for any causal LM (a
    ``torch.compile``d one too: its parameters are the original module's)."""
    opt = build_optimizer(getattr(model, "_orig_mod", model), TrainConfig(lr=1e-4))
    model.train()

    def step() -> None:
        causal_lm_loss(model, x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--d-model", type=int, default=384, help="width (384 x 6 layers: ~10M parameters)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--threads-list", default=None,
                        help="compare these thread counts on --config's training step (e.g. 1,2)")
    parser.add_argument("--config", default="small", help="configuration for --threads-list (default small)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds (numbers meaningless)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/train"))


def thread_counts(args: argparse.Namespace) -> int:
    """Tokens/s of ``args.config``'s training step at each of ``args.threads_list`` threads."""
    counts = parse_int_list(args.threads_list, "--threads-list")
    sections = load_sections(args.config)
    train = sections["train"]
    vocab = -(-int(train.get("vocab_size") or VOCAB) // 64) * 64
    batch, seq = int(train.get("batch_size", 16)), int(train.get("seq_len", 128))
    if args.quick:
        batch, seq, args.repeats = 2, 16, 1
    cfg = LoopConfig.from_dict({**sections["model"], "vocab_size": vocab, "max_seq_len": seq})
    torch.manual_seed(0)
    model = LoopLM(cfg)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    step = trainer_step(model, tokens[:, :-1], tokens[:, 1:])
    before = torch.get_num_threads()

    def at(n: int) -> Callable[[], None]:
        def run() -> None:
            torch.set_num_threads(n)
            step()
        return run

    try:
        secs = time_interleaved({str(n): at(n) for n in counts}, args.repeats)
    finally:
        torch.set_num_threads(before)
    tps = {n: batch * seq / s for n, s in secs.items()}
    first = str(counts[0])
    ratios = {n: t / tps[first] for n, t in tps.items()}
    result = {"config": args.config, "tokens_per_s": tps, "ratio": ratios,
              "settings": {"batch_size": batch, "seq_len": seq, "repeats": args.repeats},
              "machine": machine_info()}
    print(f"{args.config}: training tokens/s, batch {batch} x {seq}, median of {args.repeats}:")
    for n, t in tps.items():
        print(f"  {n:>3} threads {t:10,.0f} tok/s   {result['ratio'][n]:.2f}x {first} thread(s)")
    if args.quick:
        print("(--quick: not meaningful)")
    print(f"wrote {write_json(args.out, 'train_threads', result)}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.threads_list:
        return thread_counts(args)
    if args.quick:
        args.d_model, args.layers, args.heads = 64, 2, 2
        args.batch_size, args.seq_len, args.repeats = 2, 32, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = looplm_config(args.d_model, args.layers, args.heads, args.seq_len)
    torch.manual_seed(0)
    models = {"looplm": LoopLM(cfg), "llama": llama_like(cfg)}
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (args.batch_size, args.seq_len + 1), generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:]
    secs = time_interleaved({name: trainer_step(m, x, y) for name, m in models.items()}, args.repeats)
    n_tokens = x.numel()
    result: dict[str, Any] = {
        "params": {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()},
        "tokens_per_s": {name: n_tokens / s for name, s in secs.items()},
        "settings": {k: v for k, v in vars(args).items() if k != "out" and not callable(v)},
        "machine": machine_info(),
    }
    tps = result["tokens_per_s"]
    result["ratio"] = ratio = tps["looplm"] / tps["llama"]
    print(f"training tokens/s, batch {args.batch_size} x {args.seq_len}, median of {args.repeats}:")
    for name in models:
        print(f"  {name:<8} {tps[name]:10,.0f} tok/s   params {result['params'][name] / 1e6:.2f}M")
    verdict = "(--quick: not meaningful)" if args.quick else ("PASS" if ratio >= 1 else "FAIL")
    print(f"ratio looplm / llama: {ratio:.3f} (target >= 1) {verdict}")
    print(f"wrote {write_json(args.out, 'train', result)}")
    return 0
