"""The Llama family in Hugging Face terms <-> LoopLM.

A Llama (Mistral, Qwen2) decoder is LoopLM's vanilla configuration: ``n_core`` attention layers
run once (``n_recursions=1``, no router), a SwiGLU FFN, pre-norm RMSNorm, RoPE in the
rotate-half layout, grouped KV heads. The q, k, v projections are one ``qkv`` matrix here
(rows q | k | v) and the FFN's gate and up one ``w_in`` (rows gate | up).
"""

from __future__ import annotations

from typing import Any

import torch

from looplm.errors import ConfigError, ConversionError
from looplm.model import LoopConfig

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """RoPE base and scaling from a Hugging Face config (``rope_theta``/``rope_scaling``, or
    transformers 5's ``rope_parameters``)."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or None
    base = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    if params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        scaling = None if kind == "default" else dict(scaling)
    return base, scaling


def loop_config(config: dict[str, Any], origin: str = "") -> LoopConfig:
    """The LoopConfig of a Hugging Face Llama/Mistral/Qwen2 ``config``; ConversionError naming what
    cannot be represented."""
    where = f"{origin!r}: " if origin else ""
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise ConversionError(
            f"{where}architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{where}activation {act!r} is not supported (SwiGLU with silu only)")
    if config.get("mlp_bias"):
        raise ConversionError(f"{where}biases in the MLP (mlp_bias) are not supported")
    qwen = arch == "Qwen2ForCausalLM"
    if not qwen and config.get("attention_bias"):
        raise ConversionError(
            f"{where}attention_bias (biases on every attention projection, o_proj included) is not supported"
        )
    d, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = config.get("head_dim") or d // heads
    max_len = int(config.get("max_position_embeddings", 2048))
    window = config.get("sliding_window")
    if window and (not qwen or config.get("use_sliding_window")) and int(window) < max_len:
        max_len = int(window)  # beyond the window the model attends differently: stop there
    base, scaling = _rope(config)
    try:
        return LoopConfig(
            vocab_size=int(config["vocab_size"]),
            d_model=d,
            n_heads=heads,
            n_kv_heads=int(config.get("num_key_value_heads") or heads),
            n_core=int(config["num_hidden_layers"]),
            d_ffn=int(config["intermediate_size"]),
            max_seq_len=max_len,
            rope_base=base,
            rope_scaling=scaling,
            head_dim=None if head_dim * heads == d else int(head_dim),
            qkv_bias=qwen,
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            init_std=float(config.get("initializer_range", 0.02)),
        )
    except (KeyError, TypeError) as err:
        raise ConversionError(f"{where}config lacks or has a bad {err}") from None
    except ConfigError as err:
        raise ConversionError(f"{where}{err}") from None


def _layer_names(i: int, layer: str, bias: bool) -> dict[str, list[str]]:
    """LoopLM name -> the Hugging Face names concatenated (in row order) into it: Hugging Face layer
    ``i`` is LoopLM layer ``layer`` (``core.3``)."""
    hf, lp = f"model.layers.{i}.", f"{layer}."
    att = hf + "self_attn."
    names = {
        lp + "mixer_norm.weight": [hf + "input_layernorm.weight"],
        lp + "mixer.qkv.weight": [att + f"{p}_proj.weight" for p in "qkv"],
        lp + "mixer.o_proj.weight": [att + "o_proj.weight"],
        lp + "ffn_norm.weight": [hf + "post_attention_layernorm.weight"],
        lp + "ffn.w_in.weight": [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"],
        lp + "ffn.w_out.weight": [hf + "mlp.down_proj.weight"],
    }
    if bias:
        names[lp + "mixer.qkv.bias"] = [att + f"{p}_proj.bias" for p in "qkv"]
    return names


def name_map(config: LoopConfig) -> dict[str, list[str]]:
    """Every LoopLM parameter of a vanilla ``config`` (one recursion: prelude, core and coda layers
    are Hugging Face layers in that order) -> its Hugging Face names."""
    names = {"embed.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    layers = [f"prelude.{i}" for i in range(config.n_prelude)] + [f"core.{i}" for i in range(config.n_core)]
    layers += [f"coda.{i}" for i in range(config.n_coda)]
    for i, layer in enumerate(layers):
        names.update(_layer_names(i, layer, config.qkv_bias))
    if not config.tie_embeddings:
        names["head.weight"] = ["lm_head.weight"]
    return names


def loop_state_dict(
    config: LoopConfig, tensors: dict[str, torch.Tensor], origin: str = ""
) -> dict[str, torch.Tensor]:
    """LoopLM weights from Hugging Face ``tensors``; ConversionError naming missing tensors. A tied
    model's ``lm_head.weight`` (some files keep the copy) is dropped."""
    where = f"{origin!r}: " if origin else ""
    names = name_map(config)
    missing = [n for sources in names.values() for n in sources if n not in tensors]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ConversionError(f"{where}missing tensors {', '.join(missing[:3])}{more}")
    used = {n for sources in names.values() for n in sources}
    ignorable = {"lm_head.weight"} if config.tie_embeddings else set()
    extra = [
        n for n in tensors if n not in used and n not in ignorable and not n.endswith("rotary_emb.inv_freq")
    ]
    if extra:
        raise ConversionError(
            f"{where}unexpected tensors {', '.join(sorted(extra)[:3])}: not a plain "
            f"{'Qwen2' if config.qkv_bias else 'Llama'} model"
        )
    return {
        k: torch.cat([tensors[n].float() for n in sources], 0)
        if len(sources) > 1
        else tensors[sources[0]].float()
        for k, sources in names.items()
    }


def hf_state_dict(config: LoopConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`loop_state_dict`: Hugging Face Llama names from LoopLM weights."""
    heads, kv, D = config.n_heads, config.kv_heads, config.head_dim or config.d_model // config.n_heads
    out: dict[str, torch.Tensor] = {}
    for k, sources in name_map(config).items():
        w = state[k]
        if len(sources) == 1:
            out[sources[0]] = w.contiguous()
            continue
        sizes = [heads * D, kv * D, kv * D] if ".qkv." in k else [w.shape[0] // 2] * 2
        for name, part in zip(sources, w.split(sizes, 0)):
            out[name] = part.contiguous()
    return out
