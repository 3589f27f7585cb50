"""What every reader returns: a Llama-family model in Hugging Face terms."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from looplm.quant.formats import Format


@dataclass
class Source:
    """``config``: a Hugging Face config dict (``architectures``, ``hidden_size``, ...);
    ``tensors``: Hugging Face parameter names (``model.layers.0.self_attn.q_proj.weight``) to
    float32 tensors; ``tokenizer_json``: a ``tokenizers`` serialisation; ``tokenizer_config``:
    ``bos_token``, ``eos_token``, ``pad_token``, ``chat_template``, ``add_bos_token``;
    ``origin``: the path read, for messages; ``codes``: for tensors the file stores in a looplm
    weight format exactly (a GGUF's Q8_0 / Q4_1), the same Hugging Face names to that format and
    its parts (the file's own codes, which :func:`looplm.pretrained.convert.keep_file_codes` puts
    into a model quantised in that format)."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer_json: str
    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    origin: str = ""
    codes: dict[str, tuple[Format, dict[str, torch.Tensor]]] = field(default_factory=dict)
