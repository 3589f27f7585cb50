"""``export_hf``: a vanilla looplm checkpoint as a Hugging Face Llama (or Qwen2) directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads without looplm.

Vanilla: every layer softmax attention with a dense SwiGLU FFN, one recursion, no router, no
shared KV, float weights (``n_prelude``/``n_coda`` layers are ordinary layers then). q/k/v biases
make it a ``Qwen2ForCausalLM`` (Qwen2's layout), otherwise ``LlamaForCausalLM``. The tokenizer
goes along where the checkpoint has a tokenizer.json (imported models, looplm's BPE).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from looplm.checkpoint import load_model
from looplm.data.tokenizer import BPE_NAME, CONFIG_NAME, PretrainedTokenizer, load_tokenizer
from looplm.errors import CheckpointError, ConversionError
from looplm.model import LoopConfig
from looplm.pretrained.llama import hf_state_dict

FORMATS = ("hf",)


def check_vanilla(config: LoopConfig) -> None:
    """ConversionError naming the first feature a Llama cannot express."""
    reasons = []
    if config.n_recursions != 1 or config.router != "none":
        reasons.append(f"recursion (n_recursions={config.n_recursions}, router={config.router!r})")
    if config.mixer != "attention" or config.attn_every:
        reasons.append(
            f"mixer {config.mixer!r}" + (f" with attn_every={config.attn_every}" if config.attn_every else "")
        )
    if config.ffn != "dense":
        reasons.append(f"ffn={config.ffn!r}")
    if config.kv_sharing:
        reasons.append("kv_sharing")
    if reasons:
        raise ConversionError(
            "only vanilla Transformer checkpoints (attention + dense SwiGLU, one recursion) "
            f"export to a Hugging Face Llama; this one has {', '.join(reasons)}"
        )


def hf_config(config: LoopConfig, tokenizer: Any = None) -> dict[str, Any]:
    """The Hugging Face config dict of a vanilla ``config`` (transformers 5's ``rope_parameters``)."""
    import transformers

    head_dim = config.head_dim or config.d_model // config.n_heads
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(config.rope_base)}
    if config.rope_scaling:
        scaling = dict(config.rope_scaling)
        scaling["rope_type"] = scaling.pop("type", scaling.get("rope_type"))
        rope.update(scaling)
    special = {}
    if isinstance(tokenizer, PretrainedTokenizer):
        special = {
            k: v
            for k, v in (
                ("bos_token_id", tokenizer.bos_id),
                ("eos_token_id", tokenizer.eos_id),
                ("pad_token_id", tokenizer.pad_id),
            )
            if v is not None and v >= 0
        }
    cls = transformers.Qwen2Config if config.qkv_bias else transformers.LlamaConfig
    arch = "Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM"
    hf = cls(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_prelude + config.n_core + config.n_coda,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads,
        head_dim=head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        rope_parameters=rope,
        hidden_act="silu",
        initializer_range=config.init_std,
        architectures=[arch],
        **special,
    )
    return hf.to_dict()


def export_hf(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the Hugging Face directory of the looplm ``checkpoint`` to ``out`` (must not exist or be
    empty; written beside it and renamed, so a failure leaves nothing)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{str(out)!r} already exists and is not empty; choose another --out")
    model = load_model(checkpoint)
    if getattr(model, "quantization", None) is not None:
        raise ConversionError(
            f"{str(checkpoint)!r} is quantised ({model.quantization['format']}); export the "
            "float checkpoint it came from"
        )
    check_vanilla(model.config)
    try:
        tokenizer = load_tokenizer(checkpoint)
    except CheckpointError:
        tokenizer = None
    config = hf_config(model.config, tokenizer)
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    tensors = hf_state_dict(model.config, state)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        source = Path(checkpoint)
        if (source / BPE_NAME).is_file():
            shutil.copy2(source / BPE_NAME, tmp / BPE_NAME)
            settings = json.loads((source / CONFIG_NAME).read_text())
            keep = {
                k: v for k, v in settings.items() if k not in ("looplm_tokenizer", "identity", "vocab_size")
            }
            keep["tokenizer_class"] = "PreTrainedTokenizerFast"
            (tmp / CONFIG_NAME).write_text(json.dumps(keep, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
