"""``looplm bench infer``: CPU inference of a SmolLM2-135M-shaped model, looplm against transformers.

One run, same threads, same weights (random unless ``--checkpoint``: the cost of a step does not
depend on them): looplm float32, int8 and int4 (every linear *and* the tied embedding/head
quantised; ``--formats`` adds ``bfloat16``) and transformers' ``LlamaForCausalLM`` in float32 with
the same configuration and weights. Per prompt length (``--prompts``, default 32 and 1024 tokens):
prefill tokens/s (the prompt and the first token) and greedy decode tokens/s over ``--new-tokens``
(the time of prompt + N tokens minus the time of prompt + 1, contenders interleaved, medians), and
for looplm the bytes one decoding step reads (weights and buffers + the KV cache at that length)
and the bandwidth that implies (bytes × tokens/s), beside a measured read bandwidth (a sum over
1 GiB) so the fraction of the limit is visible. Writes ``infer.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from looplm.argtypes import positive_int
from looplm.bench.common import machine_info, markdown_table, time_interleaved, write_json
from looplm.checkpoint import load_model
from looplm.errors import ConfigError
from looplm.generate import generate_ids
from looplm.layers.ffn import SwiGLU
from looplm.layers.layer import Layer
from looplm.layers.mixers import Attention
from looplm.model import LoopConfig, LoopLM
from looplm.quant.ptq import quantize_model

# SmolLM2-135M: 30 layers, width 576, 9 query / 3 key-value heads of 64, FFN 1536, 49152 tokens, tied
SMOLLM2 = dict(vocab_size=49152, d_model=576, n_heads=9, n_kv_heads=3, n_core=30, d_ffn=1536,
               rope_base=100000.0, max_seq_len=2048, tie_embeddings=True)
QUICK = dict(vocab_size=512, d_model=64, n_heads=4, n_kv_heads=2, n_core=2, d_ffn=128, max_seq_len=256,
             tie_embeddings=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="a looplm checkpoint (default: random SmolLM2-135M-shaped "
                        "weights)")
    parser.add_argument("--formats", nargs="+", default=["float32", "int8", "int4"],
                        choices=["float32", "bfloat16", "int8", "int4"])
    parser.add_argument("--group-size", type=int, default=32, help="int4 group size")
    parser.add_argument("--prompts", type=int, nargs="+", default=[32, 1024], help="prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-transformers", action="store_true", help="looplm rows only")
    parser.add_argument("--out", default="bench_results/infer")
    parser.add_argument("--quick", action="store_true", help="a seconds-long run on a tiny model (tests)")


def read_bandwidth(gib: float = 1.0) -> float:
    """GB/s of a torch sum over ``gib`` GiB of float32 (median of 3), with torch's threads."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / sorted(times)[1] / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers: what a decoding step reads once (the embedding's one row
    aside; a tied table is read whole by the head)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def looplm_models(base: LoopLM, formats: list[str], group_size: int) -> dict[str, LoopLM]:
    models = {}
    for fmt in formats:
        m = copy.deepcopy(base).eval()
        if fmt == "bfloat16":
            m = m.to(torch.bfloat16)
        elif fmt != "float32":
            quantize_model(m, fmt, group_size=group_size if fmt == "int4" else None, keep_embeddings=False,
                           keep_head=False)
        models[f"looplm_{fmt}"] = m
    return models


