"""Read a GGUF file (llama.cpp's format) of architecture ``llama`` into a :class:`Source`.

The ``gguf`` package parses the file and dequantises its tensors (F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q4_K, Q6_K and the other types it knows). Two things it leaves to the reader:

- llama.cpp's converter permutes the rows of ``attn_q`` and ``attn_k`` within each head so its
  RoPE can rotate adjacent pairs; looplm (as Hugging Face) rotates the halves ``(i, i + D/2)``.
  :func:`unpermute_qk` undoes it exactly; :func:`permute_qk` is the converter's direction.
- GGUF shapes list the fastest dimension first; tensors here are ``[out, in]`` as in PyTorch.

Two of its types are looplm weight formats exactly (:func:`file_codes`): Q8_0 (blocks of 32 int8
codes with one float16 scale, ``W = d·q``) is int8 in groups of 32, and Q4_1 (blocks of 32 4-bit
codes with a float16 scale and minimum, ``W = m + d·q``) is int4 in groups of 32 with a zero point;
a checkpoint quantised to those formats can keep the file's own codes, bit-exact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from looplm.errors import ConversionError
from looplm.pretrained.source import Source
from looplm.pretrained.tokenizer import tokenizer_from_gguf
from looplm.quant.formats import Format, make_format, pack_nibbles

# tensor types dequantised here (others the gguf package knows are accepted too, see _dequantize)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

_LAYER_NAMES = {  # GGUF layer tensor (blk.N) -> Hugging Face Llama name inside model.layers.N
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's order of q/k rows ``w [H*D, ...]``: within each head, row ``2i`` is the
    half-layout's row ``i`` and row ``2i+1`` its row ``i + D/2``."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_qk`: GGUF q/k rows back to the rotate-half layout."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _value(fields: dict, key: str, default: Any = None) -> Any:
    f = fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise ConversionError(f"{str(path)!r} does not exist or is not a file")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OSError, KeyError, TypeError) as err:
        raise ConversionError(
            f"{str(path)!r} is not a readable GGUF file ({err}); is it truncated or another format?"
        ) from None
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ConversionError(
                f"{str(path)!r} is truncated: tensor {t.name!r} ends past the end of the "
                f"file ({size} bytes); download it again"
            )
    return reader


def _config(fields: dict, path: Path, n_vocab: int, tied: bool) -> dict[str, Any]:
    arch = _value(fields, "general.architecture")
    if arch != "llama":
        raise ConversionError(f"{str(path)!r} is a GGUF of architecture {arch!r}; only 'llama' is supported")

    def need(key: str) -> Any:
        value = _value(fields, f"llama.{key}")
        if value is None:
            raise ConversionError(f"{str(path)!r} lacks the metadata llama.{key}")
        return value

    d, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_value(fields, "llama.attention.key_length", d // heads))
    rot = int(_value(fields, "llama.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ConversionError(
            f"{str(path)!r} rotates {rot} of {head_dim} head dimensions (partial RoPE): not supported"
        )
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": n_vocab,
        "hidden_size": d,
        "num_attention_heads": heads,
        "num_key_value_heads": int(_value(fields, "llama.attention.head_count_kv", heads)),
        "num_hidden_layers": int(need("block_count")),
        "intermediate_size": int(need("feed_forward_length")),
        "max_position_embeddings": int(_value(fields, "llama.context_length", 2048)),
        "rope_theta": float(_value(fields, "llama.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(_value(fields, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
    }
    if head_dim != d // heads:
        config["head_dim"] = head_dim
    scaling = _value(fields, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ConversionError(f"{str(path)!r} uses RoPE scaling {scaling!r}; supported: linear")
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    n_experts = _value(fields, "llama.expert_count", 0)
    if n_experts:
        raise ConversionError(
            f"{str(path)!r} is a mixture of {n_experts} experts (Mixtral style): not supported"
        )
    return config


def _dequantize(t: Any, path: Path) -> torch.Tensor:
    import gguf

    name = t.tensor_type.name
    try:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ConversionError(
            f"{str(path)!r}: tensor {t.name!r} has type {name}, which cannot be "
            f"dequantised (supported: {', '.join(SUPPORTED_TYPES)})"
        ) from None
    shape = tuple(int(n) for n in reversed(t.shape))
    return torch.from_numpy(
        np.array(values, dtype=np.float32).reshape(shape)
    )  # a copy: the file is read-only


def _halves(blocks: np.ndarray, at: int) -> torch.Tensor:
    """The float16 at byte ``at`` of each block, as float32 ``[n_blocks]``."""
    return torch.from_numpy(blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32).reshape(-1))


def file_codes(t: Any) -> tuple[Format, dict[str, torch.Tensor]] | None:
    """A Q8_0 or Q4_1 tensor's own codes as looplm parts of the same ``[out, in]`` weight, no float
    round trip: Q8_0 -> int8 in groups of 32 (``q``, ``scale = d``); Q4_1 -> int4 in groups of 32
    with a zero point (``scale = d``, ``offset = m``; the block's element ``i < 16`` is byte ``i``'s
    low nibble and ``i + 16`` its high one, repacked as looplm's pairs). None for other types, and
    for Q8_0 blocks holding the code -128, which the int8 kernels do not take."""
    kind = t.tensor_type.name
    if kind not in ("Q8_0", "Q4_1") or len(t.shape) != 2:
        return None
    rows = int(t.shape[1])
    size = 34 if kind == "Q8_0" else 20  # bytes per block of 32
    blocks = np.asarray(t.data).reshape(-1, size)
    d = _halves(blocks, 0).reshape(rows, -1)
    if kind == "Q8_0":
        q = torch.from_numpy(blocks[:, 2:].copy().view(np.int8)).reshape(rows, -1)
        if bool((q == -128).any()):
            return None
        return make_format("int8", 32), {"q": q, "scale": d}
    qs = torch.from_numpy(blocks[:, 4:].copy())
    codes = torch.cat([qs & 15, qs >> 4], dim=1)  # [n_blocks, 32] in element order
    parts = {"packed": pack_nibbles(codes).reshape(rows, -1), "scale": d,
             "offset": _halves(blocks, 2).reshape(rows, -1)}
    return make_format("int4", 32, zero_point=True), parts


def read_gguf(path: str | Path, keep_codes: bool = False) -> Source:
    """The model in the GGUF file ``path`` as a :class:`Source` (float32 tensors, Hugging Face names,
    q/k rows in the rotate-half layout; ``keep_codes``: also the codes of its Q8_0 / Q4_1 tensors,
    :func:`file_codes`); ConversionError for anything it cannot represent."""
    path = Path(path)
    reader = _open(path)
    fields = reader.fields
    tensors = {t.name: t for t in reader.tensors}
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise ConversionError(f"{str(path)!r} has no token_embd.weight tensor")
    n_vocab = int(embed.shape[1])
    config = _config(fields, path, n_vocab, tied="output.weight" not in tensors)
    if "rope_freqs.weight" in tensors:
        raise ConversionError(
            f"{str(path)!r} carries per-frequency RoPE factors (rope_freqs, Llama 3.1 style "
            "scaling): not supported from GGUF; import the Hugging Face directory instead"
        )
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out: dict[str, torch.Tensor] = {}
    codes: dict[str, tuple[Format, dict[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
            hf = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
        elif len(parts) == 2 and parts[0] in _TOP_NAMES:
            hf = f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
        else:
            raise ConversionError(f"{str(path)!r}: unexpected tensor {name!r} for a llama model")
        w = _dequantize(t, path)
        kept = file_codes(t) if keep_codes else None
        if parts[0] == "blk" and parts[2] in ("attn_q", "attn_k"):
            n = heads if parts[2] == "attn_q" else kv_heads
            w = unpermute_qk(w, n)
            if kept is not None:
                kept = (kept[0], {k: unpermute_qk(v, n) for k, v in kept[1].items()})
        out[hf] = w
        if kept is not None:
            codes[hf] = kept
    tokenizer_json, tokenizer_config = tokenizer_from_gguf(fields, path)
    return Source(config, out, tokenizer_json, tokenizer_config, str(path), codes)
