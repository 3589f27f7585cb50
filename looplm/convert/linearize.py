"""Linearisation (Liger, Lan et al. 2025): an attention model's attention layers become
linearised mixers (layers/liger.py) that run a gated recurrence on the *same* q, k, v, o weights.

``linearize(model, "gla", keep_attention_every=4, window=64)``: every 4th layer stays softmax
attention (the inter-layer hybrid), the others become ``liger_gla`` with Liger Attention's
sliding window of 64 inside the layer. The state dict is copied unchanged: a linearised mixer
names its parameters as the attention layer does (``qkv``, ``o_proj``) and adds none (its gates
come from the key projection). ``normalize`` (the default for gla) reads the GLA state
normalised (``liger_norm``, layers/liger.py): without it the converted model's recurrent output
grows with the context, and a model fine-tuned on short windows breaks on longer ones.
"""

from __future__ import annotations

import dataclasses

from looplm.errors import ConfigError
from looplm.layers.liger import RECURRENCES
from looplm.model import LoopLM

__all__ = ["RECURRENCES", "linearize"]


def linearize(model: LoopLM, recurrence: str, keep_attention_every: int = 0, window: int = 0,
              normalize: bool = True) -> LoopLM:
    """A new LoopLM: ``model``'s attention layers as ``liger_<recurrence>`` mixers (every
    ``keep_attention_every``-th layer kept as attention; 0: none kept), weights copied;
    ``normalize``: gla's normalised read-out (ignored by gated_deltanet, whose keys are
    L2-normalised)."""
    c = model.config
    if recurrence not in RECURRENCES:
        raise ConfigError(f"--mixer {recurrence!r} is not one of {', '.join(RECURRENCES)}")
    if c.mixer != "attention" or c.attn_every:
        kind = f"mixer={c.mixer!r}" + (f", attn_every={c.attn_every}" if c.attn_every else "")
        what = "has no attention layer" if c.mixer != "attention" and not c.attn_every else "is a hybrid"
        raise ConfigError(f"linearize needs an attention-only model; this one {what} ({kind})")
    if keep_attention_every < 0 or window < 0:
        raise ConfigError("--keep-attention and --window must be >= 0")
    config = dataclasses.replace(c, mixer=f"liger_{recurrence}", attn_every=keep_attention_every,
                                 window=window, liger_norm=normalize and recurrence == "gla")
    new = LoopLM(config).to(model.embed.weight.device, model.embed.weight.dtype)
    new.load_state_dict(model.state_dict(), strict=True)
    return new