def llama_twin(model: LoopLM) -> torch.nn.Module:
    """transformers' ``LlamaForCausalLM`` with ``model``'s configuration and weights (a vanilla
    attention LoopLM: one recursion, tied head; RoPE pairs (i, i + D/2) in both)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim,
                      num_hidden_layers=c.n_core, num_attention_heads=c.n_heads,
                      num_key_value_heads=c.kv_heads,
                      max_position_embeddings=c.max_seq_len, rope_theta=c.rope_base, tie_word_embeddings=True,
                      rms_norm_eps=torch.finfo(torch.float32).eps, bos_token_id=None, eos_token_id=None,
                      pad_token_id=0)
    hf: Any = LlamaForCausalLM(cfg).eval()  # transformers' types are not followed
    H, Hkv, D, F = c.n_heads, c.kv_heads, c.d_model // c.n_heads, c.ffn_dim
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    for i, layer in enumerate(model.core):
        if not (isinstance(layer, Layer) and isinstance(layer.mixer, Attention)
                and isinstance(layer.ffn, SwiGLU) and layer.ffn_norm is not None):
            raise ConfigError("the transformers twin needs attention layers with a dense FFN")
        p = f"model.layers.{i}."
        q, k, v = layer.mixer.qkv.weight.split([H * D, Hkv * D, Hkv * D])
        gate, up = layer.ffn.w_in.weight.split([F, F])
        sd.update({p + "input_layernorm.weight": layer.mixer_norm.weight, p + "self_attn.q_proj.weight": q,
                   p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                   p + "self_attn.o_proj.weight": layer.mixer.o_proj.weight,
                   p + "post_attention_layernorm.weight": layer.ffn_norm.weight,
                   p + "mlp.gate_proj.weight": gate,
                   p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": layer.ffn.w_out.weight})
    hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    hf.tie_weights()
    return hf


def hf_generate(model: Any, prompt: torch.Tensor, n: int) -> None:
    """transformers' greedy ``generate`` of exactly ``n`` new tokens for every row of ``prompt``
    (``model``: a transformers causal LM, whose types mypy does not follow)."""
    with torch.inference_mode():
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                       min_new_tokens=n, do_sample=False)


def _kv_bytes(model: LoopLM, prompt_len: int, new: int) -> int:
    """KV cache bytes read per decoding step at the middle of the generated span (float32)."""
    c = model.config
    return 2 * c.n_core * c.kv_heads * (c.d_model // c.n_heads) * 4 * (prompt_len + new // 2)


def run_bench(s: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    if s["checkpoint"]:
        base = load_model(s["checkpoint"])
    else:
        base = LoopLM(LoopConfig(**(QUICK if s["quick"] else SMOLLM2)))
    models: dict[str, torch.nn.Module] = dict(looplm_models(base, s["formats"], s["group_size"]))
    if s["transformers"]:
        models["transformers_float32"] = llama_twin(base)
    vocab, n = base.config.vocab_size, s["new_tokens"]
    rows = []
    for plen in s["prompts"]:
        prompt = torch.randint(0, vocab, (1, plen), generator=torch.Generator().manual_seed(plen))
        fns: dict[str, Callable[[], object]] = {}
        for name, m in models.items():
            for key, count in (("/1", 1), ("/n", n + 1)):
                if isinstance(m, LoopLM):
                    fns[name + key] = partial(generate_ids, m, prompt, max_new_tokens=count)
                else:
                    fns[name + key] = partial(hf_generate, m, prompt, count)
        secs = time_interleaved(fns, repeats=s["repeats"], warmup=1)
        for name, m in models.items():
            t1, tn = secs[name + "/1"], secs[name + "/n"]
            row = {"model": name, "prompt": plen, "prefill_tok_s": plen / t1, "decode_tok_s": n / (tn - t1)}
            if name.startswith("looplm"):
                row["bytes_per_token"] = weight_bytes(m) + _kv_bytes(base, plen, n)
                row["gb_s"] = row["bytes_per_token"] * row["decode_tok_s"] / 1e9
            rows.append(row)
    return {"rows": rows}


def table(result: dict[str, Any]) -> str:
    ref = {r["prompt"]: r for r in result["rows"] if r["model"] == "transformers_float32"}
    out = []
    for r in result["rows"]:
        base = ref.get(r["prompt"])
        ratio = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}" if base else ""
        pre = f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f}" if base else ""
        mb = f"{r['bytes_per_token'] / 1e6:.1f}" if "bytes_per_token" in r else ""
        gbs = f"{r['gb_s']:.1f} ({r['gb_s'] / result['read_gb_s']:.0%})" if "gb_s" in r else ""
        out.append([r["model"], r["prompt"], f"{r['decode_tok_s']:.1f}", ratio, f"{r['prefill_tok_s']:.0f}",
                    pre, mb, gbs])
    return markdown_table(["model", "prompt", "decode tok/s", "x transformers", "prefill tok/s",
                           "x transformers", "MB read / token", "GB/s (of measured read bandwidth)"], out)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    if args.new_tokens < 2 or args.repeats < 1 or min(args.prompts) < 1:
        raise ValueError("--new-tokens must be >= 2, --repeats and --prompts positive")
    s = dict(checkpoint=args.checkpoint, formats=args.formats, group_size=args.group_size,
             prompts=args.prompts, new_tokens=args.new_tokens, repeats=args.repeats,
             transformers=not args.no_transformers, quick=args.quick, threads=args.threads)
    if args.quick:
        s.update(prompts=[8, 24], new_tokens=4, repeats=1)
    result = {"settings": s, "machine": machine_info(),
              "read_gb_s": read_bandwidth(0.125 if args.quick else 1.0)}
    result.update(run_bench(s))
    path = write_json(args.out, "infer", result)
    print(table(result))
    print(f"measured read bandwidth {result['read_gb_s']:.1f} GB/s; wrote {path}")
    return 0
