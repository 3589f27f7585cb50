"""``looplm bench model``: training and decoding speed of whole models against transformers.

Three comparisons, each timed side by side in one run (the contenders alternate within every
repeat; medians of repeats), printed as ratios with PASS/FAIL against the project's targets:

(a) training tokens/s (forward + backward + AdamW step): LoopLM with gated DeltaNet mixers and
    an MoE FFN vs transformers' Qwen3-Next with only linear-attention (gated DeltaNet) layers and
    the same width, depth, heads, experts (target ≥ 2×); the vanilla-Transformer configuration
    vs ``LlamaForCausalLM`` of the same size (target ≥ 1×).
(b) greedy decoding latency per token after a long and a short prompt: the fixed-state
    (gated DeltaNet) LoopLM vs Llama with its KV cache (target: ≥ 4× lower at the long prompt,
    and within 10% of its own latency at the short one); the vanilla configuration with its KV
    cache is timed beside them (its ratios to Llama are reported, no target).
(c) expert-choice Mixture-of-Recursions (3 recursions, ~1/3 of the tokens at each deeper one)
    vs the same model with every token taking all 3: FLOPs and training-step time ratios.
(d) Mixture-of-Depths at capacity 12.5% on every other layer vs the dense vanilla model of the
    same size: training tokens/s (target ≥ 1.3×) and FLOPs per token.

Writes ``model.json`` and ``model.png`` to ``--out``. ``--quick`` shrinks everything to seconds
(for the test); its numbers say nothing about the targets.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from looplm.argtypes import positive_int
from looplm.bench.common import (
    causal_lm_loss,
    machine_info,
    markdown_table,
    pass_fail,
    time_interleaved,
    write_json,
)
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
    "MoD 12.5% / dense train tokens/s": ("mod_speedup", ">=", 1.3),
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


def fixed_state(s: Size) -> LoopConfig:
    """Gated-DeltaNet twin of ``dense(s)``; its mixer has an extra output-gate projection
    (``d × d`` per layer), paid for by a narrower FFN so the sizes match."""
    c = dense(s)
    return dense(s, "gated_deltanet", d_ffn=c.ffn_dim - 32 * round(c.d_model / 96))


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
    routing: dict[str, Any] = {"router": "expert_choice", "capacity": capacity} if capacity else {}
    return dense(s, n_prelude=1, n_core=2, n_coda=1, sharing="middle_cycle", n_recursions=3, **routing)


# ---------------------------------------------------------------- timing


def train_step(model: torch.nn.Module, tokens: torch.Tensor) -> Callable[[], None]:
    """One forward + backward + AdamW step on ``tokens [B, T+1]`` (inputs and next tokens)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = tokens[:, :-1], tokens[:, 1:]
    model.train()

    def step() -> None:
        causal_lm_loss(model, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


MATMUL_OPS = ("aten::mm", "aten::addmm")  # the dense projections, experts and head


def matmul_share(step: Callable[[], None]) -> dict[str, float]:
    """One profiled call of ``step``: self CPU seconds of dense matmuls (``MATMUL_OPS``) and of
    everything, and their ratio. The profiler slows small ops more than big ones, so the share
    of matmuls in an unprofiled step is if anything larger."""
    from torch.profiler import profile

    with profile() as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e6
    return {"matmul_s": mm, "total_s": total, "share": mm / total}


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
    steps = {name: train_step(m, tokens) for name, m in models.items()}
    secs = time_interleaved(steps, s.repeats)
    n = tokens.shape[0] * (tokens.shape[1] - 1)
    tps = {name: n / t for name, t in secs.items()}
    share = {name: matmul_share(step) for name, step in steps.items()}
    # the ratio gdn_moe would reach if everything but its dense matmuls took no time
    bound = secs["qwen3_next"] / (secs["looplm_gdn_moe"] * share["looplm_gdn_moe"]["share"])
    return {"params": params, "tokens_per_s": tps, "step_s": secs, "matmul_profile": share,
            "train_gdn_moe_speedup": tps["looplm_gdn_moe"] / tps["qwen3_next"],
            "train_vanilla_speedup": tps["looplm_vanilla"] / tps["llama"],
            "gdn_moe_matmul_bound": bound}


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
                # the cache argument is ``cache`` from transformers 5.2x on, ``past_key_values`` before
                params = inspect.signature(model.forward).parameters
                self.cache_arg = "cache" if "cache" in params else "past_key_values"
                for part in prompt.split(chunk, dim=1):
                    out = model(input_ids=part, use_cache=True, **{self.cache_arg: self.state})
        self.token = out.logits[:, -1].argmax(-1, keepdim=True)

    def __call__(self) -> None:
        with torch.inference_mode():
            if self.looplm:
                out = self.model(self.token, state=self.state, use_cache=True)
                self.state = out.state
            else:
                out = self.model(input_ids=self.token, use_cache=True, **{self.cache_arg: self.state})
            self.token = out.logits[:, -1].argmax(-1, keepdim=True)


def bench_decode(s: Size) -> dict[str, Any]:
    torch.manual_seed(0)
    fixed, ref, vanilla = LoopLM(fixed_state(s)), _hf(llama(s)), LoopLM(dense(s))
    prompt = torch.randint(0, 256, (1, s.long_prompt))
    contenders = (("looplm_fixed_state", fixed), ("llama", ref), ("looplm_vanilla", vanilla))
    decoders = {f"{name}_{n}": _Decoder(model, prompt[:, -n:])
                for n in (s.short_prompt, s.long_prompt) for name, model in contenders}
    # repeats of single steps, the contenders in turn; the first rounds are warm-up
    secs = time_interleaved(decoders, max(s.decode_steps, 3), warmup=2)
    ms = {name: 1000 * t for name, t in secs.items()}
    long, short = s.long_prompt, s.short_prompt
    return {"params": {"looplm_fixed_state": n_params(fixed), "llama": n_params(ref),
                       "looplm_vanilla": n_params(vanilla)},
            "ms_per_token": ms,
            "state_bytes": {"looplm_fixed_state_long": decoders[f"looplm_fixed_state_{long}"].state.nbytes()},
            "decode_speedup_long": ms[f"llama_{long}"] / ms[f"looplm_fixed_state_{long}"],
            "decode_speedup_short": ms[f"llama_{short}"] / ms[f"looplm_fixed_state_{short}"],
            "decode_long_over_short": ms[f"looplm_fixed_state_{long}"] / ms[f"looplm_fixed_state_{short}"],
            # no target: the vanilla (attention) configuration against Llama, both with KV caches
            "vanilla_decode_speedup_long": ms[f"llama_{long}"] / ms[f"looplm_vanilla_{long}"],
            "vanilla_decode_speedup_short": ms[f"llama_{short}"] / ms[f"looplm_vanilla_{short}"]}


def bench_mor(s: Size, tokens: torch.Tensor, capacity: list[float]) -> dict[str, Any]:
    torch.manual_seed(0)
    models = {"mor_expert_choice": LoopLM(mor(s, capacity)), "all_recursions": LoopLM(mor(s, None))}
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        stats = {name: m(x, y).stats for name, m in models.items()}
    flops = {name: st["flops_per_token"] for name, st in stats.items()}
    secs = time_interleaved({name: train_step(m, tokens) for name, m in models.items()}, s.repeats)
    return {"params": {name: n_params(m) for name, m in models.items()}, "capacity": capacity,
            "reach": stats["mor_expert_choice"]["reach"], "flops_per_token": flops,
            "step_s": secs, "mor_flops_ratio": flops["mor_expert_choice"] / flops["all_recursions"],
            "mor_time_ratio": secs["mor_expert_choice"] / secs["all_recursions"]}


def bench_mod(s: Size, tokens: torch.Tensor) -> dict[str, Any]:
    torch.manual_seed(0)
    models = {"mod": LoopLM(dense(s, layer_router="mod", mod_capacity=0.125)), "dense": LoopLM(dense(s))}
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        flops = {name: m(x, y).stats["flops_per_token"] for name, m in models.items()}
    secs = time_interleaved({name: train_step(m, tokens) for name, m in models.items()}, s.repeats)
    return {"params": {name: n_params(m) for name, m in models.items()}, "flops_per_token": flops,
            "step_s": secs, "mod_flops_ratio": flops["mod"] / flops["dense"],
            "mod_speedup": secs["dense"] / secs["mod"]}


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
    parser.add_argument("--only", choices=("train", "decode", "mor", "mod"), action="append",
                        help="run only these parts (repeatable)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
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
    parts = set(args.only or ("train", "decode", "mor", "mod"))
    tokens = torch.randint(0, 256, (s.batch_size, s.seq_len + 1), generator=torch.Generator().manual_seed(0))
    results: dict[str, Any] = {"command": "looplm " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"]
                               else "looplm bench model", "quick": args.quick, "size": vars(s),
                               "machine": machine_info()}
    if "train" in parts:
        results["train"] = bench_train(s, tokens)
    if "decode" in parts:
        results["decode"] = bench_decode(s)
    if "mor" in parts:
        results["mor"] = bench_mor(s, tokens, list(args.mor_capacity))
    if "mod" in parts:
        results["mod"] = bench_mod(s, tokens)
    results["checks"] = checks = verdicts(results)
    print(render(results))
    path = write_json(args.out, "model", results)
    if checks:
        plot(checks, args.out / "model.png")
    print(f"wrote {path}")
    return 0


def render(data: dict[str, Any]) -> str:
    """Markdown tables of a result: the target checks, then the raw numbers of each part."""
    note = " (--quick: sizes too small to mean anything)" if data.get("quick") else ""
    out = [f"Targets{note}:", markdown_table(
        ["comparison", "ratio", "target", "verdict"],
        [[label, c["ratio"], c["target"], pass_fail(c["pass"])] for label, c in data["checks"].items()])]
    raw = (("train", "tokens_per_s", "training tokens/s"), ("decode", "ms_per_token", "decoding ms/token"),
           ("mor", "step_s", "training step s"), ("mod", "step_s", "training step s"))
    for part, key, title in raw:
        if part in data:
            params = data[part].get("params", {})
            rows = [[name, value, params.get(name, params.get(name.rsplit("_", 1)[0]))]
                    for name, value in data[part][key].items()]
            out.append(markdown_table(["model", title, "params"], rows))
    decode = data.get("decode", {})
    if "vanilla_decode_speedup_long" in decode:
        out.append(f"Vanilla (attention) configuration vs Llama, decoding latency ratio (no target): "
                   f"{decode['vanilla_decode_speedup_long']:.2f}x after the long prompt, "
                   f"{decode['vanilla_decode_speedup_short']:.2f}x after the short one")
    train = data.get("train", {})
    if "matmul_profile" in train:
        rows = [[name, p["matmul_s"], p["total_s"], p["share"]]
                for name, p in train["matmul_profile"].items()]
        out.append(markdown_table(["model (one profiled train step)", "dense matmul s", "total s",
                                   "matmul share"], rows))
        out.append(f"gdn_moe vs Qwen3-Next if only its dense matmuls took time: "
                   f"{train['gdn_moe_matmul_bound']:.2f}x")
    return "\n\n".join(out)
