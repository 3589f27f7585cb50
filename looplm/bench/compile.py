"""``looplm bench compile``: training tokens/s of ``torch.compile(model, fullgraph=True)`` against eager.

For the vanilla (``transformer``), gated-DeltaNet (``gdn``) and hybrid (``hybrid``) configurations
at one width: two copies of the same initial model train with the step ``looplm train`` runs
(forward, backward, clipping, AdamW; :func:`looplm.bench.train.trainer_step`) on the same batch,
one eager and one compiled (``--backend``, inductor by default; compile time is spent in the
untimed warm-up round), alternating within every repeat; tokens/s are medians. The graph breaks
of each model are counted with ``torch._dynamo.explain`` (0 expected: a break would make
``fullgraph=True`` fail). While tracing, the C++ kernels give way to PyTorch forms the compiler
fuses (docs/architecture.md, "Compilation"), so the ratio compares kernels against the compiler.
Writes ``compile.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any, cast

import torch

from looplm.argtypes import positive_int
from looplm.bench.common import machine_info, time_interleaved, write_json
from looplm.bench.train import VOCAB, trainer_step
from looplm.errors import ConfigError
from looplm.model import LoopConfig, LoopLM
from looplm.train.config import load_sections

CONFIGS = ("transformer", "gdn", "hybrid")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, eager, ...)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds (numbers meaningless)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/compile"))


def model_config(name: str, d_model: int, layers: int, heads: int, seq_len: int) -> LoopConfig:
    base = load_sections(name)["model"]
    return LoopConfig.from_dict({**base, "vocab_size": VOCAB, "d_model": d_model, "n_core": layers,
                                 "n_heads": heads, "max_seq_len": seq_len})


def measure(name: str, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Eager and compiled tokens/s of configuration ``name`` and the compiled model's graph breaks."""
    torch.manual_seed(0)
    eager = LoopLM(model_config(name, args.d_model, args.layers, args.heads, args.seq_len))
    twin = copy.deepcopy(eager)
    torch._dynamo.reset()
    breaks = torch._dynamo.explain(twin)(x, y).graph_break_count
    # torch.compile of a module gives a module (OptimizedModule); its annotation says any callable
    compiled = cast(torch.nn.Module, torch.compile(twin, fullgraph=True, backend=args.backend))
    secs = time_interleaved({"eager": trainer_step(eager, x, y), "compiled": trainer_step(compiled, x, y)},
                            args.repeats)
    tps = {k: x.numel() / s for k, s in secs.items()}
    return {"tokens_per_s": tps, "ratio": tps["compiled"] / tps["eager"], "graph_breaks": breaks,
            "params": eager.num_params()}


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.d_model, args.layers, args.heads = 32, 2, 2
        args.batch_size, args.seq_len, args.repeats = 2, 32, 1
    for flag in ("d_model", "layers", "heads", "batch_size", "seq_len", "repeats"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (args.batch_size, args.seq_len + 1), generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:]
    results = {name: measure(name, args, x, y) for name in args.configs}
    print(f"training tokens/s, batch {args.batch_size} x {args.seq_len}, median of {args.repeats}, "
          f"backend {args.backend}{' (--quick: not meaningful)' if args.quick else ''}:")
    for name, r in results.items():
        tps = r["tokens_per_s"]
        print(f"  {name:<12} eager {tps['eager']:10,.0f}  compiled {tps['compiled']:10,.0f}  "
              f"ratio {r['ratio']:.3f}  graph breaks {r['graph_breaks']}")
    settings = {k: v for k, v in vars(args).items() if k != "out" and not callable(v)}
    data = {"results": results, "settings": settings, "machine": machine_info()}
    path = write_json(args.out, "compile", data)
    print(f"wrote {path}")
    return 0
