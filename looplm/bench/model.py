"""``looplm bench model``: training and decoding speed of whole models against transformers.

Three comparisons, each timed side by side in one run (the contenders alternate within every
repeat; medians of repeats), printed as ratios with PASS/FAIL against issue 3's targets:

(a) training tokens/s (forward + backward + AdamW step): LoopLM with gated DeltaNet mixers and
    an MoE FFN vs transformers' Qwen3-Next with only linear-attention (gated DeltaNet) layers and
    the same width, depth, heads, experts (target ≥ 2×); the vanilla-Transformer configuration
    vs ``LlamaForCausalLM`` of the same size (target ≥ 1×).
(b) greedy decoding latency per token after a long and a short prompt: the fixed-state
    (gated DeltaNet) LoopLM vs Llama with its KV cache (target: ≥ 4× lower at the long prompt,
    and within 10% of its own latency at the short one).
(c) expert-choice Mixture-of-Recursions (3 recursions, ~1/3 of the tokens at each deeper one)
    vs the same model with every token taking all 3: FLOPs and training-step time ratios.

Writes ``model.json`` and ``model.png`` to ``--out``. ``--quick`` shrinks everything to seconds
(for the test); its numbers say nothing about the targets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from looplm.model import LoopConfig, LoopLM

VOCAB = 259  # the byte tokenizer's vocabulary


@dataclass
class Size:
    """Model and run sizes of one bench mode."""

    d_model: int = 256  # the MoE models (a)
    n_heads: int = 4
    n_layers: int = 6
    n_experts: int = 8
    top_k: int = 2
    d_expert: int = 192
    dense_d_model: int = 384  # the dense models (a, b, c)
    dense_heads: int = 6
    batch_size: int = 8
    seq_len: int = 512
    long_prompt: int = 8192
    short_prompt: int = 256
    decode_steps: int = 32
    repeats: int = 3


QUICK = Size(d_model=64, n_heads=2, n_layers=2, n_experts=4, d_expert=32, dense_d_model=64, dense_heads=2,
             batch_size=2, seq_len=64, long_prompt=256, short_prompt=32, decode_steps=3, repeats=1)

TARGETS = {  # name -> (ratio key, comparison, bound)
    "gdn_moe vs Qwen3-Next train tokens/s": ("train_gdn_moe_speedup", ">=", 2.0),
    "vanilla vs Llama train tokens/s": ("train_vanilla_speedup", ">=", 1.0),
    "fixed-state vs Llama decode latency (long prompt)": ("decode_speedup_long", ">=", 4.0),
    "fixed-state latency long / short prompt": ("decode_long_over_short", "<=", 1.10),
    "MoR / all-recursions FLOPs per token": ("mor_flops_ratio", "<", 1.0),
    "MoR / all-recursions train step time": ("mor_time_ratio", "<", 1.0),
}


# ---------------------------------------------------------------- configurations


def gdn_moe(s: Size) -> LoopConfig:
    return LoopConfig(vocab_size=VOCAB, d_model=s.d_model, n_heads=s.n_heads, n_core=s.n_layers,
                      mixer="gated_deltanet", ffn="moe", n_experts=s.n_experts, top_k=s.top_k,
                      d_ffn=s.d_expert, shared_expert=True, max_seq_len=s.long_prompt + 1024)


def qwen3_next(s: Size) -> Any:
    """Qwen3-Next with only its gated-DeltaNet ("linear_attention") layers, our heads and sizes."""
    from transformers import Qwen3NextConfig

    hd = s.d_model // s.n_heads
    return Qwen3NextConfig(
        vocab_size=VOCAB, hidden_size=s.d_model, num_hidden_layers=s.n_layers,
        layer_types=["linear_attention"] * s.n_layers, num_attention_heads=s.n_heads,
        num_key_value_heads=s.n_heads, head_dim=hd, linear_num_key_heads=s.n_heads,
        linear_num_value_heads=s.n_heads, linear_key_head_dim=hd, linear_value_head_dim=hd,
        linear_conv_kernel_dim=4, num_experts=s.n_experts, num_experts_per_tok=s.top_k,
        moe_intermediate_size=s.d_expert, shared_expert_intermediate_size=s.d_expert,
        intermediate_size=s.d_expert, decoder_sparse_step=1, tie_word_embeddings=True)


def dense(s: Size, mixer: str = "attention", **kw: Any) -> LoopConfig:
    base = dict(vocab_size=VOCAB, d_model=s.dense_d_model, n_heads=s.dense_heads, n_core=s.n_layers,
                mixer=mixer, ffn="dense", max_seq_len=s.long_prompt + 1024)
    return LoopConfig(**{**base, **kw})


def llama(s: Size) -> Any:
    from transformers import LlamaConfig

    c = dense(s)
    return LlamaConfig(vocab_size=VOCAB, hidden_size=c.d_model, intermediate_size=c.ffn_dim,
                       num_hidden_layers=c.n_core, num_attention_heads=c.n_heads,
                       num_key_value_heads=c.n_heads, max_position_embeddings=c.max_seq_len,
                       tie_word_embeddings=True, attn_implementation="sdpa")


def mor(s: Size, capacity: list[float] | None) -> LoopConfig:
    """Middle-cycle MoR: 1 unique layer, a 2-layer core applied 3 times, 1 unique layer.
    ``capacity=None`` gives the baseline where every token takes all 3 recursions."""
    routing = {"router": "expert_choice", "capacity": capacity} if capacity else {}
    return dense(s, n_prelude=1, n_core=2, n_coda=1, sharing="middle_cycle", n_recursions=3, **routing)


# ---------------------------------------------------------------- timing


def side_by_side(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each zero-argument function; they alternate within every repeat so
    load changes on a shared machine hit all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def train_step(model: torch.nn.Module, tokens: torch.Tensor) -> Callable[[], None]:
    """One forward + backward + AdamW step on ``tokens [B, T+1]`` (inputs and next tokens)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = tokens[:, :-1], tokens[:, 1:]
    model.train()

    def step() -> None:
        if isinstance(model, LoopLM):
            out = model(x, y)
            loss = out.loss + out.aux_loss
        else:  # transformers shifts the labels itself
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _hf(config: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


def bench_train(s: Size, tokens: torch.Tensor) -> dict[str, Any]:
    torch.manual_seed(0)
    models = {"looplm_gdn_moe": LoopLM(gdn_moe(s)), "qwen3_next": _hf(qwen3_next(s)),
              "looplm_vanilla": LoopLM(dense(s)), "llama": _hf(llama(s))}
    params = {name: n_params(m) for name, m in models.items()}
    secs = side_by_side({name: train_step(m, tokens) for name, m in models.items()}, s.repeats)
    n = tokens.shape[0] * (tokens.shape[1] - 1)
    tps = {name: n / t for name, t in secs.items()}
    return {"params": params, "tokens_per_s": tps,
            "train_gdn_moe_speedup": tps["looplm_gdn_moe"] / tps["qwen3_next"],
            "train_vanilla_speedup": tps["looplm_vanilla"] / tps["llama"]}


class _Decoder:
    """Greedy decoding one token per call after a prompt; LoopLM state or a transformers cache."""

    def __init__(self, model: torch.nn.Module, prompt: torch.Tensor, chunk: int = 1024) -> None:
        self.model = model.eval()
        self.looplm = isinstance(model, LoopLM)
        with torch.inference_mode():
            if self.looplm:
                out = model(prompt, use_cache=True)
                self.state = out.state
            else:  # chunked prefill keeps the attention matrix small; decoding is what we time
                from transformers import DynamicCache

                self.state = DynamicCache(config=model.config)
                for part in prompt.split(chunk, dim=1):
                    out = model(input_ids=part, past_key_values=self.state, use_cache=True)
        self.token = out.logits[:, -1].argmax(-1, keepdim=True)

    def __call__(self) -> None:
        with torch.inference_mode():
            if self.looplm:
                out = self.model(self.token, state=self.state, use_cache=True)
                self.state = out.state
            else:
                out = self.model(input_ids=self.token, past_key_values=self.state, use_cache=True)
            self.token = out.logits[:, -1].argmax(-1, keepdim=True)


def bench_decode(s: Size) -> dict[str, Any]:
    torch.manual_seed(0)
    fixed, ref = LoopLM(dense(s, "gated_deltanet")), _hf(llama(s))
    prompt = torch.randint(0, 256, (1, s.long_prompt))
    decoders = {f"{name}_{n}": _Decoder(model, prompt[:, -n:])
                for n in (s.short_prompt, s.long_prompt)
                for name, model in (("looplm_fixed_state", fixed), ("llama", ref))}
    # repeats of single steps; the first few are warm-up
    secs = side_by_side(decoders, max(s.decode_steps, 3), warmup=2)
    ms = {name: 1000 * t for name, t in secs.items()}
    long, short = s.long_prompt, s.short_prompt
    return {"params": {"looplm_fixed_state": n_params(fixed), "llama": n_params(ref)},
            "ms_per_token": ms,
            "state_bytes": {"looplm_fixed_state_long": decoders[f"looplm_fixed_state_{long}"].state.nbytes()},
            "decode_speedup_long": ms[f"llama_{long}"] / ms[f"looplm_fixed_state_{long}"],
            "decode_speedup_short": ms[f"llama_{short}"] / ms[f"looplm_fixed_state_{short}"],
            "decode_long_over_short": ms[f"looplm_fixed_state_{long}"] / ms[f"looplm_fixed_state_{short}"]}


def bench_mor(s: Size, tokens: torch.Tensor, capacity: list[float]) -> dict[str, Any]:
    torch.manual_seed(0)
    models = {"mor_expert_choice": LoopLM(mor(s, capacity)), "all_recursions": LoopLM(mor(s, None))}
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        stats = {name: m(x, y).stats for name, m in models.items()}
    flops = {name: st["flops_per_token"] for name, st in stats.items()}
    secs = side_by_side({name: train_step(m, tokens) for name, m in models.items()}, s.repeats)
    return {"capacity": capacity, "reach": stats["mor_expert_choice"]["reach"], "flops_per_token": flops,
            "step_s": secs, "mor_flops_ratio": flops["mor_expert_choice"] / flops["all_recursions"],
            "mor_time_ratio": secs["mor_expert_choice"] / secs["all_recursions"]}


# ---------------------------------------------------------------- report


def verdicts(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """PASS/FAIL of every target whose ratio was measured."""
    ratios = {k: v for part in results.values() if isinstance(part, dict) for k, v in part.items()
              if isinstance(v, float)}
    out = {}
    for label, (key, op, bound) in TARGETS.items():
        if key in ratios:
            value = ratios[key]
            ok = {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
            out[label] = {"ratio": value, "target": f"{op} {bound}", "pass": ok}
    return out


def plot(checks: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(checks)
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(labels) + 1.2))
    for i, label in enumerate(labels):
        c = checks[label]
        ax.barh(i, c["ratio"], color="tab:green" if c["pass"] else "tab:red")
        ax.plot([float(c["target"].split()[1])] * 2, [i - 0.4, i + 0.4], color="black")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("ratio (black line: target)")
    ax.set_title("looplm bench model")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Size()
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds (numbers meaningless)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--d-model", type=int, default=d.d_model, help="width of the MoE models")
    parser.add_argument("--dense-d-model", type=int, default=d.dense_d_model, help="width of the dense ones")
    parser.add_argument("--long-prompt", type=int, default=d.long_prompt)
    parser.add_argument("--short-prompt", type=int, default=d.short_prompt)
    parser.add_argument("--decode-steps", type=int, default=d.decode_steps)
    parser.add_argument("--repeats", type=int, default=d.repeats)
    parser.add_argument("--mor-capacity", type=float, nargs=3, default=[1.0, 1 / 3, 1 / 3],
                        metavar="F", help="fraction of the sequence kept at each of the 3 recursions")
    parser.add_argument("--only", choices=("train", "decode", "mor"), action="append",
                        help="run only these parts (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/model"))


def run(args: argparse.Namespace) -> int:
    if args.quick:
        s = QUICK
    else:
        s = Size(d_model=args.d_model, dense_d_model=args.dense_d_model, batch_size=args.batch_size,
                 seq_len=args.seq_len, long_prompt=args.long_prompt, short_prompt=args.short_prompt,
                 decode_steps=args.decode_steps, repeats=args.repeats)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, s)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, s: Size) -> int:
    parts = set(args.only or ("train", "decode", "mor"))
    tokens = torch.randint(0, 256, (s.batch_size, s.seq_len + 1), generator=torch.Generator().manual_seed(0))
    results: dict[str, Any] = {"size": vars(s), "threads": torch.get_num_threads()}
    if "train" in parts:
        results["train"] = bench_train(s, tokens)
        _print_part("training tokens/s", results["train"]["tokens_per_s"], results["train"]["params"])
    if "decode" in parts:
        results["decode"] = bench_decode(s)
        _print_part("decoding ms/token", results["decode"]["ms_per_token"], results["decode"]["params"])
    if "mor" in parts:
        results["mor"] = bench_mor(s, tokens, list(args.mor_capacity))
        _print_part("MoR training step s", results["mor"]["step_s"], {})
    results["checks"] = checks = verdicts(results)
    print("\ntarget check" + (" (--quick: not meaningful)" if args.quick else ""))
    for label, c in checks.items():
        print(f"  {label:<52} {c['ratio']:8.3f}  target {c['target']:<7} {'PASS' if c['pass'] else 'FAIL'}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model.json").write_text(json.dumps(results, indent=2) + "\n")
    if checks:
        plot(checks, args.out / "model.png")
    print(f"wrote {args.out / 'model.json'}")
    return 0


def _print_part(title: str, values: dict[str, float], params: dict[str, int]) -> None:
    print(f"\n{title}")
    for name, v in values.items():
        base = name.rsplit("_", 1)[0] if name not in params else name
        p = params.get(name, params.get(base))
        print(f"  {name:<28} {v:12.3f}" + (f"   params {p / 1e6:6.2f}M" if p else ""))
